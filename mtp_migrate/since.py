"""``mtp-migrate verify --base REV``: check every site changed since a git revision.

For each file that differs from its version at REV (renames followed), every head loop
of the old version whose statements changed is matched with the code that replaced it
(the enclosing function by name, then the blocks by their unchanged statements) and the
two are verified like a rewrite: the same independent programs, the same input domain.
The new code's utility import runs the target's own utility module where the tree has
one, so a drifted copy of ``loss_utils.py`` is caught too.
"""

from __future__ import annotations

import ast
import difflib
import subprocess
from pathlib import Path

import libcst as cst
import libcst.matchers as m

from mtp_migrate.config import UTILITY_NAMES
from mtp_migrate.cst_utils import code
from mtp_migrate.flow.dataflow import FlowIndex, Level, Point, blocks_of, locate
from mtp_migrate.mtp_loop.find import find_sites
from mtp_migrate.mtp_loop.losses import PREFILTER
from mtp_migrate.refusals import Code, Refusal
from mtp_migrate.source import MigrationError, check_bytes, parse_source
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


def changed_files(paths, revision: str, wanted) -> dict[Path, tuple[Path, str]]:
    """``{working file: (repository root, its path at revision)}`` for files that differ from ``revision``.

    A ``wanted`` file deleted since then that may hold a loop was renamed past git's similarity
    threshold, or deleted: it is paired with the most similar ``wanted`` added file, and one left
    unpaired stays under its old path (which no longer exists), for ``verify_file`` to report.
    """
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
        deleted, added = {}, []
        while position < len(fields) and fields[position]:
            status = fields[position]
            if status.startswith(("R", "C")):
                old, new = fields[position + 1], fields[position + 2]
                position += 3
            else:
                old = new = fields[position + 1]
                position += 2
            if status == "D":
                if wanted(root / old):
                    deleted[(root / old).resolve()] = old
                continue
            if status == "A" and wanted(root / new):
                added.append((root / new).resolve())
            changed[(root / new).resolve()] = (root, old)
        changed.update(_paired(root, revision, deleted, added))
    return changed


def _paired(root: Path, revision: str, deleted: dict[Path, str], added: list[Path]) -> dict[Path, tuple[Path, str]]:
    """Each deleted file that may hold a loop, by the added file most like it (greedily, most alike
    first), or by itself if none is left."""
    olds = {}
    for path, old in deleted.items():
        text = _git(["show", f"{revision}:{old}"], root).stdout
        if any(marker in text for marker in PREFILTER):
            olds[path] = (old, text)
    news = {path: path.read_bytes() for path in added}
    likeness = sorted(((_likeness(text, news[new]), str(path), str(new)) for path, (_, text) in olds.items()
                       for new in news), reverse=True)
    pairs = {}
    for _, path, new in likeness:
        if Path(path) in olds and Path(new) not in pairs:
            pairs[Path(new)] = (root, olds.pop(Path(path))[0])
    return {**pairs, **{path: (root, old) for path, (old, _) in olds.items()}}


def _likeness(old: bytes, new: bytes) -> tuple[float, float]:
    """How much of the old file the new one keeps: its function names first (loops are matched by them),
    then its lines."""
    names = [_function_names(text) for text in (old, new)]
    lines = old.splitlines()
    matcher = difflib.SequenceMatcher(None, lines, new.splitlines(), autojunk=False)
    kept = sum(block.size for block in matcher.get_matching_blocks())
    return len(names[0] & names[1]) / max(1, len(names[0])), kept / max(1, len(lines))


def _function_names(source: bytes) -> set[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return set()
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def utility_files(path: Path, root: Path, module: str | None = None) -> dict[str, str]:
    """``{module name: file}`` for the utility the new code of ``path`` imports (``module``, else the one
    ``vendoring.py`` chooses): the target's own file (for a package, its ``loss_utils.py`` or the file its
    ``__init__`` imports the utility from), loaded by path, never through the package; ours where the
    target has none of its own."""
    target = utility_target(path.resolve().parent, module)
    module, parts = target.module, target.module.split(".")
    for base in dict.fromkeys(base for base in (target.root, root, root / "src") if base is not None):
        package, single = base.joinpath(*parts), base.joinpath(*parts[:-1], f"{parts[-1]}.py")
        if single.is_file():
            return {module: str(single)}
        if (package / "__init__.py").is_file():
            found = _defining_file(package)
            return {module: str(found), f"{module}.{found.stem}": str(found)}
    return {module: str(SHIPPED_UTILITY), f"{module}.loss_utils": str(SHIPPED_UTILITY)}


def _defining_file(package: Path) -> Path:
    """The file of ``package`` that defines the utility: ``loss_utils.py``, else the module its
    ``__init__`` imports ``compute_mtp_ce_loss`` from, else the ``__init__`` itself."""
    if (package / "loss_utils.py").is_file():
        return package / "loss_utils.py"
    try:
        tree = ast.parse((package / "__init__.py").read_bytes())
    except (OSError, SyntaxError, ValueError):
        return package / "__init__.py"
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and \
                any(alias.name in UTILITY_NAMES for alias in node.names):
            candidate = package.joinpath(*node.module.split(".")).with_suffix(".py")
            if candidate.is_file():
                return candidate
    return package / "__init__.py"


def _statement_key(statement: cst.CSTNode) -> str:
    return code(statement.with_changes(leading_lines=()) if hasattr(statement, "leading_lines") else statement)


def _header_key(statement: cst.CSTNode) -> str:
    """A compound statement by its header (``for batch in loader:``), a simple one whole: the blocks
    around a site are matched by what encloses it, however much their bodies changed."""
    if isinstance(statement, cst.BaseCompoundStatement):
        return _statement_key(statement).lstrip().split("\n", 1)[0]
    return _statement_key(statement)


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
    matcher = difflib.SequenceMatcher(None, [_header_key(s) for s in old_block],
                                      [_header_key(s) for s in new_block], autojunk=False)
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


def verify_file(path: Path, root: Path, old_path: str, revision: str,
                utility_module: str | None = None) -> list[dict]:
    """One report per site of the old version that the current file changed (all of them, unjudged,
    if the file is gone)."""
    from mtp_migrate.verify.worker import verify

    done = _git(["show", f"{revision}:{old_path}"], root)
    if done.returncode != 0:  # the file is new since the revision: nothing to compare with
        return []
    try:
        check_bytes(done.stdout)
        _, old_module = parse_source(done.stdout)
    except MigrationError as error:
        raise MigrationError(f"at {revision}: {error}") from None
    if not path.exists():
        gone = Refusal(Code.NOT_RUNNABLE, f"{old_path} is gone since {revision} (deleted, or renamed and edited past "
                                          "git's rename detection with no new file to pair it with): its loop "
                                          "cannot be judged")
        return [{"line": site.line, "action": "rewritten", "code": gone.code.code, "reason": str(gone),
                 "verified": False} for site in find_sites(old_module)]
    current = path.read_bytes()
    check_bytes(current)
    _, new_module = parse_source(current)
    if done.stdout == current:
        return []
    old_index, new_index = FlowIndex(), FlowIndex()
    utility = utility_files(path, root, utility_module)
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

