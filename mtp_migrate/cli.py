"""The ``mtp-migrate`` command line: diff, apply, check, verify, explain (see ``docs/cli.md``).

``diff``, ``check`` and ``apply`` run the same plan, verification included: ``diff``
prints exactly the patch ``apply`` would write, and ``check`` exits 0 after ``apply``.

Exit codes: 0 nothing to change / written / equivalent; 1 changes pending / not
equivalent; 2 any file could not be read, parsed or written, or a usage error; 3 a bug
of ours (an internal error); 130 interrupted. Every file is processed whatever happens
to the others.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mtp_migrate.cache import Cache
from mtp_migrate.config import DEFAULT_RHO1, RHO1_MODES
from mtp_migrate.discovery import discover, shown, wanted
from mtp_migrate.emit_tests import test_modules
from mtp_migrate.entry import interrupt
from mtp_migrate.refusals import Code
from mtp_migrate.report import (
    FileReport,
    consoles,
    github_annotations,
    print_summary,
    summary_of,
    unified_diff,
    write_diff,
)
from mtp_migrate.runner import migrate_file, rewrote
from mtp_migrate.source import MigrationError, write_atomic
from mtp_migrate.vendoring import DOTTED, imports_utility, utility_target

# docs/ ships in the wheel as mtp_migrate/docs/; a checkout (an editable install) has it beside the package.
DOCS = Path(__file__).parent / "docs"
if not DOCS.is_dir():
    DOCS = Path(__file__).parents[1] / "docs"

OUTPUT_FORMATS = ("text", "json", "github")


def process(path: str, rho1: str, utility_module: str | None, verify: bool, cache: bool,
            emit_tests: bool) -> FileReport:
    """One file, never raising: bad input becomes an ``error`` report (runs in a worker)."""
    try:
        result = migrate_file(Path(path), rho1=rho1, utility_module=utility_module, verify=verify, cache=cache,
                              emit_tests=emit_tests)
    except MigrationError as error:
        return FileReport(path, "error", str(error))
    except Exception as error:  # a bug of ours must not stop the batch either
        return FileReport(path, "error", f"internal error: {type(error).__name__}: {error}", internal=True)
    sites = [site.as_dict() for site in result.sites]
    if result.changed:
        status = "changed"
    elif any(site["action"] == "skipped" for site in sites):
        status = "skipped"
    else:
        status = "unchanged"
    needs_utility = rewrote(result) or imports_utility(
        result.output, utility_target(Path(path).resolve().parent, utility_module).module)
    return FileReport(path, status, None, sites, result.source, result.output, needs_utility, guards=result.guards,
                      import_root=result.import_root)


def _process_all(candidates, options, jobs: int, console: Console) -> list[FileReport]:
    reports = {c.path.as_posix(): _problem_report(c) for c in candidates if c.problem}
    todo = [c.path.as_posix() for c in candidates if not c.problem]
    jobs = max(1, min(jobs, len(todo)))
    show_progress = console.is_terminal and len(todo) > 1
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not show_progress) as progress:
        task = progress.add_task("migrating", total=len(todo))
        for report in _in_workers(partial(process, **options), todo, jobs):
            reports[report.path] = report
            progress.advance(task)
    return [reports[key] for key in sorted(reports)]


def _in_workers(work, items: list, jobs: int) -> Iterator:
    """``map(work, items)`` in ``jobs`` worker processes (in this one for one job), each importing torch
    once; an interrupt stops them at once rather than after the queued files."""
    jobs = max(1, min(jobs, len(items)))
    if jobs == 1:
        yield from map(work, items)
        return
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=_worker_started)
    try:
        yield from pool.map(work, items, chunksize=max(1, min(64, len(items) // (4 * jobs))))
    except BaseException:
        # The pool's own thread then trips over the futures map() cancelled (a CPython quirk): not news.
        threading.excepthook = lambda hook: None
        pool.shutdown(wait=False)
        for child in multiprocessing.active_children():
            child.terminate()
        raise
    pool.shutdown()


def _worker_started() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: terminate() must end us
    if sys.platform == "linux":
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the parent, even killed
        except (OSError, AttributeError):
            pass


def _problem_report(candidate) -> FileReport:
    return FileReport(shown(candidate.path.as_posix()), "skipped" if candidate.skipped else "error", candidate.problem)


def _vendoring_reports(reports: list[FileReport], utility_module: str | None) -> list[FileReport]:
    """The utility module written into each target whose files import it (never over code we do not own)."""
    writes: dict[Path, tuple[bytes, bytes]] = {}
    for report in reports:
        if report.rewrote and report.status != "error":
            writes.update(utility_target(Path(report.path).resolve().parent, utility_module).writes)
    return [FileReport(_relative(path), "changed", None, [], old, new, False) for path, (old, new) in sorted(writes.items())]


def _relative(path: Path) -> str:
    """``path`` as the user's own paths are shown: relative to the working directory when under it."""
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _apply_all(decorators: list):
    def decorate(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return decorate


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
        click.option("--no-cache", is_flag=True, help="verify every site again (ignore .mtp_migrate_cache/)"),
        click.option("--utility-module", callback=_module_name,
                     help="import path of compute_mtp_ce_loss, written into the repository [default: "
                          "[tool.mtp-migrate] utility-module, else the repository's weighted_mtp.utils package, "
                          "else mtp_loss_utils.py beside each pipeline]"),
        click.option("--emit-tests", metavar="DIR", type=click.Path(path_type=Path, file_okay=False),
                     help="also write, into DIR, a pytest module per migrated file that checks the utility "
                          "still computes what each replaced loop computed (torch and pytest only)"),
        *_output_options(),
        click.option("--quiet", "-q", is_flag=True, help="print only errors"),
    ]
    return _apply_all(decorators)(function)


def _output_options() -> list:
    return [
        click.option("--output-format", type=click.Choice(OUTPUT_FORMATS), default="text", show_default=True,
                     help="text for people, json for tools, github for Actions annotations"),
        click.option("--json", "as_json", is_flag=True, help="same as --output-format json"),
        click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True),
    ]


def _module_name(context, parameter, value: str | None) -> str | None:
    if value is not None and not DOTTED.fullmatch(value):
        raise click.BadParameter(f"{value!r} is not a dotted module name")
    return value


def _run(verb: str, paths, include, exclude, jobs, rho1, no_verify, no_cache, utility_module, emit_tests,
         output_format, as_json, color, quiet) -> int:
    if emit_tests is not None and no_verify:
        raise click.UsageError("--emit-tests writes the verifier's cases into the tests: it needs verification "
                               "(drop --no-verify)")
    out, err = consoles(color)
    output_format = "json" if as_json else output_format
    as_json = output_format == "json"
    utility_target.cache_clear()  # the tree changes between two runs in one process (a vendored file written)
    paths = tuple(paths) or (Path("."),)
    candidates = list(discover(paths, tuple(include), tuple(exclude)))
    stale = [c.path for c in candidates if c.stale]
    candidates = [c for c in candidates if not c.stale]
    options = {"rho1": rho1, "utility_module": utility_module, "verify": not no_verify, "cache": not no_cache,
               "emit_tests": emit_tests is not None}
    reports = _process_all(candidates, options, jobs, err if output_format == "text" and not quiet else Console(quiet=True))
    tests = test_modules(reports, emit_tests) if emit_tests is not None else []
    reports += [module for module, _ in tests]
    reports += _vendoring_reports(reports, utility_module)
    reports.sort(key=lambda report: report.path)
    if verb == "diff" and output_format == "text":
        for report in reports:
            if report.status == "changed":
                write_diff(unified_diff(report), out.is_terminal if color == "auto" else color == "always")
    if verb == "apply":
        _write_in_order(reports, tests, utility_module)
    changed = [r for r in reports if r.status == "changed"]
    notes = _clean_up(stale, remove=verb == "apply")
    notes += _missing_utility(reports, utility_module)
    if not no_cache:
        notes += sorted({problem for c in candidates if not c.problem and (problem := Cache.of(c.path).problem)})
    if not candidates and not stale and any(path.is_dir() for path in paths):
        notes.append(f"no file matches --include {' '.join(include)} under {' '.join(map(str, paths))}")
    summary = summary_of(reports)
    if as_json:
        click.echo(json.dumps({"files": [r.as_dict() for r in reports], "summary": summary, "notes": notes}, indent=2))
    elif output_format == "github":
        github_annotations(reports, verb)
    else:
        print_summary(err if verb == "diff" else out, reports, summary, verb, quiet)
        for note in notes:
            err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if any(report.internal for report in reports):
        return 3
    if summary["errors"]:
        return 2
    return 1 if changed and verb in ("diff", "check") else 0


def _write_in_order(reports: list[FileReport], tests: list[tuple[FileReport, FileReport]],
                    utility_module: str | None) -> None:
    """Everything a pipeline will import is written before it: the utility (its module before the
    ``__init__.py`` that exports it), then its equivalence tests. A pipeline is written only if they all
    were, so a failed write leaves it as it was, for the next ``apply`` to do again."""
    by_path = {Path(report.path).resolve(): report for report in reports}
    attempted: set[int] = set()
    blocked: dict[int, str] = {}  # id(report): why it is not written

    def write(report: FileReport, make_folder: bool = False) -> None:
        attempted.add(id(report))
        if report.status == "changed" and id(report) in blocked:
            report.status = "error"
            report.error = f"{'not migrated' if report.rewrote else 'not written'}: {blocked[id(report)]}"
        elif report.status == "changed":
            _write(report, make_folder)

    for report in reports:
        if not report.rewrote or report.status == "error":
            continue
        for path in utility_target(Path(report.path).resolve().parent, utility_module).writes:
            need = by_path[path]
            if id(report) in blocked:  # the module failed: its __init__.py must not export it
                blocked.setdefault(id(need), blocked[id(report)])
            if id(need) not in attempted:
                write(need)
            if need.status == "error":
                blocked.setdefault(id(report), f"{need.path} could not be written ({need.error})")
    for module, pipeline in tests:
        if id(pipeline) in blocked:
            blocked[id(module)] = blocked[id(pipeline)]
        write(module, make_folder=True)
        if module.status == "error":
            blocked.setdefault(id(pipeline), f"its equivalence tests could not be written ({module.error})")
    for report in reports:
        if id(report) not in attempted:
            write(report)


def _missing_utility(reports: list[FileReport], utility_module: str | None) -> list[str]:
    """A file migrated before whose utility the repository lacks (a run that could not write it, a deletion)."""
    notes = []
    for report in reports:
        if report.rewrote and report.status in ("unchanged", "skipped"):
            target = utility_target(Path(report.path).resolve().parent, utility_module)
            if missing := target.writes:
                notes.append(f"{report.path} imports the loss utility from {target.module}, which the repository "
                             f"lacks ({', '.join(_relative(path) for path in missing)})")
    return notes


def _write(report: FileReport, make_folder: bool = False) -> bool:
    try:
        if make_folder:
            Path(report.path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(report.path), report.output, expected=report.source)
        return True
    except MigrationError as error:
        report.status, report.error = "error", str(error)
    except OSError as error:
        report.status, report.error = "error", f"cannot write: {error.strerror or error}"
    return False


def _clean_up(stale: list[Path], remove: bool) -> list[str]:
    """Temp files an interrupted ``apply`` left: ``apply`` removes them, the dry runs only say so."""
    notes = []
    for path in stale:
        if not remove:
            notes.append(f"{shown(path.as_posix())}: temp file left by an interrupted run (apply removes it)")
            continue
        try:
            path.unlink()
            notes.append(f"removed {shown(path.as_posix())}: temp file left by an interrupted run")
        except OSError as error:
            notes.append(f"cannot remove {shown(path.as_posix())}: {error.strerror or error}")
    return notes


class _Interruptible(click.Group):
    """Ctrl-C or SIGTERM: stop within a moment, say so, exit 130 (finished writes stay, none is half-done)."""

    def invoke(self, ctx):
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        finally:  # run in-process (a test, an embedding), the caller's handler comes back
            signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Interruptible, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mtp-migrate")
def main() -> None:
    """Migrate multi-token-prediction loss loops to compute_mtp_ce_loss, vendored into the repository."""


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
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
              help="worker processes (at most one per file)")
@click.option("--utility-module", callback=_module_name,
              help="import path of compute_mtp_ce_loss in the migrated code, its file loaded by path [default: "
                   "the module apply chooses]")
@_apply_all(_output_options())
@click.option("--quiet", "-q", is_flag=True, help="print only sites that are not equivalent, and errors")
def verify(paths, base, include, exclude, jobs, utility_module, output_format, as_json, color, quiet):
    """Check that every site changed since git REV computes what it computed there."""
    from mtp_migrate.since import changed_files

    out, err = consoles(color)
    output_format = "json" if as_json else output_format
    paths = tuple(paths) or (Path("."),)
    try:
        changed = changed_files(paths, base, partial(wanted, paths=paths, include=tuple(include), exclude=tuple(exclude)))
    except MigrationError as error:
        if output_format == "json":
            click.echo(json.dumps({"files": [], "summary": {}, "error": str(error)}, indent=2))
        err.print(f"error: {error}", markup=False, highlight=False, style="red", soft_wrap=True)
        sys.exit(2)
    candidates = list(discover(paths, tuple(include), tuple(exclude)))
    reports = {c.path.as_posix(): _problem_report(c) for c in candidates if c.problem and not c.stale}
    todo = [(c.path, *changed[c.path.resolve()]) for c in candidates
            if not c.problem and c.path.resolve() in changed]
    todo += [(Path(_relative(path)), *where) for path, where in changed.items() if not path.exists()]  # gone
    reports.update({c.path.as_posix(): FileReport(c.path.as_posix(), "unchanged") for c in candidates
                    if not c.problem and c.path.resolve() not in changed})
    reports.update((report.path, report) for report in _in_workers(
        partial(_verify_one, revision=base, utility_module=utility_module), todo, jobs))
    reports = [reports[key] for key in sorted(reports)]
    summary = summary_of(reports)
    not_equivalent = [s for r in reports for s in r.sites if s["action"] != "skipped" and not s["verified"]]
    if output_format == "json":
        click.echo(json.dumps({"files": [r.as_dict() for r in reports], "summary": summary}, indent=2))
    elif output_format == "github":
        github_annotations(reports, "verify")
    else:
        for report in reports:
            for site in report.sites:
                verdict = "equivalent" if site["verified"] else f"{_verdict(site)}: {site['reason']}"
                if quiet and site["verified"]:
                    continue
                out.print(f"{report.path}:{site['line']}: {verdict}", markup=False, highlight=False, soft_wrap=True)
        print_summary(out, reports, summary, "verify", quiet)
    internal = any(report.internal for report in reports)
    sys.exit(3 if internal else 2 if summary["errors"] else 1 if not_equivalent else 0)


def _verdict(site: dict) -> str:
    """A site that computes something else, or one the verifier could not judge (both exit 1)."""
    judged = site["code"] in (Code.NOT_EQUIVALENT.code, Code.REWRITE_RAISES.code)
    return "NOT equivalent" if judged else "could not be judged"


def _verify_one(job: tuple[Path, Path, str], revision: str, utility_module: str | None) -> FileReport:
    """One changed file against its version at ``revision`` (runs in a worker; never raises)."""
    from mtp_migrate.since import verify_file

    path, root, old_path = job
    try:
        sites = verify_file(path, root, old_path, revision, utility_module)
    except (MigrationError, OSError) as error:
        return FileReport(path.as_posix(), "error", str(error))
    except Exception as error:  # a bug of ours must not stop the batch either
        return FileReport(path.as_posix(), "error", f"internal error: {type(error).__name__}: {error}",
                          internal=True)
    return FileReport(path.as_posix(), "changed" if sites else "unchanged", None, sites)


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
