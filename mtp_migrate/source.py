"""Bytes in and out: encoding, BOM and line endings kept; syntax errors said as Python says them;
atomic writes that never leave a half-written file or overwrite a concurrent edit."""

from __future__ import annotations

import ast
import codecs
import io
import os
import re
import tempfile
import time
import tokenize
import warnings
from pathlib import Path

import libcst as cst

TEMP_SUFFIX = ".mtp-migrate"
# `.NAME.XXXXXXXX.mtp-migrate`, as write_atomic names its temp files (tempfile's 8 random characters).
_OWN_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
STALE_AFTER_S = 60  # a live temp file exists for milliseconds: older ones were left by a killed run


def stale_temp_file(path: Path) -> bool:
    """A temp file of ours that a killed ``apply`` left behind."""
    if not _OWN_TEMP.fullmatch(path.name):
        return False
    try:
        return time.time() - path.lstat().st_mtime > STALE_AFTER_S
    except OSError:
        return False


class MigrationError(Exception):
    """A file that cannot be migrated (not decodable, not parseable, not writable); the message says why."""


def check_bytes(data: bytes) -> None:
    """Refuse what is not Python source text before any parsing."""
    if b"\0" in data:
        raise MigrationError("binary file (contains NUL bytes)")
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        data.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError) as error:
        raise MigrationError(f"not valid text in its declared encoding: {str(error).splitlines()[0]}") from None


MAX_NODES = 50_000  # a pipeline has 1,000 to 10,000
MAX_BRACKETS = 200  # as Python's own parser allows
MAX_DEPTH = 1200  # syntax nesting: Python refuses 200 nested brackets; a 1000-term sum is 1000 deep


def _check_with_python(source: bytes) -> str | None:
    """Python's own parser first (fast, and safe where LibCST's native one crashes on deep nesting).

    Returns its message for a syntax error (``'(' was never closed (line 5, column 11)``), for
    LibCST to confirm: this interpreter may predate the syntax the file was written for. Raises
    for nesting or size past the limits.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except SyntaxError as error:
        where = f" (line {error.lineno}, column {error.offset})" if error.lineno else ""
        if "too many nested" in error.msg or _bracket_depth(source) > MAX_BRACKETS:  # LibCST crashes on these
            raise MigrationError(f"syntax error: {error.msg}{where}") from None
        return f"{error.msg}{where}"
    except (ValueError, RecursionError, MemoryError) as error:
        raise MigrationError(f"syntax error: {error}") from None
    stack, count = [(tree, 0, 1)], 0
    while stack:
        node, depth, line = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise MigrationError(f"over {MAX_NODES:,} syntax nodes (the analysis takes about 1 s per 1,000): "
                                 "left as it is")
        line = getattr(node, "lineno", line)
        if depth > MAX_DEPTH:
            raise MigrationError(f"nested more than {MAX_DEPTH} levels deep (line {line}): left as it is")
        stack.extend((child, depth + 1, line) for child in ast.iter_child_nodes(node))
    return None


def _bracket_depth(source: bytes) -> int:
    """The deepest bracket nesting, read by the tokenizer (which takes syntax newer than this Python's)."""
    depth = deepest = 0
    try:
        for token in tokenize.tokenize(io.BytesIO(source).readline):
            if token.type == tokenize.OP and token.string in "([{":
                depth += 1
                deepest = max(deepest, depth)
            elif token.type == tokenize.OP and token.string in ")]}":
                depth -= 1
    except (tokenize.TokenError, SyntaxError):
        pass
    return deepest


def parse_source(source: bytes) -> tuple[bytes, cst.Module]:
    """``(BOM, module)``; a syntax or encoding problem, or nesting too deep, becomes a ``MigrationError``."""
    bom = codecs.BOM_UTF8 if source.startswith(codecs.BOM_UTF8) else b""
    python_error = _check_with_python(source)
    try:
        return bom, cst.parse_module(source[len(bom):])
    except (cst.ParserSyntaxError, SyntaxError) as error:
        raise MigrationError(f"syntax error: {python_error or str(error).splitlines()[0]}") from None
    except (UnicodeDecodeError, LookupError) as error:
        raise MigrationError(f"cannot decode: {error}") from None


def write_atomic(path: Path, data: bytes, expected: bytes | None = None) -> None:
    """Write beside ``path``, then ``os.replace``: a killed run leaves the old file or the new one.

    With ``expected``, the file must still hold those bytes just before the replace;
    otherwise it was edited during the run, and it is left alone. A symlink is never written
    over (nor through).
    """
    if path.is_symlink():
        raise MigrationError("symlink (not followed); left as it is")
    status = path.stat() if path.exists() else None
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if status is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)  # a new file gets the mode open() would give it, not mkstemp's 0600
        else:
            os.chmod(temporary, status.st_mode & 0o7777)
            try:
                os.chown(temporary, status.st_uid, status.st_gid)
            except PermissionError:
                pass  # not ours to give away: the new file keeps our owner
        if expected is not None and (path.read_bytes() if path.exists() else b"") != expected:
            raise MigrationError("changed during the run; left as it is")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
