"""Where the utility the rewrite imports lives in the target tree, and whether it is ours.

Migrated code never depends on mtp-migrate: the utility is always written into the target
repository, and the rewrite imports it from there. The module is ``--utility-module``,
else ``[tool.mtp-migrate] utility-module`` in the target's ``pyproject.toml``, else
chosen for each pipeline's folder (``docs/cli.md``, "Where the utility goes"):

- the nearest ``weighted_mtp/utils/`` package, looking up from the pipeline to the project
  root (and in its ``src/``): our ``loss_utils.py`` is written into it (or is there already,
  byte-identical) and its ``__init__.py`` exports the functions;
- else ``mtp_loss_utils.py`` beside the pipeline: imported as ``mtp_loss_utils`` from a
  folder of scripts (``python pipelines/run_x.py`` puts the folder on ``sys.path``), by its
  dotted path (``pkg.pipelines.mtp_loss_utils``) where the folder is a package (``python -m``).

A module named explicitly is, looking up from the migrated file, a package in the tree
(as above), a module file (it must be byte-identical to ours), or absent with its parent
package in the tree (we write it); anything else is refused (MTP302).

Never over code we do not own: a different ``loss_utils.py``, a module that is not ours,
or an ``__init__.py`` that binds the names to something else leaves every file alone and
refuses the target's sites (MTP301), naming the file. ``--utility-module`` pointing at a
new module is the way out. Never through a symlink either: a symlinked package folder
(or a folder above it in the tree), ``__init__.py`` or module refuses the sites (MTP302).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import libcst as cst
import libcst.matchers as m
from libcst.codemod import CodemodContext

from mtp_migrate import project
from mtp_migrate.commands.export_utility import ExportUtilityCommand
from mtp_migrate.config import DEFAULT_UTILITY_MODULE, SHIPPED_UTILITY, UTILITY_NAMES, VENDORED_MODULE
from mtp_migrate.cst_utils import code
from mtp_migrate.refusals import Code, Refusal

DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class UtilityTarget:
    """How a target tree gets the utility: the files to write, or why it cannot."""

    module: str
    writes: dict = field(default_factory=dict)  # Path -> (old bytes, new bytes)
    problem: Refusal | None = None
    root: Path | None = None  # the folder the module is imported from
    file: Path | None = None  # the file that holds (or will hold) the utility's code


def _shipped() -> bytes:
    return SHIPPED_UTILITY.read_bytes()


def _is_ours(path: Path) -> bool:
    return path.resolve() == SHIPPED_UTILITY.resolve() or path.resolve().is_relative_to(SHIPPED_UTILITY.parent.resolve())


def _candidates(directory: Path, parts: list[str]):
    """``(package dir or module file, root)`` for the module under ``directory`` or ``directory/src``."""
    for root in (directory, directory / "src"):
        package = root.joinpath(*parts)
        if (package / "__init__.py").is_file():
            yield package, root
        module = root.joinpath(*parts[:-1], parts[-1] + ".py")
        if module.is_file():
            yield module, root


@lru_cache(maxsize=256)
def utility_target(directory: Path, module: str | None = None) -> UtilityTarget:
    """The utility module for files in ``directory``: ``module`` if given, else the configured or chosen one."""
    directory = directory.resolve()
    module = module or project.utility_module(directory)
    if module is None:
        return _chosen(directory)
    if not DOTTED.fullmatch(module):
        return UtilityTarget(module, problem=Refusal(
            Code.UTILITY_UNAVAILABLE, f"utility-module {module!r} in pyproject.toml is not a dotted module name"))
    parts = module.split(".")
    for folder in project.folders_up_to_root(directory):
        for found, root in _candidates(folder, parts):
            return _found(module, found, folder, root)
        for root in (folder, folder / "src"):
            parent = root.joinpath(*parts[:-1])
            if len(parts) > 1 and (parent / "__init__.py").is_file():
                path = parent / f"{parts[-1]}.py"
                if link := _symlink_below(folder, (parent / "__init__.py", path)):
                    return UtilityTarget(module, problem=_through_symlink(link), root=root)
                return UtilityTarget(module, {path: (b"", _shipped())}, root=root, file=path)
    return UtilityTarget(module, problem=Refusal(
        Code.UTILITY_UNAVAILABLE, f"utility module {module}: no package `{'.'.join(parts[:-1]) or parts[0]}` "
                                  f"above {directory} to write it into"))


def _found(module: str, found: Path, folder: Path, root: Path) -> UtilityTarget:
    """``module`` at ``found`` (a package folder or a module file) below ``folder``, imported from ``root``."""
    files = (found / "__init__.py", found / "loss_utils.py") if found.is_dir() else (found,)
    if link := _symlink_below(folder, files):
        return UtilityTarget(module, problem=_through_symlink(link), root=root)
    target = _into_package(module, found) if found.is_dir() else _module_file(module, found)
    return replace(target, root=root)


def _symlink_below(folder: Path, files) -> Path | None:
    """The first symlink on the way down from ``folder`` to any of ``files`` (them included)."""
    for file in files:
        path = folder
        for part in file.relative_to(folder).parts:
            path = path / part
            if path.is_symlink():
                return path
    return None


def _through_symlink(link: Path) -> Refusal:
    return Refusal(Code.UTILITY_UNAVAILABLE, f"{link} is a symlink (not followed): mtp-migrate writes no file "
                                             "through one; replace it with what it points to, or pass "
                                             "--utility-module with another module")


def imports_utility(source: bytes, module: str) -> bool:
    """``source`` imports the utility's functions from ``module``: a file migrated before, which needs it too."""
    if module.encode() not in source:
        return False
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return any(isinstance(node, ast.ImportFrom) and not node.level and node.module in (module, f"{module}.loss_utils")
               and any(alias.name in UTILITY_NAMES for alias in node.names) for node in ast.walk(tree))


def _chosen(directory: Path) -> UtilityTarget:
    """The nearest ``weighted_mtp/utils/`` package, else ``mtp_loss_utils.py`` beside the pipeline."""
    parts = DEFAULT_UTILITY_MODULE.split(".")
    for folder in project.folders_up_to_root(directory):
        for found, root in _candidates(folder, parts):
            if found.is_dir():
                return _found(DEFAULT_UTILITY_MODULE, found, folder, root)
    root, packages = directory, []
    while (root / "__init__.py").is_file():  # a package's modules are imported by their dotted path
        packages.insert(0, root.name)
        root = root.parent
    module = ".".join([*packages, VENDORED_MODULE])
    path = directory / f"{VENDORED_MODULE}.py"
    if (directory / VENDORED_MODULE).exists():  # a package of that name would be what the import finds
        return UtilityTarget(module, problem=Refusal(
            Code.FOREIGN_UTILITY, f"{directory / VENDORED_MODULE} is not mtp-migrate's loss utility; pass "
                                  "--utility-module with a new module to migrate anyway"))
    if path.is_symlink():
        return UtilityTarget(module, problem=_through_symlink(path), root=root)
    if path.exists():
        return replace(_module_file(module, path), root=root)
    return UtilityTarget(module, {path: (b"", _shipped())}, root=root, file=path)


def _module_file(module: str, path: Path) -> UtilityTarget:
    if _is_ours(path) or path.read_bytes() == _shipped():
        return UtilityTarget(module, file=path)
    return UtilityTarget(module, problem=Refusal(
        Code.FOREIGN_UTILITY, f"{path} is not mtp-migrate's loss utility (it differs); pass --utility-module "
                              "with a new module to migrate anyway"), file=path)


def _into_package(module: str, package: Path) -> UtilityTarget:
    utility = package / "loss_utils.py"
    if _is_ours(utility):
        return UtilityTarget(module, file=utility)
    writes = {}
    if utility.exists():
        if utility.read_bytes() != _shipped():
            return UtilityTarget(module, problem=Refusal(
                Code.FOREIGN_UTILITY, f"{utility} exists and is not mtp-migrate's (it differs); pass "
                                      "--utility-module with a new module to migrate anyway"), file=utility)
    else:
        writes[utility] = (b"", _shipped())
    init = package / "__init__.py"
    old = init.read_bytes()
    try:
        tree = cst.parse_module(old)
    except cst.ParserSyntaxError:
        return UtilityTarget(module, problem=Refusal(Code.FOREIGN_UTILITY, f"{init} does not parse"))
    foreign = _foreign_bindings(tree, module)
    if foreign:
        return UtilityTarget(module, problem=Refusal(
            Code.FOREIGN_UTILITY, f"{init} binds `{foreign}` to something other than mtp-migrate's loss_utils; pass "
                                  "--utility-module with a new module to migrate anyway"))
    command = ExportUtilityCommand(CodemodContext(filename=str(init)), module, project.line_length(package),
                                   project.first_party(package, [utility]))
    new = command.transform_module(tree).bytes
    if new != old:
        writes[init] = (old, new)
    return UtilityTarget(module, writes, file=utility)


def _foreign_bindings(tree: cst.Module, module: str) -> str | None:
    """A utility name the package's ``__init__`` binds other than from our ``loss_utils``."""
    ours = {".loss_utils", f"{module}.loss_utils"}
    for node in m.findall(tree, m.FunctionDef() | m.ClassDef() | m.Assign() | m.Import() | m.ImportFrom()):
        if isinstance(node, cst.ImportFrom):
            source = "." * len(node.relative) + (code(node.module) if node.module else "")
            if isinstance(node.names, cst.ImportStar):
                if source not in ours:  # `from .legacy import *` may rebind the utility's names after our export
                    return f"* (from {source})"
                continue
            for alias in node.names:
                bound = alias.asname.name.value if alias.asname else alias.evaluated_name
                if bound in UTILITY_NAMES and (source not in ours or alias.evaluated_name != bound):
                    return bound
        elif isinstance(node, cst.FunctionDef | cst.ClassDef) and node.name.value in UTILITY_NAMES:
            return node.name.value
        elif isinstance(node, cst.Assign):
            for target in node.targets:
                if m.matches(target.target, m.Name()) and target.target.value in UTILITY_NAMES:
                    return target.target.value
    return None
