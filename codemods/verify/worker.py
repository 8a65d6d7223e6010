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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from codemods.refusals import Code
from codemods.verify.domain import Case, base_cases, values, variations
from codemods.verify.program import SiteProgram

TOLERANCE = 1e-9
LOW_PRECISION_SLACK = 1e-6
MIN_CASES = 8
CALL_TIMEOUT_S = 10.0
_UNBOUND = object()


@dataclass
class Verdict:
    line: int
    ok: bool
    code: str | None = None
    reason: str | None = None
    cases: int = 0  # counted, non-trivial cases


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


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _WidenFloats(TorchFunctionMode):
    """Every float-to-float cast and float dtype argument becomes fp64: the loop's formula, exactly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16):
            func = torch.Tensor.double
        args = tuple(torch.float64 if isinstance(a, torch.dtype) and a in _FLOAT_DTYPES else a for a in args)
        if isinstance(kwargs.get("dtype"), torch.dtype) and kwargs["dtype"] in _FLOAT_DTYPES:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


@contextmanager
def _fp64_truth():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _WidenFloats():
            yield
    finally:
        torch.set_default_dtype(previous)


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


class _Box:
    """A stand-in for an object the site reads both by attribute and by item."""

    def __init__(self, attrs: dict, items: dict):
        self.__dict__.update(attrs)
        self._items = items

    def __getitem__(self, key):
        return self._items[key]


def _box(attrs: dict, items: dict):
    if not items:
        return types.SimpleNamespace(**attrs)
    return dict(items) if not attrs else _Box(attrs, items)


def _compile(source: str, outputs: list[str], name: str):
    namespace = {"_UNBOUND": _UNBOUND, "_mtp_box": _box}
    namespace["_mtp_outputs"] = lambda scope, returned: {"return": returned, **{n: scope.get(n, _UNBOUND)
                                                                             for n in outputs}}
    exec(compile(source, f"<{name} program>", "exec"), namespace)
    return namespace[name]


def _leaf_copy(value):
    if torch.is_tensor(value):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def _run(function, arguments: dict, truth: bool = False):
    """``(outputs, grads)``: named outputs and the gradients of every input that requires grad."""
    arguments = {k: _leaf_copy(v) for k, v in arguments.items()}
    if truth:
        arguments = {k: v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) and
                     v.is_floating_point() else v for k, v in arguments.items()}
    with _time_limit(CALL_TIMEOUT_S), (_fp64_truth() if truth else _nothing()):
        outputs = _leaves(function(**arguments))
        inputs = {k: v for k, v in arguments.items() if torch.is_tensor(v) and v.requires_grad}
        differentiable = [v for v in outputs.values() if torch.is_tensor(v) and v.requires_grad]
        grads = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in inputs.items()}
        if differentiable and inputs:
            total = sum((i + 2) * v.double().sum() for i, v in enumerate(differentiable))
            found = torch.autograd.grad(total, list(inputs.values()), allow_unused=True)
            for key, grad in zip(inputs, found, strict=True):
                if grad is not None:
                    grads[key] = grad.detach().double()
    return outputs, grads


def _leaves(outputs: dict) -> dict:
    """Outputs with tuples, lists and dicts spread into named leaves (``return[0]``, ``metrics['loss']``)."""
    flat = {}

    def walk(name, value):
        if isinstance(value, tuple | list):
            flat[f"{name}:structure"] = f"{type(value).__name__} of {len(value)}"
            for index, item in enumerate(value):
                walk(f"{name}[{index}]", item)
        elif isinstance(value, dict):
            flat[f"{name}:structure"] = repr(sorted(map(repr, value)))
            for key, item in value.items():
                walk(f"{name}[{key!r}]", item)
        else:
            flat[name] = value

    for name, value in outputs.items():
        walk(name, value)
    return flat


@contextmanager
def _nothing():
    yield


def _as_tensor(value):
    if torch.is_tensor(value):
        return value.detach().double()
    if isinstance(value, bool | int | float):
        return torch.tensor(float(value), dtype=torch.float64)
    return None


def _difference(new, old) -> float | str:
    """The largest absolute difference, or a reason they cannot be compared."""
    if old is _UNBOUND:
        return 0.0
    if new is _UNBOUND:
        return "leaves it unbound"
    if torch.is_tensor(old) and not torch.is_tensor(new):
        return f"is a {type(new).__name__}, not a tensor"
    a, b = _as_tensor(new), _as_tensor(old)
    if a is None or b is None:
        return 0.0 if new == old else "differs"
    if a.shape != b.shape:
        return f"has shape {tuple(a.shape)}, not {tuple(b.shape)}"
    if not a.numel():
        return 0.0
    difference = (a - b).abs()
    both_nan = a.isnan() & b.isnan()
    both_inf = (a == b) & a.isinf()
    difference = torch.where(both_nan | both_inf, torch.zeros_like(difference), difference)
    return float(difference.max())


def _scale(value) -> float:
    tensor = _as_tensor(value) if value is not _UNBOUND else None
    if tensor is None or not tensor.numel():
        return 1.0
    finite = tensor[tensor.isfinite()]
    return 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)


def _pairs(new, old, paths: dict[str, str]):
    outputs_new, grads_new = new
    outputs_old, grads_old = old
    pairs = [(f"`{name}`", outputs_new.get(name, _UNBOUND), value) for name, value in outputs_old.items()]
    pairs += [(f"the gradient of `{paths.get(name, name)}`", grads_new.get(name, torch.zeros_like(g)), g)
              for name, g in grads_old.items()]
    return pairs


def _trivial(result) -> bool:
    """Every floating output and every gradient is zero: the site computed no loss on this input."""
    outputs, grads = result
    for value in (*outputs.values(), *grads.values()):
        floating = (torch.is_tensor(value) and value.is_floating_point()) or isinstance(value, float)
        tensor = _as_tensor(value) if floating else None
        if tensor is not None and tensor.numel() and bool((tensor != 0).any()):
            return False
    return True


def _precision(case: Case, arguments: dict) -> float:
    """The machine epsilon of the least precise float type in the case (fp64's if none is lower)."""
    dtypes = {case.dtype, *(v for v in arguments.values() if isinstance(v, torch.dtype) and v.is_floating_point)}
    dtypes |= {v.dtype for v in arguments.values() if torch.is_tensor(v) and v.is_floating_point()}
    return max(torch.finfo(dtype).eps for dtype in dtypes)


class _Judge:
    def __init__(self, program: SiteProgram):
        self.program = program
        self.slots = program.slots
        self.original = _compile(program.original, program.outputs, "original")
        self.rewritten = _compile(program.rewritten, program.outputs, "rewritten")

    def judge(self, case: Case) -> tuple[str, str | None]:
        """``("skip" | "trivial" | "equal", None)`` or ``("fail", reason)`` with the failure's code in front."""
        arguments = values(case, self.slots)
        try:
            old = _run(self.original, arguments)
        except _Timeout as error:
            return "fail", f"{Code.VERIFIER_FAILED.code}: the original: {error}"
        except Exception:
            return "skip", None
        try:
            with _utility_modules(self.program.utility):
                new = _run(self.rewritten, arguments)
        except _Timeout as error:
            return "fail", f"{Code.VERIFIER_FAILED.code}: the rewrite: {error}"
        except (TypeError, ValueError) as error:
            if _trivial(old):  # the loop computed nothing: argument checks it never needed do not count
                return "trivial", None
            if any(slot.contract and case.lengths.get(slot.param) for slot in self.slots):
                return "skip", None  # a tensor the utility documents as [B, S] given another length
            return "fail", f"{Code.REWRITE_RAISES.code}: the rewrite raises {type(error).__name__}: " \
                           f"{str(error).splitlines()[0] if str(error) else ''} (on {case.describe(self.slots)})"
        except Exception as error:
            return "fail", f"{Code.REWRITE_RAISES.code}: the rewrite raises {type(error).__name__}: " \
                           f"{str(error).splitlines()[0] if str(error) else ''} (on {case.describe(self.slots)})"
        problem = self._compare(new, old, case, arguments)
        if problem:
            return "fail", f"{Code.NOT_EQUIVALENT.code}: {problem} (on {case.describe(self.slots)})"
        return ("trivial" if _trivial(old) else "equal"), None

    def _compare(self, new, old, case: Case, arguments: dict) -> str | None:
        paths = {slot.param: slot.path for slot in self.slots}
        pairs = _pairs(new, old, paths)
        exact = True
        for label, got, want in pairs:
            difference = _difference(got, want)
            if isinstance(difference, str):
                return f"{label} {difference}"
            if difference > TOLERANCE * _scale(want):
                exact = False
        if exact:
            return None
        try:
            truth = _run(self.original, arguments, truth=True)
        except Exception:
            truth = old
        epsilon = _precision(case, arguments)
        slack = TOLERANCE if epsilon <= torch.finfo(torch.float64).eps else LOW_PRECISION_SLACK
        for (label, got, want), (_, reference, _) in zip(pairs, _pairs(truth, truth, paths), strict=True):
            new_error, old_error = _difference(got, reference), _difference(want, reference)
            if isinstance(new_error, str) or isinstance(old_error, str):
                return f"{label} cannot be compared with the fp64 truth"
            within_rounding = epsilon > slack and _difference(got, want) <= 2 * epsilon * _scale(want)
            if new_error > 1.25 * old_error + slack * _scale(reference) and not within_rounding:
                return f"{label} differs by {_difference(got, want):.3g} (error {new_error:.3g} against fp64, " \
                       f"the loop's {old_error:.3g})"
        return None


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
            _run(judge.original, values(case, program.slots))
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
    counted = 0
    for case in variations(base, program.slots, seed):
        outcome, reason = judge.judge(case)
        if outcome == "fail":
            return Verdict(program.line, False, reason.split(":")[0], reason, counted)
        counted += outcome == "equal"
    if counted < MIN_CASES:
        return Verdict(program.line, False, Code.NOT_EXERCISED.code,
                       f"{Code.NOT_EXERCISED.code}: only {counted} inputs on which the original runs and computes "
                       f"something (at least {MIN_CASES} needed)", counted)
    return Verdict(program.line, True, None, None, counted)
