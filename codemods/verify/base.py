"""``mtp-migrate verify --base REV``: check each changed site against its version at a git revision."""

from __future__ import annotations

import difflib
import subprocess
import textwrap
from pathlib import Path

import libcst as cst

from codemods.commands._scratch import DEFAULT_UTILITY_MODULE
from codemods.commands.rewrite_mtp_loop import plan
from codemods.mtp_loop.emit import UNWEIGHTED, WEIGHTED
from codemods.runner import MigrationError, parse_source
from codemods.verify.harness import Unverifiable, program, verify_programs

IMPORTS = {name: DEFAULT_UTILITY_MODULE for name in (WEIGHTED, UNWEIGHTED)}


def git_root(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    done = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise MigrationError(f"not a git repository: {folder}")
    return Path(done.stdout.strip())


def file_at(root: Path, revision: str, path: Path) -> bytes | None:
    """The file's bytes at ``revision``, or None if it did not exist there."""
    relative = path.resolve().relative_to(root.resolve()).as_posix()
    done = subprocess.run(["git", "cat-file", "-e", f"{revision}:{relative}"], cwd=root, capture_output=True)
    if done.returncode != 0:
        check = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=root,
                               capture_output=True)
        if check.returncode != 0:
            raise MigrationError(f"unknown revision {revision!r}")
        return None
    return subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=root, capture_output=True,
                          check=True).stdout


def verify_file(path: Path, revision: str) -> list[dict]:
    """One report per site of the old version that the current file changed."""
    current = path.read_bytes()
    old = file_at(git_root(path), revision, path)
    if old is None or old == current:
        return []
    _, old_module = parse_source(old)
    old_lines = old_module.code.splitlines(keepends=True)
    new_lines = parse_source(current)[1].code.splitlines(keepends=True)
    opcodes = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False).get_opcodes()
    reports, programs = [], []
    for site, _, _ in plan(old_module, "rewrite"):
        first, last = site.span[0] - 1, site.span[1]
        touched = [op for op in opcodes if (op[0] in ("replace", "delete") and op[1] < last and op[2] > first)
                   or (op[0] == "insert" and first < op[1] < last)]
        if not touched:
            continue
        added = "".join(line for op in touched for line in new_lines[op[3]:op[4]])
        if all(op[0] == "insert" for op in touched) and all(
                line.strip().startswith("del ") for line in added.splitlines() if line.strip()):
            reports.append({"line": site.line, "action": "del_inserted", "reason": None, "verified": True})
            continue
        if site.spec is None:
            reports.append({"line": site.line, "action": "skipped", "verified": False,
                            "reason": f"changed, but the original is not a recognised site: {site.refusal}"})
            continue
        start = min(op[3] for op in touched)
        end = max(op[4] for op in touched)
        try:
            statements = list(cst.parse_module(textwrap.dedent("".join(new_lines[start:end]))).body)
            programs.append(program(site, statements, IMPORTS))
        except (cst.ParserSyntaxError, Unverifiable) as error:
            reports.append({"line": site.line, "action": "rewritten", "verified": False,
                            "reason": f"cannot check the new code: {str(error).splitlines()[0]}"})
    for verdict in verify_programs(programs):
        reports.append({"line": verdict["line"], "action": "rewritten", "verified": verdict["ok"],
                        "reason": verdict["reason"]})
    return sorted(reports, key=lambda report: report["line"])
