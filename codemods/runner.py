"""Run the codemods on one file: encoding, BOM and line endings in, the same out."""

from __future__ import annotations

import codecs
import io
import os
import tempfile
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import libcst as cst
from libcst.codemod import CodemodContext

from codemods.commands._scratch import DEFAULT_UTILITY_MODULE, SITES
from codemods.commands.rewrite_mtp_loop import RewriteMTPLoopCommand, plan


class MigrationError(Exception):
    """A file that cannot be migrated (not decodable, not parseable); the message says why."""


@dataclass
class FileResult:
    source: bytes
    output: bytes
    sites: list[dict] = field(default_factory=list)
    pending: bool = False  # a survey found changes it did not make

    @property
    def changed(self) -> bool:
        return self.pending or self.output != self.source


def parse_source(source: bytes) -> tuple[bytes, cst.Module]:
    """``(BOM, module)``; a syntax or encoding problem becomes a ``MigrationError``."""
    bom = codecs.BOM_UTF8 if source.startswith(codecs.BOM_UTF8) else b""
    try:
        return bom, cst.parse_module(source[len(bom):])
    except (cst.ParserSyntaxError, SyntaxError) as error:
        raise MigrationError(f"syntax error: {str(error).splitlines()[0]}") from None
    except (UnicodeDecodeError, LookupError) as error:
        raise MigrationError(f"cannot decode: {error}") from None


def survey_source(source: bytes, *, rho1: str = "del") -> list[dict]:
    """The site reports ``migrate_source`` would give, without transforming (for ``check``)."""
    _, module = parse_source(source)
    return [{"line": site.line, "action": action, "reason": reason, "verified": False}
            for site, action, reason in plan(module, rho1)]


def migrate_source(source: bytes, filename: str = "<string>", *, rho1: str = "del",
                   utility_module: str = DEFAULT_UTILITY_MODULE, verify: bool = False) -> FileResult:
    """Apply ``RewriteMTPLoopCommand`` (and the commands it runs) to ``source``."""
    bom, module = parse_source(source)
    context = CodemodContext(filename=filename)
    command = RewriteMTPLoopCommand(context, rho1=rho1, utility_module=utility_module, verify=verify)
    output = command.transform_module(module)
    sites = sorted(context.scratch.get(SITES, []), key=lambda site: site["line"])
    return FileResult(source, bom + output.bytes, sites)


# A file without this text cannot hold a site: it is never parsed.
PREFILTER = b"cross_entropy"


def check_bytes(data: bytes) -> None:
    """Refuse what is not Python source text before any parsing."""
    if not data.strip():
        raise MigrationError("empty file")
    if b"\0" in data:
        raise MigrationError("binary file (contains NUL bytes)")
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        data.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError) as error:
        raise MigrationError(f"not valid text in its declared encoding: {str(error).splitlines()[0]}") from None


def migrate_file(path: Path, *, rho1: str = "del", utility_module: str = DEFAULT_UTILITY_MODULE,
                 transform: bool = True, verify: bool = False) -> FileResult:
    """Read, check and migrate one file; ``transform=False`` only reports its sites."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MigrationError(f"cannot read: {error.strerror or error}") from None
    check_bytes(data)
    if PREFILTER not in data:
        return FileResult(data, data)
    if not transform:
        sites = survey_source(data, rho1=rho1)
        return FileResult(data, data, sites, pending=any(site["action"] != "skipped" for site in sites))
    return migrate_source(data, str(path), rho1=rho1, utility_module=utility_module, verify=verify)


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside ``path``, then ``os.replace``: a killed run leaves the old file or the new one."""
    mode = path.stat().st_mode if path.exists() else None
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".mtp-migrate")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
