"""The target project's own line length, read as its formatter and linter read it.

``[tool.ruff] line-length`` or ``[tool.black] line-length`` in ``pyproject.toml``, else
flake8's ``max-line-length`` in ``setup.cfg`` or ``tox.ini``; the nearest folder above the
file that sets one wins, and the search stops at the repository root. The default is 88.
"""

from __future__ import annotations

import configparser
from functools import lru_cache
from pathlib import Path

import tomllib

from codemods.config import DEFAULT_LINE_LENGTH


def line_length(folder: Path) -> int:
    """The line length the project holding ``folder`` allows."""
    return _line_length(folder.resolve())


@lru_cache(maxsize=256)
def _line_length(folder: Path) -> int:
    for here in (folder, *folder.parents):
        found = _from_pyproject(here / "pyproject.toml") or _from_flake8(here / "setup.cfg") \
            or _from_flake8(here / "tox.ini")
        if found:
            return found
        if (here / ".git").exists():
            break
    return DEFAULT_LINE_LENGTH


def _from_pyproject(path: Path) -> int | None:
    try:
        tool = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
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
