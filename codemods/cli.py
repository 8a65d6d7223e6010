"""The ``mtp-migrate`` command line: diff, apply, check, verify, explain (see ``docs/cli.md``).

``diff``, ``check`` and ``apply`` run the same plan, verification included: ``diff``
prints exactly the patch ``apply`` would write, and ``check`` exits 0 after ``apply``.

Exit codes: 0 nothing to change / written / equivalent; 1 changes pending / not
equivalent; 2 any file could not be read, parsed or written, or a usage error. Every
file is processed whatever happens to the others.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from codemods.config import DEFAULT_RHO1, DEFAULT_UTILITY_MODULE, RHO1_MODES
from codemods.discovery import discover
from codemods.refusals import Code
from codemods.runner import migrate_file, rewrote
from codemods.source import MigrationError, write_atomic
from codemods.vendoring import utility_target

DOCS = Path(__file__).parents[1] / "docs"


@dataclass
class FileReport:
    path: str
    status: str  # changed | unchanged | skipped | error
    error: str | None = None
    sites: list[dict] = field(default_factory=list)
    source: bytes = b""
    output: bytes = b""
    rewrote: bool = False

    def as_dict(self) -> dict:
        return {"path": self.path, "status": self.status, "error": self.error, "sites": self.sites}


def process(path: str, rho1: str, utility_module: str, verify: bool) -> FileReport:
    """One file, never raising: bad input becomes an ``error`` report (runs in a worker)."""
    try:
        result = migrate_file(Path(path), rho1=rho1, utility_module=utility_module, verify=verify)
    except MigrationError as error:
        return FileReport(path, "error", str(error))
    except Exception as error:  # a bug of ours must not stop the batch either
        return FileReport(path, "error", f"internal error: {type(error).__name__}: {error}")
    sites = [site.as_dict() for site in result.sites]
    if result.changed:
        status = "changed"
    elif any(site["action"] == "skipped" for site in sites):
        status = "skipped"
    else:
        status = "unchanged"
    return FileReport(path, status, None, sites, result.source, result.output, rewrote(result))


def _process_all(candidates, options, jobs: int, console: Console) -> list[FileReport]:
    reports = {c.path.as_posix(): _problem_report(c) for c in candidates if c.problem}
    todo = [c.path.as_posix() for c in candidates if not c.problem]
    jobs = max(1, min(jobs, len(todo)))
    show_progress = console.is_terminal and len(todo) > 1
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not show_progress) as progress:
        task = progress.add_task("migrating", total=len(todo))
        work = partial(process, **options)
        if jobs > 1:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                results = pool.map(work, todo, chunksize=max(1, min(64, len(todo) // (4 * jobs))))
                for report in results:
                    reports[report.path] = report
                    progress.advance(task)
        else:
            for path in todo:
                reports[path] = work(path)
                progress.advance(task)
    return [reports[key] for key in sorted(reports)]


def _problem_report(candidate) -> FileReport:
    return FileReport(candidate.path.as_posix(), "skipped" if candidate.skipped else "error", candidate.problem)


def _vendoring_reports(reports: list[FileReport], utility_module: str) -> list[FileReport]:
    """The utility module written into each target whose files got a rewrite (never over code we do not own)."""
    writes: dict[Path, tuple[bytes, bytes]] = {}
    for report in reports:
        if report.rewrote:
            writes.update(utility_target(Path(report.path).resolve().parent, utility_module).writes)
    return [FileReport(path.as_posix(), "changed", None, [], old, new, False) for path, (old, new) in sorted(writes.items())]


_STYLES = (("---", "\x1b[1m"), ("+++", "\x1b[1m"), ("@@", "\x1b[36m"), ("+", "\x1b[32m"), ("-", "\x1b[31m"))


def unified_diff(report: FileReport) -> bytes:
    """The patch from ``source`` to ``output``, byte for byte (CRLF, BOM and missing final newlines kept)."""
    old = report.source.decode("utf-8", "surrogateescape").splitlines(keepends=True)
    new = report.output.decode("utf-8", "surrogateescape").splitlines(keepends=True)
    name = report.path
    lines = []
    for line in difflib.unified_diff(old, new, f"a/{name}", f"b/{name}", n=3):
        if line.startswith(("---", "+++")):
            lines.append(line.rstrip("\n") + "\n")
        elif line.endswith(("\n", "\r")):
            lines.append(line)
        else:
            lines.append(line + "\n\\ No newline at end of file\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _write_diff(patch: bytes, color: bool) -> None:
    if color:
        colored = []
        for line in patch.splitlines(keepends=True):
            style = next((s for prefix, s in _STYLES if line.startswith(prefix.encode())), None)
            body = line.rstrip(b"\r\n")
            colored.append(style.encode() + body + b"\x1b[0m" + line[len(body):] if style else line)
        patch = b"".join(colored)
    sys.stdout.buffer.write(patch)
    sys.stdout.flush()


def _summary(reports: list[FileReport]) -> dict:
    statuses = Counter(r.status for r in reports)
    actions = Counter(s["action"] for r in reports for s in r.sites)
    return {"files": len(reports), "changed": statuses["changed"], "unchanged": statuses["unchanged"],
            "skipped": statuses["skipped"], "errors": statuses["error"],
            "sites_rewritten": actions["rewritten"], "dels_inserted": actions["del_inserted"],
            "sites_skipped": actions["skipped"], "sites_verified": sum(s["verified"] for r in reports for s in r.sites)}


def _print_summary(console: Console, reports: list[FileReport], summary: dict, verb: str, quiet: bool) -> None:
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
            for site in report.sites:
                if site["action"] == "skipped":
                    console.print(f"skipped {report.path}:{site['line']}: {site['reason']}", markup=False,
                                  highlight=False, style="yellow", soft_wrap=True)
    for report in reports:
        if report.status == "error":
            console.print(f"error: {report.path}: {report.error}", markup=False, highlight=False, style="red",
                          soft_wrap=True)


def _consoles(color: str) -> tuple[Console, Console]:
    settings = {"always": {"force_terminal": True}, "never": {"color_system": None}, "auto": {}}[color]
    return Console(highlight=False, **settings), Console(stderr=True, highlight=False, **settings)


def _common(function):
    decorators = [
        click.argument("paths", nargs=-1, type=click.Path(path_type=Path)),
        click.option("--include", multiple=True, default=("run_*.py",), show_default=True,
                     help="glob of files to migrate (repeatable); files named on the command line always count"),
        click.option("--exclude", multiple=True, help="glob of files or folders to leave out (repeatable)"),
        click.option("--jobs", "-j", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
                     help="worker processes (at most one per file)"),
        click.option("--rho1", type=click.Choice(RHO1_MODES), default=DEFAULT_RHO1, show_default=True,
                     help="rho1-style loops: insert del, rewrite them, or skip them"),
        click.option("--no-verify", is_flag=True, help="do not verify sites numerically (faster; not recommended)"),
        click.option("--utility-module", default=DEFAULT_UTILITY_MODULE, show_default=True,
                     callback=_module_name, help="import path of compute_mtp_ce_loss"),
        click.option("--json", "as_json", is_flag=True, help="print a JSON report instead of text"),
        click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True),
        click.option("--quiet", "-q", is_flag=True, help="print only errors"),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _module_name(context, parameter, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", value):
        raise click.BadParameter(f"{value!r} is not a dotted module name")
    return value


def _run(verb: str, paths, include, exclude, jobs, rho1, no_verify, utility_module, as_json, color, quiet) -> int:
    out, err = _consoles(color)
    paths = tuple(paths) or (Path("."),)
    candidates = list(discover(paths, tuple(include), tuple(exclude)))
    options = {"rho1": rho1, "utility_module": utility_module, "verify": not no_verify}
    reports = _process_all(candidates, options, jobs, err if not (quiet or as_json) else Console(quiet=True))
    reports += _vendoring_reports(reports, utility_module)
    reports.sort(key=lambda report: report.path)
    changed = [r for r in reports if r.status == "changed"]
    if verb == "diff" and not as_json:
        for report in changed:
            _write_diff(unified_diff(report), out.is_terminal if color == "auto" else color == "always")
    if verb == "apply":
        for report in changed:
            try:
                write_atomic(Path(report.path), report.output, expected=report.source)
            except MigrationError as error:
                report.status, report.error = "error", str(error)
            except OSError as error:
                report.status, report.error = "error", f"cannot write: {error.strerror or error}"
    summary = _summary(reports)
    if as_json:
        click.echo(json.dumps({"files": [r.as_dict() for r in reports], "summary": summary}, indent=2))
    else:
        _print_summary(err if verb == "diff" else out, reports, summary, verb, quiet)
    if summary["errors"]:
        return 2
    return 1 if changed and verb in ("diff", "check") else 0


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mtp-migrate")
def main() -> None:
    """Migrate multi-token-prediction loss loops to weighted_mtp.utils.compute_mtp_ce_loss."""


@main.command()
@_common
def diff(**options):
    """Dry run: the exact patch apply would write, and a summary. Writes nothing."""
    sys.exit(_run("diff", **options))


@main.command()
@_common
def apply(**options):
    """Rewrite the files in place (atomically, keeping mode, owner, encoding and line endings)."""
    sys.exit(_run("apply", **options))


@main.command()
@_common
def check(**options):
    """Like diff without the diff: exit 1 if any file would change. For CI and pre-commit."""
    sys.exit(_run("check", **options))


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--base", required=True, metavar="REV", help="git revision to compare against")
@click.option("--include", multiple=True, default=("run_*.py",), show_default=True, help="glob of files to check")
@click.option("--exclude", multiple=True, help="glob of files or folders to leave out (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON report instead of text")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="print only sites that are not equivalent, and errors")
def verify(paths, base, include, exclude, as_json, color, quiet):
    """Check that every site changed since git REV computes what it computed there."""
    from codemods.since import changed_files, verify_file

    out, err = _consoles(color)
    paths = tuple(paths) or (Path("."),)
    try:
        changed = changed_files(paths, base)
    except MigrationError as error:
        if as_json:
            click.echo(json.dumps({"files": [], "summary": {}, "error": str(error)}, indent=2))
        err.print(f"error: {error}", markup=False, highlight=False, style="red", soft_wrap=True)
        sys.exit(2)
    reports = []
    for candidate in discover(paths, tuple(include), tuple(exclude)):
        path = candidate.path.as_posix()
        if candidate.problem:
            reports.append(_problem_report(candidate))
            continue
        origin = changed.get(candidate.path.resolve())
        try:
            sites = [] if origin is None else verify_file(candidate.path, *origin, base)
        except (MigrationError, OSError) as error:
            reports.append(FileReport(path, "error", str(error)))
            continue
        reports.append(FileReport(path, "changed" if sites else "unchanged", None, sites))
    summary = _summary(reports)
    not_equivalent = [s for r in reports for s in r.sites if s["action"] != "skipped" and not s["verified"]]
    if as_json:
        click.echo(json.dumps({"files": [r.as_dict() for r in reports], "summary": summary}, indent=2))
    else:
        for report in reports:
            for site in report.sites:
                verdict = "equivalent" if site["verified"] else f"NOT equivalent: {site['reason']}"
                if site["action"] == "skipped":
                    verdict = f"skipped: {site['reason']}"
                if quiet and site["verified"]:
                    continue
                out.print(f"{report.path}:{site['line']}: {verdict}", markup=False, highlight=False, soft_wrap=True)
        _print_summary(out, reports, summary, "verify", quiet)
    sys.exit(2 if summary["errors"] else 1 if not_equivalent else 0)


@main.command()
@click.argument("code")
def explain(code: str):
    """Print what a refusal code means and how to make the loop migratable."""
    known = {c.code: c for c in Code}
    wanted = code.strip().upper()
    if wanted not in known:
        click.echo(f"error: unknown code {code!r}; codes are {', '.join(sorted(known))}", err=True)
        sys.exit(2)
    text = (DOCS / "refusals.md").read_text(encoding="utf-8") if (DOCS / "refusals.md").is_file() else ""
    match = re.search(rf"^## {wanted}\b.*?(?=^## |\Z)", text, flags=re.S | re.M)
    click.echo(match.group(0).rstrip() if match else f"{wanted}: {known[wanted].summary}")
