"""Run the migration on one file: read, check, plan, verify, transform; bytes out as they came in."""

from __future__ import annotations

import ast
import base64
import hashlib
import re
import sys
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from libcst.codemod import CodemodContext

from mtp_migrate import project
from mtp_migrate.cache import Cache, digest
from mtp_migrate.commands.rewrite_mtp_loop import RewriteMTPLoopCommand, Verifier
from mtp_migrate.config import DEFAULT_LINE_LENGTH, DEFAULT_RHO1, DEFAULT_UTILITY_MODULE
from mtp_migrate.import_order import FirstParty
from mtp_migrate.mtp_loop.losses import PREFILTER
from mtp_migrate.mtp_loop.spec import Action, SiteReport
from mtp_migrate.refusals import Refusal
from mtp_migrate.source import MigrationError, check_bytes, parse_source
from mtp_migrate.vendoring import SHIPPED_UTILITY, utility_target
from mtp_migrate.verify import verify_sites
from mtp_migrate.verify.emit import GuardedSite, Recorder

MAX_BYTES = 1 << 20  # a pipeline is 5 to 50 KiB; past this even Python's parser takes seconds (docs/cli.md)
STACK_BYTES = 512 << 20  # address space only: pages are used as the recursion reaches them
RECURSION_LIMIT = 100_000
_TOP_LEVEL_IMPORT = re.compile(rb"^(?:from|import)[ \t]+([A-Za-z_][\w.]*)", re.M)


@dataclass
class FileResult:
    source: bytes
    output: bytes
    sites: list[SiteReport] = field(default_factory=list)
    guards: list[GuardedSite] = field(default_factory=list)  # with emit_tests: the rewritten sites' evidence
    import_root: Path | None = None  # with emit_tests: where the file imports the utility from

    @property
    def changed(self) -> bool:
        return self.output != self.source


def default_verifier(cache: Cache | None = None) -> Verifier:
    """Verification against the utility we ship (the one every rewrite imports, or refuses)."""
    return partial(verify_sites, utility_file=str(SHIPPED_UTILITY), cache=cache)


def migrate_source(source: bytes, filename: str = "<string>", *, rho1: str = DEFAULT_RHO1,
                   utility_module: str = DEFAULT_UTILITY_MODULE, verifier: Verifier | None = None,
                   utility_problem: Refusal | None = None, line_length: int = DEFAULT_LINE_LENGTH,
                   first_party: FirstParty | None = None) -> FileResult:
    """Apply ``RewriteMTPLoopCommand`` (and the commands it runs) to ``source``."""
    bom, module = parse_source(source)
    context = CodemodContext(filename=filename)
    command = RewriteMTPLoopCommand(context, rho1=rho1, utility_module=utility_module, verifier=verifier,
                                    utility_problem=utility_problem, line_length=line_length, first_party=first_party)
    output = command.transform_module(module)
    sites = sorted(context.scratch.get(RewriteMTPLoopCommand.REPORT_KEY, []), key=lambda site: site.line)
    if output is module:
        return FileResult(source, source, sites)
    written = bom + output.bytes
    ending = next((e for e in (b"\r\n", b"\n", b"\r") if source.endswith(e)), b"")
    if ending and not written.endswith((b"\n", b"\r")):  # LibCST drops a CR-only file's last line ending
        written += ending
    return FileResult(source, written, sites)


def migrate_file(path: Path, *, rho1: str = DEFAULT_RHO1, utility_module: str | None = None,
                 verify: bool = True, cache: bool = True, emit_tests: bool = False) -> FileResult:
    """Read, check and migrate one file (nothing is written here); an unchanged file is a cache hit.

    ``utility_module`` ``None`` is the configured or chosen one (``vendoring.py``).
    ``emit_tests`` keeps what the equivalence tests of its rewritten sites need (``verify/emit.py``).
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MigrationError(f"cannot read: {error.strerror or error}") from None
    check_bytes(data)
    if not any(marker in data for marker in PREFILTER):  # it cannot hold a site: never parsed
        return FileResult(data, data)
    if len(data) > MAX_BYTES:
        raise MigrationError(f"{len(data) >> 10} KiB, over the {MAX_BYTES >> 10} KiB a file may have to be "
                             "analysed: left as it is")
    return _with_deep_stack(partial(_migrate, path, data, rho1, utility_module, verify, cache, emit_tests))


def _with_deep_stack(work):
    """``work()`` on a thread with a large stack and recursion limit: LibCST recurses once per statement
    of a block in places (a file of 1000 top-level statements overflows the default)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except RecursionError:
            outcome["error"] = MigrationError("too deeply nested or too long a block for a safe rewrite")
        except BaseException as error:
            outcome["error"] = error

    limit, size = sys.getrecursionlimit(), threading.stack_size()
    threading.stack_size(STACK_BYTES)
    sys.setrecursionlimit(RECURSION_LIMIT)
    try:
        thread = threading.Thread(target=run, name="mtp-migrate file", daemon=True)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(size)
        sys.setrecursionlimit(limit)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _migrate(path: Path, data: bytes, rho1: str, utility_module: str | None, verify: bool, cache: bool,
             emit_tests: bool) -> FileResult:
    target = utility_target(path.resolve().parent, utility_module)
    width = project.line_length(path.parent)
    store = Cache.of(path) if cache else None
    first_party = project.first_party(path.parent, target.writes)
    key = digest("file", path.name, hashlib.sha256(data).hexdigest(), rho1, target.module, verify, width,
                 str(target.problem) if target.problem else None,
                 _first_party_imports(data, target.module, first_party))
    # The tests need the programs, not only the verdicts: a file hit has none (site verdicts still hit).
    if store is not None and not emit_tests and (hit := _intact(store.get("files", key), data)) is not None:
        return hit
    verifier = default_verifier(store) if verify else None
    recorder = Recorder(verifier) if verifier is not None and emit_tests else None
    result = migrate_source(data, str(path), rho1=rho1, utility_module=target.module, verifier=recorder or verifier,
                            utility_problem=target.problem, line_length=width, first_party=first_party)
    if recorder is not None:
        result.guards, result.import_root = recorder.sites(result.sites), target.root
    if store is not None:
        store.put("files", key, {"output": base64.b64encode(result.output).decode(),
                                 "sha256": hashlib.sha256(result.output).hexdigest(),
                                 "sites": [site.as_dict() for site in result.sites]})
    return result


def _intact(entry: dict | None, data: bytes) -> FileResult | None:
    """A cached file result, only if its output is what was stored (its hash) and, changed, still parses."""
    if entry is None:
        return None
    try:
        output = base64.b64decode(entry["output"], validate=True)
    except ValueError:
        return None
    if hashlib.sha256(output).hexdigest() != entry["sha256"]:
        return None
    if output != data:
        try:
            ast.parse(output)
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return None
    return FileResult(data, output, [SiteReport.from_dict(site) for site in entry["sites"]])


def _first_party_imports(data: bytes, utility_module: str, first_party: FirstParty) -> list[str]:
    """The modules of the file's top-level imports (and the utility's) that are first-party: where the
    utility import goes depends on them, and they depend on the tree, not on the file."""
    modules = {match.decode() for match in _TOP_LEVEL_IMPORT.findall(data)} | {utility_module}
    return sorted(module for module in modules if first_party(module))


def rewrote(result: FileResult) -> bool:
    return any(site.action is Action.REWRITTEN for site in result.sites)
