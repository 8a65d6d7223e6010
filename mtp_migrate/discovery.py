"""Find the files to migrate: PATHS, include/exclude globs, .gitignore, no venvs or .git."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pathspec

from mtp_migrate.source import stale_temp_file

SKIPPED_DIRS = {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".nox",
                ".mypy_cache", ".ruff_cache", ".pytest_cache", "site-packages", ".mtp_migrate_cache"}


@dataclass(frozen=True)
class Candidate:
    path: Path
    problem: str | None = None  # a one-line reason the file is not processed
    skipped: bool = False  # the problem is a deliberate skip (a symlink), not an error
    stale: bool = False  # a temp file a killed run of ours left: apply removes it


def _is_virtualenv(directory: Path) -> bool:
    try:
        return (directory / "pyvenv.cfg").is_file()
    except OSError:
        return False


def undecodable(path: Path) -> bool:
    """A name the file system gave as bytes that are not UTF-8 (Python holds them as surrogates)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def shown(path: Path | str) -> str:
    """``path`` as text that can be printed: undecodable bytes as ``\\xff`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _matches(path: Path, patterns: tuple[str, ...]) -> bool:
    text = path.as_posix()
    return any(fnmatch(path.name, pattern) or fnmatch(text, pattern) for pattern in patterns)


def discover(paths: tuple[Path, ...], include: tuple[str, ...], exclude: tuple[str, ...]) -> Iterator[Candidate]:
    """Files under ``paths`` matching ``include`` (explicit files always count), in sorted order."""
    seen: set[Path] = set()
    for root in paths:
        if root.is_symlink() and not root.exists():
            yield _file_candidate(root)
            continue
        if not root.exists():
            yield Candidate(root, "no such file or directory")
            continue
        if root.is_file():
            if not _matches(root, exclude):
                yield from _once(_file_candidate(root), seen)
            continue
        for candidate in sorted(_walk(root, include, exclude), key=lambda c: c.path.as_posix()):
            yield from _once(candidate, seen)


def wanted(path: Path, paths: tuple[Path, ...], include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Whether a search of the folders ``paths`` would pick ``path``, which need not exist (a file deleted
    since a git revision): under one of them, past no skipped or excluded folder, and matching ``include``."""
    for root in paths:
        try:
            parts = path.resolve().relative_to(root.resolve()).parts
        except ValueError:
            continue
        folders = [root.joinpath(*parts[:depth]) for depth in range(1, len(parts))]
        if root.is_dir() and not any(folder.name in SKIPPED_DIRS or _matches(folder, exclude) for folder in folders) \
                and _matches(root.joinpath(*parts), include) and not _matches(root.joinpath(*parts), exclude):
            return True
    return False


def _once(candidate: Candidate, seen: set[Path]) -> Iterator[Candidate]:
    if candidate.path not in seen:
        seen.add(candidate.path)
        yield candidate


def _file_candidate(path: Path) -> Candidate:
    if undecodable(path):
        return Candidate(path, "file name is not valid UTF-8")
    if path.is_symlink():  # broken or not: its target is another file's business
        return Candidate(path, "symlink (not followed)", skipped=True)
    return Candidate(path)


def _walk(root: Path, include, exclude) -> Iterator[Candidate]:
    ignores: list[tuple[Path, pathspec.PathSpec]] = []
    unreadable: list[OSError] = []
    for directory, dirnames, filenames in os.walk(root, onerror=unreadable.append):
        while unreadable:
            yield _unreadable_directory(unreadable.pop())
        here = Path(directory)
        try:
            lines = (here / ".gitignore").read_text(encoding="utf-8", errors="replace").splitlines()
            ignores.append((here, pathspec.GitIgnoreSpec.from_lines(lines)))
        except OSError:
            pass  # none, or unreadable: nothing to ignore here

        def ignored(path: Path, is_dir: bool) -> bool:
            for base, spec in ignores:
                if base == path or base in path.parents:
                    relative = path.relative_to(base).as_posix() + ("/" if is_dir else "")
                    if spec.match_file(relative):
                        return True
            return False

        kept = []
        for name in sorted(dirnames):
            sub = here / name
            if name in SKIPPED_DIRS or sub.is_symlink() or _is_virtualenv(sub) or ignored(sub, True):
                continue
            if _matches(sub, exclude):
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            path = here / name
            if stale_temp_file(path):
                yield Candidate(path, "temp file left by an interrupted run", stale=True)
                continue
            if not _matches(path, include) or _matches(path, exclude) or ignored(path, False):
                continue
            yield _file_candidate(path)
    for error in unreadable:  # the last folder walked
        yield _unreadable_directory(error)


def _unreadable_directory(error: OSError) -> Candidate:
    return Candidate(Path(error.filename), f"cannot read directory: {error.strerror or error}")
