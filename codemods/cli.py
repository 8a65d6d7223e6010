"""The ``mtp-migrate`` command line (DESIGN §7): diff, apply, check, verify.

Exit codes: 0 nothing to change / written / equivalent; 1 changes pending / not
equivalent; 2 any file could not be read or parsed, or any other error. Every file is
processed whatever happens to the others.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from codemods.commands._scratch import DEFAULT_UTILITY_MODULE
from codemods.discovery import discover
from codemods.runner import MigrationError, migrate_file, write_atomic
from codemods.vendoring import plan_vendoring


@dataclass
class FileReport:
    path: str
    status: str  # changed | unchanged | skipped | error
    error: str | None = None
    sites: list[dict] = field(default_factory=list)
    source: bytes = b""
    output: bytes = b""


def process(path: str, rho1: str, utility_module: str, transform: bool, verify: bool) -> FileReport:
    """One file, never raising: bad input becomes an ``error`` report (runs in a worker)."""
    try:
        result = migrate_file(Path(path), rho1=rho1, utility_module=utility_module, transform=transform,
                              verify=verify)
    except MigrationError as error:
        return FileReport(path, "error", str(error))
    except Exception as error:  # a bug of ours must not stop the batch either
        return FileReport(path, "error", f"internal error: {type(error).__name__}: {error}")
    if result.changed:
        status = "changed"
    elif any(site["action"] == "skipped" for site in result.sites):
        status = "skipped"
    else:
        status = "unchanged"
    return FileReport(path, status, None, result.sites, result.source, result.output)


def _process_all(candidates, options, jobs: int, console: Console) -> list[FileReport]:
    reports = {c.path.as_posix(): _problem_report(c) for c in candidates if c.problem}
    todo = [c.path.as_posix() for c in candidates if not c.problem]
    show_progress = console.is_terminal and len(todo) > 1
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not show_progress) as progress:
        task = progress.add_task("migrating", total=len(todo))
        work = partial(process, **options)
        if jobs > 1 and len(todo) > 1:
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


def _print_json(reports: list[FileReport], summary: dict) -> None:
    files = [{k: v for k, v in asdict(r).items() if k not in ("source", "output")} for r in reports]
    click.echo(json.dumps({"files": files, "summary": summary}, indent=2))


def _vendoring_reports(paths, reports, utility_module) -> list[FileReport]:
    """Vendor loss_utils.py into the target's own weighted_mtp/utils when a site was rewritten."""
    if utility_module != DEFAULT_UTILITY_MODULE or not any(
            s["action"] == "rewritten" for r in reports for s in r.sites):
        return []
    extra = []
    for root in {p if p.is_dir() else p.parent for p in paths}:
        for path, (old, new) in sorted(plan_vendoring(root).items()):
            extra.append(FileReport(path.as_posix(), "changed", None, [], old, new))
    return extra


def _print_diff(console: Console, report: FileReport) -> None:
    old = report.source.decode("utf-8", errors="replace").splitlines()
    new = report.output.decode("utf-8", errors="replace").splitlines()
    lines = difflib.unified_diff(old, new, f"a/{report.path}", f"b/{report.path}", lineterm="")
    for line in lines:
        line = line.rstrip("\r").lstrip("\ufeff")
        style = ("bold" if line.startswith(("---", "+++")) else "green" if line.startswith("+")
                 else "red" if line.startswith("-") else "cyan" if line.startswith("@@") else None)
        console.print(line, style=style, markup=False, highlight=False, soft_wrap=True)


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
        for label, key in [("files scanned", "files"), ("files to change" if verb in ("diff", "check") else "files changed", "changed"),
                           ("sites rewritten", "sites_rewritten"), ("sites verified", "sites_verified"),
                           ("dels inserted", "dels_inserted"),
                           ("sites skipped", "sites_skipped"), ("errors", "errors")]:
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
                     help="worker processes"),
        click.option("--rho1", type=click.Choice(["del", "rewrite", "skip"]), default="del", show_default=True,
                     help="rho1-style loops: insert del, rewrite them, or skip them"),
        click.option("--no-verify", is_flag=True, help="do not verify sites before writing"),
        click.option("--utility-module", default=DEFAULT_UTILITY_MODULE, show_default=True,
                     help="import path of compute_mtp_ce_loss"),
        click.option("--json", "as_json", is_flag=True, help="print a JSON report instead of text"),
        click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True),
        click.option("--quiet", "-q", is_flag=True, help="print only errors"),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _run(verb: str, paths, include, exclude, jobs, rho1, no_verify, utility_module, as_json, color, quiet) -> int:
    out, err = _consoles(color)
    paths = tuple(paths) or (Path("."),)
    candidates = list(discover(paths, tuple(include), tuple(exclude)))
    # check needs only each site's action; diff and apply need the new text.
    options = {"rho1": rho1, "utility_module": utility_module, "transform": verb != "check",
               "verify": verb == "apply" and not no_verify}
    reports = _process_all(candidates, options, jobs, err if not (quiet or as_json) else Console(quiet=True))
    if verb != "check":
        reports += _vendoring_reports(paths, reports, utility_module)
    changed = [r for r in reports if r.status == "changed"]
    if verb == "diff" and not as_json:
        for report in changed:
            _print_diff(out, report)
    if verb == "apply":
        for report in changed:
            try:
                write_atomic(Path(report.path), report.output)
            except OSError as error:
                report.status, report.error = "error", f"cannot write: {error.strerror or error}"
    summary = _summary(reports)
    if as_json:
        _print_json(reports, summary)
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
    """Dry run: a coloured unified diff and a summary. Writes nothing."""
    sys.exit(_run("diff", **options))


@main.command()
@_common
def apply(**options):
    """Rewrite the files in place (atomically, keeping mode, encoding and line endings)."""
    sys.exit(_run("apply", **options))


@main.command()
@_common
def check(**options):
    """Like diff without the diff: exit 1 if any file would change. For CI and pre-commit."""
    sys.exit(_run("check", **options))


@main.command()
@_common
@click.option("--base", required=True, metavar="REV", help="git revision to compare against")
def verify(base, paths, include, exclude, as_json, color, quiet, **_):
    """Check that every site changed since git REV computes what it computed there."""
    from codemods.verify.base import changed_since, git_root, verify_file

    out, err = _consoles(color)
    paths = tuple(paths) or (Path("."),)
    changed: dict[Path, Path] = {}  # changed file -> its repository root
    for path in paths:
        try:
            root = git_root(path if path.exists() else Path("."))
            changed |= dict.fromkeys(changed_since(root, base), root)
        except MigrationError as error:
            err.print(f"error: {error}", markup=False, highlight=False, style="red", soft_wrap=True)
            sys.exit(2)
    reports = []
    for candidate in discover(paths, tuple(include), tuple(exclude)):
        path = candidate.path.as_posix()
        if candidate.problem:
            reports.append(_problem_report(candidate))
            continue
        root = changed.get(candidate.path.resolve())
        try:
            sites = [] if root is None else verify_file(candidate.path, root, base)
        except (MigrationError, OSError) as error:
            reports.append(FileReport(path, "error", str(error)))
            continue
        reports.append(FileReport(path, "changed" if sites else "unchanged", None, sites))
    summary = _summary(reports)
    not_equivalent = [s for r in reports for s in r.sites if s["action"] != "skipped" and not s["verified"]]
    if as_json:
        _print_json(reports, summary)
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
