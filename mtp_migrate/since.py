"""``mtp-migrate verify --base REV``: check every site changed since a git revision.

For each file that differs from its version at REV (renames followed), every head loop
of the old version whose statements changed is matched with the code that replaced it
(the enclosing function by name, then the blocks by their unchanged statements) and the
two are verified like a rewrite: the same independent programs, the same input domain.
The new code's utility import runs the target's own utility module where the tree has
one, so a drifted copy of ``loss_utils.py`` is caught too.
"""

from __future__ import annotations

import difflib
import subprocess
from pathlib import Path

import libcst as cst
import libcst.matchers as m

from mtp_migrate.cst_utils import code
from mtp_migrate.mtp_loop.dataflow import FlowIndex, Level, Point, blocks_of, locate
from mtp_migrate.mtp_loop.find import find_sites
from mtp_migrate.refusals import Code, Refusal
from mtp_migrate.source import MigrationError, parse_source
from mtp_migrate.vendoring import SHIPPED_UTILITY, utility_target
from mtp_migrate.verify.program import build


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True)


def git_root(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    done = _git(["rev-parse", "--show-toplevel"], folder if folder.exists() else Path("."))
    if done.returncode != 0:
        raise MigrationError(f"not a git repository: {folder}")
    return Path(done.stdout.decode("utf-8", "surrogateescape").strip())


def revision_of(path: Path) -> str:
    """The commit ``path`` is migrated from, as the emitted tests' header names it."""
    head = _git(["rev-parse", "--short", "HEAD"], path.parent)
    if head.returncode != 0:
        return "none (not in a git repository with a commit)"
    revision = head.stdout.decode().strip()
    if _git(["status", "--porcelain", "--", path.name], path.parent).stdout.strip():
        revision += " (with uncommitted changes to the file)"
    return revision


def changed_files(paths, revision: str) -> dict[Path, tuple[Path, str]]:
    """``{working file: (repository root, its path at revision)}`` for files that differ from ``revision``."""
    changed = {}
    for path in paths:
        root = git_root(path if path.exists() else Path("."))
        if _git(["rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], root).returncode != 0:
            raise MigrationError(f"unknown revision {revision!r}")
        done = _git(["diff", "-M", "--name-status", "-z", revision, "--"], root)
        if done.returncode != 0:
            raise MigrationError(f"git diff failed: {done.stderr.decode(errors='replace').strip()}")
        fields = done.stdout.decode("utf-8", "surrogateescape").split("\0")
        position = 0
        while position < len(fields) and fields[position]:
            status = fields[position]
            if status.startswith(("R", "C")):
                old, new = fields[position + 1], fields[position + 2]
                position += 3
            else:
                old = new = fields[position + 1]
                position += 2
            changed[(root / new).resolve()] = (root, old)
    return changed


def _utility_files(path: Path) -> dict[str, str]:
    """The utility module the file imports (``vendoring.py``), loaded from the target's copy of it (from
    ours while there is none yet)."""
    target = utility_target(path.resolve().parent)
    utility = str(target.file if target.file is not None and target.file.is_file() else SHIPPED_UTILITY)
    return {target.module: utility, f"{target.module}.loss_utils": utility}


def _statement_key(statement: cst.CSTNode) -> str:
    return code(statement.with_changes(leading_lines=()) if hasattr(statement, "leading_lines") else statement)


def _scope_path(module: cst.Module, scope) -> list[str]:
    """Names of the functions and classes enclosing ``scope`` (outermost first)."""
    if isinstance(scope, cst.Module):
        return []
    path: list[str] = []

    def search(node, trail) -> bool:
        for child in node.children:
            if child is scope:
                path.extend([*trail, scope.name.value])
                return True
            name = [child.name.value] if isinstance(child, cst.FunctionDef | cst.ClassDef) else []
            if search(child, trail + name):
                return True
        return False

    search(module, [])
    return path


def _find_scope(module: cst.Module, names: list[str]):
    if not names:
        return module
    node = module
    for name in names:
        matches = [n for n in m.findall(node, m.FunctionDef(name=m.Name(name)) | m.ClassDef(name=m.Name(name)))]
        if len(matches) != 1:
            return None
        node = matches[0]
    return node if isinstance(node, cst.FunctionDef) else None


def _mapped(old_block, new_block, index: int) -> int | None:
    """The position in ``new_block`` of ``old_block[index]`` (same statement, or its edited version)."""
    matcher = difflib.SequenceMatcher(None, [_statement_key(s) for s in old_block],
                                      [_statement_key(s) for s in new_block], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if i1 <= index < i2 and tag in ("equal", "replace") and j1 + index - i1 < j2:
            candidate = j1 + index - i1
            if type(new_block[candidate]) is type(old_block[index]):
                return candidate
    return None


def _region(old_block, new_block, start: int, stop: int) -> tuple[int, int, int, int]:
    """The old and new statement ranges that cover the site and the edits touching it."""
    matcher = difflib.SequenceMatcher(None, [_statement_key(s) for s in old_block],
                                      [_statement_key(s) for s in new_block], autojunk=False)
    opcodes = matcher.get_opcodes()
    old_start, old_stop = start, stop
    for tag, i1, i2, _, _ in opcodes:
        if tag != "equal" and i1 <= stop and i2 >= start:  # an edit that overlaps or touches the site
            old_start, old_stop = min(old_start, i1), max(old_stop, i2)
    new_start, new_stop = 0, len(new_block)
    for tag, i1, i2, j1, _ in opcodes:
        if tag != "equal":
            continue
        if i1 < old_start:
            new_start = max(new_start, j1 + min(i2, old_start) - i1)
        if i2 > old_stop:
            new_stop = min(new_stop, j1 + max(old_stop, i1) - i1)
    return old_start, old_stop, new_start, new_stop


def verify_file(path: Path, root: Path, old_path: str, revision: str) -> list[dict]:
    """One report per site of the old version that the current file changed."""
    from mtp_migrate.verify.worker import verify

    current = path.read_bytes()
    done = _git(["show", f"{revision}:{old_path}"], root)
    if done.returncode != 0:  # the file is new since the revision: nothing to compare with
        return []
    try:
        _, old_module = parse_source(done.stdout)
    except MigrationError as error:
        raise MigrationError(f"at {revision}: {error}") from None
    _, new_module = parse_source(current)
    if done.stdout == current:
        return []
    old_index, new_index = FlowIndex(), FlowIndex()
    utility = _utility_files(path)
    reports = []
    for site in find_sites(old_module):
        try:
            old_point, new_point = _matched(old_module, new_module, site)
            if old_point is None:
                continue  # unchanged
            program = build((old_point, old_index, old_module), (new_point, new_index, new_module), site.line,
                            utility=utility)
        except Refusal as refusal:
            reports.append({"line": site.line, "action": "rewritten", "code": refusal.code.code,
                            "reason": str(refusal), "verified": False})
            continue
        verdict = verify(program)
        reports.append({"line": site.line, "action": "rewritten", "code": verdict.code, "reason": verdict.reason,
                        "verified": verdict.ok})
    return sorted(reports, key=lambda report: report["line"])


def _matched(old_module, new_module, site) -> tuple[Point | None, Point | None]:
    """The old site's region and the new code's, or ``(None, None)`` if the site is unchanged."""
    old = locate(site.scope, site.loop)
    scope = _find_scope(new_module, _scope_path(old_module, site.scope))
    if scope is None:
        raise Refusal(Code.NOT_RUNNABLE, "cannot find the site's function in the new version")
    new_body = scope.body.body if isinstance(scope, cst.FunctionDef) else scope.body
    new_levels: list[Level] = []
    block = tuple(new_body)
    owner = scope
    role = "body"
    for level in reversed(old.levels[1:]):  # outermost first: follow the compound statements down
        position = _mapped(level.block, block, level.index)
        if position is None:
            raise Refusal(Code.NOT_RUNNABLE, "the blocks around the site changed too much to match")
        new_levels.insert(0, Level(block, position, owner, role))
        compound = block[position]
        inner = [b for b, _, _ in blocks_of(compound)]
        old_inner = [b for b, _, _ in blocks_of(level.block[level.index])]
        wanted = next(i for i, b in enumerate(old_inner) if tuple(b) == old.levels[old.levels.index(level) - 1].block)
        if wanted >= len(inner):
            raise Refusal(Code.NOT_RUNNABLE, "the blocks around the site changed too much to match")
        owner, role = compound, "body"
        block = tuple(inner[wanted])
    old_block = old.levels[0].block
    old_start, old_stop, new_start, new_stop = _region(old_block, block, site.start, site.stop)
    if [_statement_key(s) for s in old_block[old_start:old_stop]] == \
            [_statement_key(s) for s in block[new_start:new_stop]]:
        return None, None
    old_levels = (Level(old_block, old_start, old.levels[0].owner, old.levels[0].role), *old.levels[1:])
    new_levels.insert(0, Level(block, new_start, owner, role))
    return Point(old.scope, old_levels, old_stop), Point(scope, tuple(new_levels), new_stop)

