"""Judge a ``SiteProgram`` on its input domain (this module imports torch).

The programs run in the sandbox's child process (``sandbox.py``), one case at a time and
each under a time limit; the results come back as data and are judged here. Where the
original returns, the rewrite must return the same values for every output and the same
gradients for every input that requires grad, of the same Python type, dtype and shape, with
NaN where the original has NaN: within 1e-9 unless the original rounds to a lower precision.
Where they differ, both are compared with an fp64 *truth*, the original run with every
float-to-float cast widened to fp64; the rewrite's error must be no worse than the original's. A case on which
the original raises does not count; a site with too few counted, non-trivial cases is
"not exercised".
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace

import torch

from mtp_migrate.refusals import Code
from mtp_migrate.verify.domain import base_cases, candidates, extra_cases, variations
from mtp_migrate.verify.harness import UNBOUND, Case, compare, is_trivial, make_inputs
from mtp_migrate.verify.program import CAUGHT, SiteProgram
from mtp_migrate.verify.sandbox import SANDBOX, UNBOUND_TAG, Raised, SandboxCrashed, SandboxTimeout

MIN_CASES = 8
CALL_TIMEOUT_S = 10.0  # one program on one case; the child is killed past it (docs/verification.md)
LOAD_TIMEOUT_S = 120.0  # the first request also starts the child, which imports torch


@dataclass
class Verdict:
    line: int
    ok: bool
    code: str | None = None
    reason: str | None = None
    cases: int = 0  # counted, non-trivial cases
    compared: list[str] = field(default_factory=list)  # every case compared, as ``Case(...)`` source


class _Failed(Exception):
    """The child timed out or crashed: the site is refused with MTP205."""


def _decoded(value):
    return UNBOUND if value == UNBOUND_TAG else value


class _Judge:
    def __init__(self, program: SiteProgram):
        self.program = program
        self.slots = program.slots
        self.inputs = [(s.param, s.path, s.kind, s.rank) for s in program.slots]
        sources = {"original": program.original, "rewritten": program.rewritten}
        key = hashlib.sha256(repr((sources, sorted(program.utility.items()))).encode()).hexdigest()
        if SANDBOX.loaded != key:
            self._request(("load", sources, dict(program.utility)), LOAD_TIMEOUT_S)
            SANDBOX.loaded = key

    @staticmethod
    def _request(message: tuple, limit: float):
        try:
            return SANDBOX.request(message, limit)
        except SandboxTimeout:
            raise _Failed(f"a run took longer than {limit:.0f}s (the process running it was killed)") from None
        except SandboxCrashed as error:
            raise _Failed(str(error)) from None

    def run(self, name: str, case: Case, truth: bool = False):
        outputs, grads = self._request(("run", name, asdict(case), self.inputs, self.program.outputs, truth),
                                       CALL_TIMEOUT_S)
        return {key: _decoded(value) for key, value in outputs.items()}, grads

    def rounding(self, case: Case) -> float:
        """The epsilon of the least precise type the original rounds to on ``case``."""
        try:
            return self._request(("rounding", asdict(case), self.inputs), CALL_TIMEOUT_S)
        except Raised:  # watched, the original failed: it earns no slack
            return torch.finfo(torch.float64).eps

    def judge(self, case: Case) -> tuple[str, str | None]:
        """``("skip" | "trivial" | "equal", None)`` or ``("fail", reason)`` with the failure's code in front.

        "trivial" and "equal" cases are the compared ones."""
        try:
            old = self.run("original", case)
        except _Failed as error:
            return "fail", f"{Code.VERIFIER_FAILED.code}: the original: {error}"
        except Raised:
            return "skip", None
        try:
            new = self.run("rewritten", case)
        except _Failed as error:
            return "fail", f"{Code.VERIFIER_FAILED.code}: the rewrite: {error}"
        except Raised as error:
            if error.argument_error and _computed_nothing(old):  # argument checks the loop never needed
                return "skip", None
            return "fail", f"{Code.REWRITE_RAISES.code}: the rewrite raises {error} (on {case.describe(self.slots)})"
        arguments = make_inputs(case, self.slots)
        problem = compare(new, old, lambda: self.run("original", case, truth=True), lambda: self.rounding(case), case,
                          arguments, self.slots)
        if problem:
            return "fail", f"{Code.NOT_EQUIVALENT.code}: {problem} (on {case.describe(self.slots)})"
        return ("trivial" if _computed_nothing(old) else "equal"), None


def _computed_nothing(result) -> bool:
    """No loss, no gradient, and no error caught by an `except` around the site."""
    return is_trivial(result) and result[0].get(CAUGHT, None) in (None, UNBOUND)


def verify(program: SiteProgram, seed: int = 0) -> Verdict:
    """Judge one site: find inputs the original runs on, then every variation around them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost (20x here)
    try:
        return _verify(program, seed)
    except _Failed as error:
        return Verdict(program.line, False, Code.VERIFIER_FAILED.code, f"{Code.VERIFIER_FAILED.code}: {error}")
    finally:
        torch.set_num_threads(threads)


def _verify(program: SiteProgram, seed: int) -> Verdict:
    try:
        judge = _Judge(program)
    except Raised as error:
        return Verdict(program.line, False, Code.NOT_RUNNABLE.code,
                       f"{Code.NOT_RUNNABLE.code}: cannot build the programs: {error}")
    base, last_error = None, None
    for case in base_cases(program.slots, seed):
        try:
            judge.run("original", case)
            base = case
            break
        except Raised as error:
            last_error = error
    if base is None:
        return Verdict(program.line, False, Code.NOT_EXERCISED.code,
                       f"{Code.NOT_EXERCISED.code}: the original raised on every input tried ({last_error})")
    counted, compared = 0, []
    # The extra shapes only once the grid passed: a site that fails fails there, at the grid's cost.
    for case in (*variations(base, program.slots, seed), *extra_cases(base, program.slots)):
        outcome, reason = judge.judge(case)
        if outcome == "fail":
            reason = _simplest(judge, case, reason)
            return Verdict(program.line, False, reason.split(":")[0], reason, counted)
        counted += outcome == "equal"
        if outcome != "skip":
            compared.append(repr(case))
    if counted < MIN_CASES:
        return Verdict(program.line, False, Code.NOT_EXERCISED.code,
                       f"{Code.NOT_EXERCISED.code}: only {counted} inputs on which the original runs and computes "
                       f"something (at least {MIN_CASES} needed)", counted)
    return Verdict(program.line, True, None, None, counted, compared)


_SMALLEST = {"S": 1, "B": 1, "H": 1, "V": 2}


def _simplest(judge: _Judge, case: Case, reason: str) -> str:
    """The failure on the simplest input near ``case``, with both programs' values: every input its
    likeliest kind, fp64, no length offset, then each dimension as small as it still fails."""
    def fails(trial: Case) -> str | None:
        try:
            outcome, why = judge.judge(trial)
        except _Failed:
            return None
        return why if outcome == "fail" else None

    simplifications = [lambda c, s=slot: replace(c, choices={**c.choices, s.param: candidates(s)[0]})
                       for slot in judge.slots]
    simplifications += [lambda c: replace(c, dtype=torch.float64), lambda c: replace(c, lengths={})]
    simplifications += [lambda c, d=dimension, v=value: replace(c, shape={**c.shape, d: v})
                        for dimension, smallest in _SMALLEST.items() for value in range(smallest, case.shape[dimension])]
    for _ in range(2):  # a smaller shape can let a simpler input fail too
        for simplify in simplifications:
            trial = simplify(case)
            if trial != case and all(trial.shape[d] <= case.shape[d] for d in case.shape) and \
                    (why := fails(trial)) is not None:
                case, reason = trial, why
    return reason + _values(judge, case)


def _values(judge: _Judge, case: Case) -> str:
    """``; the loop gives X, the rewrite Y`` for the first output that differs, if small enough to show."""
    try:
        old, _ = judge.run("original", case)
        new, _ = judge.run("rewritten", case)
    except (Raised, _Failed):
        return ""
    for name, value in old.items():
        other = new.get(name, UNBOUND)
        if torch.is_tensor(value) and torch.is_tensor(other) and value.numel() <= 4 and other.numel() <= 4 and \
                value.shape == other.shape and not torch.equal(value, other):
            return f"; `{name}`: the loop gives {_show(value)}, the rewrite {_show(other)}"
        if isinstance(value, float | int) and not isinstance(value, bool) and type(other) is not type(value):
            return f"; `{name}`: the loop gives {value!r}, the rewrite {_show(other)}"
    return ""


def _show(value) -> str:
    if torch.is_tensor(value):
        shown = [round(x, 6) for x in value.double().flatten().tolist()]
        return f"{shown[0] if value.dim() == 0 else shown} ({str(value.dtype).removeprefix('torch.')})"
    return "nothing (unbound)" if value is UNBOUND else repr(value)
