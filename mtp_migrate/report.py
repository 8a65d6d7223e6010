"""What the commands print: the patch, the summary, JSON and GitHub annotations."""

from __future__ import annotations

import difflib
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table


@dataclass
class FileReport:
    path: str
    status: str  # changed | unchanged | skipped | error
    error: str | None = None
    sites: list[dict] = field(default_factory=list)
    source: bytes = b""
    output: bytes = b""
    rewrote: bool = False
    internal: bool = False  # the error is a bug of ours (exit 3), not the input's
    guards: list = field(default_factory=list)  # --emit-tests: what the rewritten sites' tests need
    import_root: Path | None = None

    def as_dict(self) -> dict:
        return {"path": self.path, "status": self.status, "error": self.error, "sites": self.sites}


_PENDING = {"rewritten": "rewrite to the utility", "del_inserted": "del of the loop's temporaries"}
_STYLES = (("---", "\x1b[1m"), ("+++", "\x1b[1m"), ("@@", "\x1b[36m"), ("+", "\x1b[32m"), ("-", "\x1b[31m"))


def unified_diff(report: FileReport) -> bytes:
    """The patch from ``source`` to ``output``, byte for byte (CRLF, BOM and missing final newlines kept)."""
    old = report.source.decode("utf-8", "surrogateescape").splitlines(keepends=True)
    new = report.output.decode("utf-8", "surrogateescape").splitlines(keepends=True)
    lines = []
    for line in difflib.unified_diff(old, new, _label("a/", report.path), _label("b/", report.path), n=3):
        if line.startswith(("---", "+++")):
            lines.append(line.rstrip("\n") + "\n")
        elif line.endswith(("\n", "\r")):
            lines.append(line)
        else:
            lines.append(line + "\n\\ No newline at end of file\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


# How git writes each byte of a name it must quote (quote.c): C escapes, octal for the rest.
_ESCAPES = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r", 34: '\\"', 92: "\\\\"}


def _label(prefix: str, path: str) -> str:
    """``prefix + path`` as git writes it in a patch header: quoted, with C escapes, when it holds a control
    character, a quote, a backslash or a non-ASCII byte (so a newline cannot break the patch); a space ends
    it with a tab."""
    quoted = [_ESCAPES.get(byte, f"\\{byte:03o}") if byte < 32 or byte >= 127 or byte in _ESCAPES else chr(byte)
              for byte in os.fsencode(prefix + path)]
    if any(len(text) > 1 for text in quoted):
        return f'"{"".join(quoted)}"'
    return prefix + path + ("\t" if " " in path else "")


def write_diff(patch: bytes, color: bool) -> None:
    if color:
        colored = []
        for line in patch.splitlines(keepends=True):
            style = next((s for prefix, s in _STYLES if line.startswith(prefix.encode())), None)
            body = line.rstrip(b"\r\n")
            colored.append(style.encode() + body + b"\x1b[0m" + line[len(body):] if style else line)
        patch = b"".join(colored)
    sys.stdout.buffer.write(patch)
    sys.stdout.flush()


def summary_of(reports: list[FileReport]) -> dict:
    statuses = Counter(r.status for r in reports)
    counted = [s for r in reports if r.status != "error" for s in r.sites]  # a file not written counts nothing
    actions = Counter(s["action"] for s in counted)
    return {"files": len(reports), "changed": statuses["changed"], "unchanged": statuses["unchanged"],
            "skipped": statuses["skipped"], "errors": statuses["error"],
            "sites_rewritten": actions["rewritten"], "dels_inserted": actions["del_inserted"],
            "sites_skipped": actions["skipped"], "sites_verified": sum(s["verified"] for s in counted)}


def print_summary(console: Console, reports: list[FileReport], summary: dict, verb: str, quiet: bool) -> None:
    if not quiet:
        table = Table(title=f"mtp-migrate {verb}", show_header=False, title_justify="left")
        pending = verb in ("diff", "check")
        rows = [("files scanned", "files"), ("files to change" if pending else "files changed", "changed"),
                ("sites rewritten", "sites_rewritten"), ("sites verified", "sites_verified"),
                ("dels inserted", "dels_inserted"), ("sites skipped", "sites_skipped"), ("errors", "errors")]
        for label, key in rows:
            table.add_row(label, str(summary[key]), style="red" if key == "errors" and summary[key] else None)
        console.print(table)
        for report in reports:
            if report.status == "skipped" and report.error:  # a file left alone as a whole (a symlink)
                console.print(f"skipped {report.path}: {report.error}", markup=False, highlight=False,
                              style="yellow", soft_wrap=True)
            elif pending and report.status == "changed" and not report.sites:  # the utility, a test module
                console.print(f"pending {report.path}: written with the migration", markup=False, highlight=False,
                              soft_wrap=True)
            for site in report.sites:
                if site["action"] == "skipped":
                    console.print(f"skipped {report.path}:{site['line']}: {site['reason']} "
                                  f"(mtp-migrate explain {site['code']})", markup=False, highlight=False,
                                  style="yellow", soft_wrap=True)
                elif pending and report.status == "changed":
                    verified = "verified" if site["verified"] else "not verified"
                    console.print(f"pending {report.path}:{site['line']}: {_PENDING[site['action']]} ({verified})",
                                  markup=False, highlight=False, soft_wrap=True)
    for report in reports:
        if report.status == "error":
            console.print(f"error: {report.path}: {report.error}", markup=False, highlight=False, style="red",
                          soft_wrap=True)


def consoles(color: str) -> tuple[Console, Console]:
    settings = {"always": {"force_terminal": True}, "never": {"color_system": None}, "auto": {}}[color]
    return Console(highlight=False, **settings), Console(stderr=True, highlight=False, **settings)


def github_annotations(reports: list[FileReport], verb: str) -> None:
    """``::warning file=…,line=…::`` for every pending and refused site, ``::error`` for every file error."""
    def escape(text: str) -> str:
        return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    for report in reports:
        where = escape(report.path).replace(",", "%2C").replace(":", "%3A")
        if report.status == "error":
            click.echo(f"::error file={where},title=mtp-migrate::{escape(report.error or '')}")
        for site in report.sites:
            if site["action"] == "skipped":
                message = f"left as it is: {site['reason']} (mtp-migrate explain {site['code']})"
            elif verb in ("diff", "check"):
                message = f"{site['action'].replace('_', ' ')} pending: run `mtp-migrate apply`"
            else:
                continue
            click.echo(f"::warning file={where},line={site['line']},title=mtp-migrate::{escape(message)}")
