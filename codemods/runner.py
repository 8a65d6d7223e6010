"""Run the codemods on one file's bytes: encoding, BOM and line endings in, the same out."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

import libcst as cst
from libcst.codemod import CodemodContext

from codemods.commands._scratch import DEFAULT_UTILITY_MODULE, SITES
from codemods.commands.rewrite_mtp_loop import RewriteMTPLoopCommand


class MigrationError(Exception):
    """A file that cannot be migrated (not decodable, not parseable); the message says why."""


@dataclass
class FileResult:
    source: bytes
    output: bytes
    sites: list[dict] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.output != self.source


def migrate_source(source: bytes, filename: str = "<string>", *, rho1: str = "del",
                   utility_module: str = DEFAULT_UTILITY_MODULE) -> FileResult:
    """Apply ``RewriteMTPLoopCommand`` (and the commands it runs) to ``source``."""
    bom = codecs.BOM_UTF8 if source.startswith(codecs.BOM_UTF8) else b""
    try:
        module = cst.parse_module(source[len(bom):])
    except (cst.ParserSyntaxError, SyntaxError) as error:
        raise MigrationError(f"syntax error: {str(error).splitlines()[0]}") from None
    except (UnicodeDecodeError, LookupError) as error:
        raise MigrationError(f"cannot decode: {error}") from None
    context = CodemodContext(filename=filename)
    output = RewriteMTPLoopCommand(context, rho1=rho1, utility_module=utility_module).transform_module(module)
    sites = sorted(context.scratch.get(SITES, []), key=lambda site: site["line"])
    return FileResult(source, bom + output.bytes, sites)
