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


def changed_since(root: Path, revision: str) -> set[Path]:
    """Files of the repository at ``root`` whose working-tree contents differ from ``revision``."""
    check = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], cwd=root,
                           capture_output=True)
    if check.returncode != 0:
        raise MigrationError(f"unknown revision {revision!r}")
    done = subprocess.run(["git", "diff", "--name-only", "-z", revision, "--"], cwd=root, capture_output=True,
                          check=True)
    return {(root / name).resolve() for name in done.stdout.decode().split("\0") if name}


def verify_file(path: Path, root: Path, revision: str) -> list[dict]:
    """One report per site of the old version that the current file changed (a file in ``changed_since``)."""
    current = path.read_bytes()
    relative = path.resolve().relative_to(root.resolve()).as_posix()
    done = subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=root, capture_output=True)
    if done.returncode != 0:  # the file is new since the revision: nothing to compare with
        return []
    old = done.stdout
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
