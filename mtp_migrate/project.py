"""The target project around a file: the folders up to its root, its own line length, its
first-party modules and the utility module it configures.

The root is the nearest folder holding ``.git``, ``pyproject.toml``, ``setup.py`` or
``setup.cfg``. The line length is read as the project's formatter and linter read it:
``[tool.ruff] line-length`` or ``[tool.black] line-length`` in ``pyproject.toml``, else
flake8's ``max-line-length`` in ``setup.cfg`` or ``tox.ini``; the nearest folder that sets
one wins. The default is 88. ``[tool.mtp-migrate] utility-module`` is read the same way.
"""

from __future__ import annotations

import configparser
import tomllib
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

from mtp_migrate.config import DEFAULT_LINE_LENGTH

ROOT_MARKERS = (".git", "pyproject.toml", "setup.py", "setup.cfg")


@lru_cache(maxsize=1024)
def folders_up_to_root(start: Path) -> tuple[Path, ...]:
    """``start`` (resolved) and its parents, up to and including the project root (or the file system's)."""
    folders = []
    for folder in (start, *start.parents):
        folders.append(folder)
        if any((folder / marker).exists() for marker in ROOT_MARKERS):
            break
    return tuple(folders)


def project_root(start: Path) -> Path | None:
    """The root of the project holding ``start``, if it is in one."""
    folders = folders_up_to_root(start.resolve())
    return folders[-1] if any((folders[-1] / marker).exists() for marker in ROOT_MARKERS) else None


def first_party(folder: Path, pending: Iterable[Path] = ()) -> Callable[[str], bool]:
    """Whether an absolute import is first-party in a file in ``folder``, as ruff's isort decides by
    default: the module's path is a folder or a ``.py`` file (or one of the files ``pending`` to be
    written) under the project root (outside a project: where the command runs) or its ``src/``, or the
    module is in the file's own package."""
    folder = folder.resolve()
    root = project_root(folder) or Path.cwd().resolve()  # outside a project, ruff's root is where it runs
    package = folder if (folder / "__init__.py").is_file() else None
    while package is not None and (package.parent / "__init__.py").is_file():
        package = package.parent
    written = {path.resolve() for path in pending}

    def decide(module: str) -> bool:
        parts = module.split(".")
        if package is not None and parts[0] == package.name:
            return True
        for base in (root, root / "src"):
            path = base.joinpath(*parts)
            script = path.with_name(f"{parts[-1]}.py")
            if path.is_dir() or script.is_file() or script in written:
                return True
        return False

    return decide


def utility_module(folder: Path) -> str | None:
    """The ``[tool.mtp-migrate] utility-module`` that applies to ``folder`` (the nearest wins)."""
    for here in folders_up_to_root(folder.resolve()):
        settings = _tool(here / "pyproject.toml").get("mtp-migrate")
        value = settings.get("utility-module") if isinstance(settings, dict) else None
        if value is not None:
            return str(value)
    return None


def line_length(folder: Path) -> int:
    """The line length the project holding ``folder`` allows."""
    return _line_length(folder.resolve())


@lru_cache(maxsize=256)
def _line_length(folder: Path) -> int:
    for here in folders_up_to_root(folder):
        found = _from_pyproject(here / "pyproject.toml") or _from_flake8(here / "setup.cfg") \
            or _from_flake8(here / "tox.ini")
        if found:
            return found
    return DEFAULT_LINE_LENGTH


def _tool(path: Path) -> dict:
    """``[tool]`` of a ``pyproject.toml`` (empty if there is none or it cannot be read)."""
    try:
        tool = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    return tool if isinstance(tool, dict) else {}


def _from_pyproject(path: Path) -> int | None:
    tool = _tool(path)
    for section in ("ruff", "black"):
        value = tool.get(section, {}).get("line-length")
        if isinstance(value, int) and value > 0:
            return value
    return None


def _from_flake8(path: Path) -> int | None:
    parser = configparser.ConfigParser()
    try:
        parser.read_string(path.read_text(encoding="utf-8"))
        value = parser.getint("flake8", "max-line-length", fallback=None)
    except (OSError, UnicodeDecodeError, configparser.Error, ValueError):
        return None
    return value if value and value > 0 else None
