"""Run a ``SiteProgram`` on its input domain and judge the rewrite (this module imports torch).

Where the original returns, the rewrite must return the same values for every output
and the same gradients for every input that requires grad: within 1e-9 in fp64. Where
they differ, both are compared with an fp64 *truth*, the original run with every
float-to-float cast widened to fp64; the rewrite's error must be no worse than the
original's. A case on which the original raises does not count; a site with too few
counted, non-trivial cases is "not exercised".
"""

from __future__ import annotations

import importlib.util
import signal
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtp_migrate.refusals import Code
from mtp_migrate.verify import harness
from mtp_migrate.verify.domain import base_cases, extra_cases, variations
from mtp_migrate.verify.harness import Case, compare, is_trivial, make_inputs
from mtp_migrate.verify.program import SiteProgram

MIN_CASES = 8
CALL_TIMEOUT_S = 10.0


@dataclass
class Verdict:
    line: int
    ok: bool
    code: str | None = None
    reason: str | None = None
    cases: int = 0  # counted, non-trivial cases
    compared: list[str] = field(default_factory=list)  # every case compared, as ``Case(...)`` source


class _Timeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float):
    def expire(signum, frame):
        raise _Timeout(f"a run took longer than {seconds:.0f}s")

    try:
        previous = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # not the main thread: no limit
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_LOADED: dict[tuple[str, float], types.ModuleType] = {}


def _load(path: str) -> types.ModuleType:
    key = (path, Path(path).stat().st_mtime)
    if key not in _LOADED:
        spec = importlib.util.spec_from_file_location(f"_mtp_verified_utility_{len(_LOADED)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _LOADED[key] = module
    return _LOADED[key]


@contextmanager
def _utility_modules(utility: dict[str, str]):
    """``import <module>`` gives the utility file that the migrated code will really import."""
    previous = {}
    try:
        for name, path in utility.items():
            loaded = _load(path)
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                key = ".".join(parts[:depth])
                if key not in previous:
                    previous[key] = sys.modules.get(key)
                if depth == len(parts):
                    sys.modules[key] = loaded
                elif key not in sys.modules:
                    sys.modules[key] = types.ModuleType(key)
        yield
    finally:
        for key, module in previous.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


def _compile(source: str, name: str):
    namespace = {"_mtp_box": harness._mtp_box, "_mtp_outputs": harness._mtp_outputs}
    exec(compile(source, f"<{name} program>", "exec"), namespace)
    return namespace[name]


class _Judge:
    def __init__(self, program: SiteProgram):
        self.program = program
        self.slots = program.slots
        self.original = _compile(program.original, "original")
        self.rewritten = _compile(program.rewritten, "rewritten")

    def run(self, function, arguments: dict, truth: bool = False):
        with _time_limit(CALL_TIMEOUT_S):
            return harness.run(function, arguments, self.program.outputs, truth)

    def rounding(self, arguments: dict) -> float:
        with _time_limit(CALL_TIMEOUT_S):
            return harness.rounding(self.original, arguments)

    def judge(self, case: Case) -> tuple[str, str | None]:
        """``("skip" | "trivial" | "equal", None)`` or ``("fail", reason)`` with the failure's code in front.

        "trivial" and "equal" cases are the compared ones."""
        arguments = make_inputs(case, self.slots)
        try:
            old = self.run(self.original, arguments)
        except _Timeout as error:
            return "fail", f"{Code.VERIFIER_FAILED.code}: the original: {error}"
        except Exception:
            return "skip", None
        try:
            with _utility_modules(self.program.utility):
                new = self.run(self.rewritten, arguments)
        except _Timeout as error:
            return "fail", f"{Code.VERIFIER_FAILED.code}: the rewrite: {error}"
        except (TypeError, ValueError) as error:
            if is_trivial(old):  # the loop computed nothing: argument checks it never needed do not count
                return "skip", None
            return "fail", f"{Code.REWRITE_RAISES.code}: the rewrite raises {type(error).__name__}: " \
                           f"{str(error).splitlines()[0] if str(error) else ''} (on {case.describe(self.slots)})"
        except Exception as error:
            return "fail", f"{Code.REWRITE_RAISES.code}: the rewrite raises {type(error).__name__}: " \
                           f"{str(error).splitlines()[0] if str(error) else ''} (on {case.describe(self.slots)})"
        problem = compare(new, old, lambda: self.run(self.original, arguments, truth=True),
                          lambda: self.rounding(arguments), case, arguments, self.slots)
        if problem:
            return "fail", f"{Code.NOT_EQUIVALENT.code}: {problem} (on {case.describe(self.slots)})"
        return ("trivial" if is_trivial(old) else "equal"), None


def verify(program: SiteProgram, seed: int = 0) -> Verdict:
    """Judge one site: find inputs the original runs on, then every variation around them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost (20x here)
    try:
        return _verify(program, seed)
    finally:
        torch.set_num_threads(threads)


def _verify(program: SiteProgram, seed: int) -> Verdict:
    try:
        judge = _Judge(program)
    except Exception as error:
        return Verdict(program.line, False, Code.NOT_RUNNABLE.code,
                       f"{Code.NOT_RUNNABLE.code}: cannot build the programs: {type(error).__name__}: {error}")
    base, last_error = None, None
    for case in base_cases(program.slots, seed):
        try:
            judge.run(judge.original, make_inputs(case, program.slots))
            base = case
            break
        except _Timeout as error:
            last_error = error
            break
        except Exception as error:
            last_error = error
    if base is None:
        detail = f"{type(last_error).__name__}: {str(last_error).splitlines()[0] if str(last_error) else ''}"
        return Verdict(program.line, False, Code.NOT_EXERCISED.code,
                       f"{Code.NOT_EXERCISED.code}: the original raised on every input tried ({detail})")
    counted, compared = 0, []
    # The extra shapes only once the grid passed: a site that fails fails there, at the grid's cost.
    for case in (*variations(base, program.slots, seed), *extra_cases(base, program.slots)):
        outcome, reason = judge.judge(case)
        if outcome == "fail":
            return Verdict(program.line, False, reason.split(":")[0], reason, counted)
        counted += outcome == "equal"
        if outcome != "skip":
            compared.append(repr(case))
    if counted < MIN_CASES:
        return Verdict(program.line, False, Code.NOT_EXERCISED.code,
                       f"{Code.NOT_EXERCISED.code}: only {counted} inputs on which the original runs and computes "
                       f"something (at least {MIN_CASES} needed)", counted)
    return Verdict(program.line, True, None, None, counted, compared)
