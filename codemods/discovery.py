"""Find the files to migrate: PATHS, include/exclude globs, .gitignore, no venvs or .git."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pathspec

SKIPPED_DIRS = {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", "venv", ".tox", ".nox",
                ".mypy_cache", ".ruff_cache", ".pytest_cache", "site-packages"}


@dataclass(frozen=True)
class Candidate:
    path: Path
    problem: str | None = None  # a one-line reason the file is not processed
    skipped: bool = False  # the problem is a deliberate skip (a symlink), not an error


def _is_virtualenv(directory: Path) -> bool:
    return (directory / "pyvenv.cfg").is_file()


def _matches(path: Path, patterns: tuple[str, ...]) -> bool:
    text = path.as_posix()
    return any(fnmatch(path.name, pattern) or fnmatch(text, pattern) for pattern in patterns)


def discover(paths: tuple[Path, ...], include: tuple[str, ...], exclude: tuple[str, ...]) -> Iterator[Candidate]:
    """Files under ``paths`` matching ``include`` (explicit files always count), in sorted order."""
    seen: set[Path] = set()
    for root in paths:
        if root.is_symlink() and not root.exists():
            yield Candidate(root, "broken symlink or symlink loop")
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


def _once(candidate: Candidate, seen: set[Path]) -> Iterator[Candidate]:
    if candidate.path not in seen:
        seen.add(candidate.path)
        yield candidate


def _file_candidate(path: Path) -> Candidate:
    if path.is_symlink():
        if not path.exists():
            return Candidate(path, "broken symlink or symlink loop")
        return Candidate(path, "symlink (not followed)", skipped=True)
    return Candidate(path)


def _walk(root: Path, include, exclude) -> Iterator[Candidate]:
    ignores: list[tuple[Path, pathspec.PathSpec]] = []
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        gitignore = here / ".gitignore"
        if gitignore.is_file():
            try:
                lines = gitignore.read_text(encoding="utf-8", errors="replace").splitlines()
                ignores.append((here, pathspec.GitIgnoreSpec.from_lines(lines)))
            except OSError:
                pass

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
            if not _matches(path, include) or _matches(path, exclude) or ignored(path, False):
                continue
            yield _file_candidate(path)
