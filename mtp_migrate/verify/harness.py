"""How a verification case runs and is judged: torch only, so that tests emitted into a
migrated repository (``apply --emit-tests``) carry this very code, verbatim, and judge the
frozen loop and its replacement exactly as the verifier did.

A program is a function of its inputs that returns ``_mtp_outputs(locals(), value)``.
``run`` calls it on fresh leaves and collects the named outputs and the gradient of every
input that requires grad; ``compare`` says where a rewrite's results differ from the
original's: the same Python type, tensor dtype and shape, NaN and infinities where the
original has them, and values within 1e-9 where the original computes in fp64; where it
rounds to a lower precision, no worse than the original against an fp64 truth.
"""

from __future__ import annotations

import math
import sys
import types
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

TOLERANCE = 1e-9
LOW_PRECISION_SLACK = 1e-6
BASE_SHAPE = {"B": 2, "S": 7, "H": 3, "V": 11}  # B differs from H; S leaves every head some positions
UNBOUND = object()
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOGITS_KINDS = ("logits", "logits_nonfinite")


@dataclass(frozen=True)
class Input:
    """One input of both programs: ``path`` as the pipeline writes it, passed as parameter ``param``."""

    param: str
    path: str
    kind: str  # "tensor", "scalar", "dtype", "device", "sized" (a collection whose length is read)
    rank: int | None = None


@dataclass(frozen=True)
class Case:
    """Shapes (B, S, H heads, V), a precision, and a value kind for every input."""

    shape: dict = field(default_factory=lambda: dict(BASE_SHAPE))
    dtype: torch.dtype = torch.float64
    choices: dict = field(default_factory=dict)  # input param -> candidate
    lengths: dict = field(default_factory=dict)  # input param -> S offset of its dimension 1
    seed: int = 0
    singleton: tuple = ()  # input params given a trailing dimension of 1 ([B, S, 1])
    dtypes: dict = field(default_factory=dict)  # input param -> its floating dtype, where not ``dtype``

    def describe(self, inputs) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.shape.items())
        parts = [shape, str(self.dtype).removeprefix("torch.")]
        for slot in inputs:
            choice = self.choices.get(slot.param)
            parts.append(f"{slot.path}={_show(choice)}")
            if self.lengths.get(slot.param):
                parts.append(f"{slot.path} length S{self.lengths[slot.param]:+d}")
            if slot.param in self.singleton:
                parts.append(f"{slot.path} with a trailing dimension of 1")
            if slot.param in self.dtypes:
                parts.append(f"{slot.path} in {str(self.dtypes[slot.param]).removeprefix('torch.')}")
        return ", ".join(parts)


def case_id(case: Case) -> str:
    """A short test id: ``B2-S7-H3-V11-float64``."""
    return "-".join(f"{k}{v}" for k, v in case.shape.items()) + "-" + str(case.dtype).removeprefix("torch.")


def _show(choice) -> str:
    if isinstance(choice, tuple):
        kind, offset = choice
        return str(offset) if kind == "const" else f"{kind}{offset:+d}" if offset else kind
    return str(choice).removeprefix("torch.")


def make_inputs(case: Case, inputs) -> dict:
    """The argument for every input under ``case`` (fresh tensors: leaves that may require grad)."""
    gen = torch.Generator().manual_seed(case.seed)
    arguments = {}
    for slot in inputs:
        choice = case.choices[slot.param]
        if slot.kind == "scalar":
            kind, offset = choice
            arguments[slot.param] = offset if kind == "const" else case.shape[kind] + offset
        elif slot.kind == "sized":  # a list of that length (`model.heads`)
            kind, offset = choice
            arguments[slot.param] = [None] * (case.shape[kind] + offset)
        elif slot.kind == "device":
            arguments[slot.param] = torch.device(choice)
        elif slot.kind == "dtype":
            arguments[slot.param] = choice
        else:
            kind, _, rank = choice.partition("@")
            rank = (int(rank) if rank.isdigit() else rank) if rank else 4 if kind in LOGITS_KINDS else slot.rank
            tensor = _tensor(kind, rank, case, gen, case.lengths.get(slot.param, 0),
                             case.dtypes.get(slot.param, case.dtype))
            if slot.param in case.singleton:
                tensor = tensor.detach().unsqueeze(-1).requires_grad_(tensor.requires_grad)
            arguments[slot.param] = tensor
    return arguments


def _tensor(kind: str, rank: int | str | None, case: Case, gen, delta: int, dtype: torch.dtype) -> torch.Tensor:
    b, s, h, v = case.shape["B"], case.shape["S"] + delta, case.shape["H"], case.shape["V"]
    dims = {0: (), 1: (b,), 2: (b, s), 3: (b, s, h), 4: (b, s, h, v), "heads": (h + 1,)}.get(rank or 2,
                                                                                         (b, s, h, v, 2))
    if kind in LOGITS_KINDS:
        logits = 3 * torch.randn(dims, generator=gen, dtype=torch.float64)
        if kind == "logits_nonfinite" and len(dims) == 4:
            _non_finite_rows(logits)
        return logits.to(dtype).requires_grad_(True)
    if kind == "scalar":
        return torch.tensor(1.5, dtype=dtype)
    if kind == "tokens":
        tokens = torch.randint(0, v, dims, generator=gen)
        if len(dims) >= 2:
            tokens[:, :2] = -100  # an ignored prompt
            tokens[-1, -2:] = -100  # padding
        return tokens
    ones = torch.ones(dims, dtype=torch.long)
    if len(dims) >= 2:
        ones[-1, -2:] = 0  # padding
        if dims[1] > 4:
            ones[0, 4] = 0  # a masked position whose label is not ignored
    raw = torch.rand(dims, generator=gen, dtype=torch.float64)
    made = {
        "mask_long": lambda: ones,
        "mask_bool": lambda: ones.bool(),
        "mask_float": lambda: ones.to(dtype),
        "mask_soft": lambda: (raw * ones).to(dtype),
        "mask_segments": lambda: ones * torch.randint(1, 4, dims, generator=gen),
        "mask_grad": lambda: (raw * ones).to(dtype).requires_grad_(True),
        "weights": lambda: raw.to(dtype).requires_grad_(True),
        "weights_negative": lambda: (4 * raw - 2).to(dtype).requires_grad_(True),
        "weights_large": lambda: (1 + 5 * raw).to(dtype).requires_grad_(True),
        "weights_integer": lambda: torch.randint(0, 4, dims, generator=gen),
    }
    return made[kind]()


def _non_finite_rows(logits: torch.Tensor) -> None:
    """NaN logits in every head's row whose target the masks below zero (``[0, 4]``: a masked token whose
    label is not ignored), and an infinite logit in the rows whose target is padding (``[-1, -2:]``): what
    padded rows really hold, and what a loop that ignores those targets keeps out of its loss exactly."""
    _, s, h, _ = logits.shape
    for k in range(1, h + 1):  # head k reads position t for the target t + k
        if 4 - k >= 0 and s > 4:
            logits[0, 4 - k, k - 1] = math.nan
        for target in (s - 2, s - 1):
            if target - k >= 0:
                logits[-1, target - k, k - 1, 0] = math.inf


class _Box:
    """A stand-in for an object the site reads both by attribute and by item."""

    def __init__(self, attrs: dict, items: dict):
        self.__dict__.update(attrs)
        self._items = items

    def __getitem__(self, key):
        return self._items[key]


def _mtp_box(attrs: dict, items: dict):
    if not items:
        return types.SimpleNamespace(**attrs)
    return dict(items) if not attrs else _Box(attrs, items)


def _mtp_outputs(scope: dict, returned):
    return returned, dict(scope)


def _widened(func, args: tuple, kwargs: dict):
    """The call with every float-to-float cast and float dtype argument in fp64."""
    if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16):
        # A copy, as the narrowing cast makes one (`.double()` of an fp64 leaf is the leaf itself).
        return torch.Tensor.to, (args[0], torch.float64), {**kwargs, "copy": True}
    args = tuple(torch.float64 if isinstance(a, torch.dtype) and a in _FLOAT_DTYPES else a for a in args)
    if isinstance(kwargs.get("dtype"), torch.dtype) and kwargs["dtype"] in _FLOAT_DTYPES:
        kwargs = {**kwargs, "dtype": torch.float64}
    return func, args, kwargs


class _WidenFloats(TorchFunctionMode):
    """Every float-to-float cast and float dtype argument becomes fp64: the loop's formula, exactly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        func, args, kwargs = _widened(func, args, dict(kwargs or {}))
        return func(*args, **kwargs)


def _fp64_copy(value):
    """A detached copy, in fp64 if floating, of every tensor in ``value`` (an in-place call may change it)."""
    if torch.is_tensor(value):
        return value.detach().to(torch.float64 if value.is_floating_point() else value.dtype, copy=True)
    if isinstance(value, tuple | list):
        return type(value)(_fp64_copy(item) for item in value)
    if isinstance(value, dict):
        return {key: _fp64_copy(item) for key, item in value.items()}
    return value


class _Rounding(TorchFunctionMode):
    """The least precise floating type to which some operation really rounds its result: the
    result differs from the same operation in fp64 (views, zeros, casts that widen, products
    of 0/1 masks round nothing)."""

    def __init__(self):
        super().__init__()
        self.epsilon = torch.finfo(torch.float64).eps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        exact = None  # not computable in fp64: the result counts as rounded
        with suppress(Exception), torch.no_grad():
            wide, wide_args, wide_kwargs = _widened(func, _fp64_copy(args), _fp64_copy(kwargs))
            exact = wide(*wide_args, **wide_kwargs)
        result = func(*args, **kwargs)
        results = result if isinstance(result, tuple | list) else (result,)
        exacts = exact if isinstance(exact, tuple | list) else (exact,)
        for index, value in enumerate(results):
            if torch.is_tensor(value) and value.is_floating_point():
                truth = exacts[index] if index < len(exacts) else None
                if not (torch.is_tensor(truth) and truth.shape == value.shape and bool(_same(value.detach().double(),
                                                                                             truth.double()).all())):
                    self.epsilon = max(self.epsilon, torch.finfo(value.dtype).eps)
        return result


def rounding(function, arguments: dict) -> float:
    """The machine epsilon of the least precise type the program rounds to (fp64's if it rounds to no lower)."""
    arguments = {k: _leaf_copy(v) for k, v in arguments.items()}
    with _Rounding() as mode:
        function(**arguments)
    return mode.epsilon


@contextmanager
def _fp64_truth():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _WidenFloats():
            yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def _nothing():
    yield


def _leaf_copy(value):
    if torch.is_tensor(value):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


def run(function, arguments: dict, outputs: list[str], truth: bool = False):
    """``(outputs, grads)``: the named outputs and the gradients of every input that requires grad."""
    arguments = {k: _leaf_copy(v) for k, v in arguments.items()}
    if truth:
        arguments = {k: v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) and
                     v.is_floating_point() else v for k, v in arguments.items()}
    with _fp64_truth() if truth else _nothing():
        returned, scope = function(**arguments)
        results = _leaves({"return": returned, **{name: scope.get(name, UNBOUND) for name in outputs}})
        inputs = {k: v for k, v in arguments.items() if torch.is_tensor(v) and v.requires_grad}
        differentiable = [v for v in results.values() if torch.is_tensor(v) and v.requires_grad]
        grads = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in inputs.items()}
        if differentiable and inputs:
            total = sum((i + 2) * v.double().sum() for i, v in enumerate(differentiable))
            found = torch.autograd.grad(total, list(inputs.values()), allow_unused=True)
            for key, grad in zip(inputs, found, strict=True):
                if grad is not None:
                    grads[key] = grad.detach().double()
    return results, grads


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


def _as_tensor(value):
    if torch.is_tensor(value):
        return value.detach().double()
    if isinstance(value, bool | int | float):
        return torch.tensor(float(value), dtype=torch.float64)
    return None


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Entrywise equality where NaN equals NaN."""
    return (a == b) | (a.isnan() & b.isnan())


def _kind(value) -> str:
    if torch.is_tensor(value):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return f"Python {type(value).__name__}"


def _mismatch(new, old) -> str | None:
    """How ``new`` is not what ``old`` is, whatever the tolerance: unbound, another Python type,
    tensor dtype or shape, or NaN or infinite entries that differ (NaN equals only NaN)."""
    if old is UNBOUND:
        return None
    if new is UNBOUND:
        return "leaves it unbound"
    both_tensors = torch.is_tensor(new) and torch.is_tensor(old)
    if (type(new) is not type(old) and not both_tensors) or (
            both_tensors and (new.dtype != old.dtype or new.shape != old.shape)):
        return f"is a {_kind(new)}, not a {_kind(old)}"
    a, b = _as_tensor(new), _as_tensor(old)
    if a is None or b is None:
        return None if new == old else "differs"
    if bool((~_same(a, b) & ~(a.isfinite() & b.isfinite())).any()):
        return "has NaN or infinite entries where the original's differ"
    return None


def _error(value, reference, over) -> float:
    """The largest absolute difference between two numbers or same-shaped tensors, over the
    entries where ``over`` (the original's value) is finite."""
    a, b, where = _as_tensor(value), _as_tensor(reference), _as_tensor(over)
    if a is None or b is None:
        return 0.0
    difference = torch.where(_same(a, b), torch.zeros_like(a), (a - b).abs())
    if where is not None:
        difference = difference[where.isfinite()]
    return float(difference.nan_to_num(nan=math.inf).max()) if difference.numel() else 0.0


def _comparable(value, truth) -> bool:
    if truth is UNBOUND:
        return True
    a, b = _as_tensor(value), _as_tensor(truth)
    return a.shape == b.shape if a is not None and b is not None else value == truth


def _scale(value) -> float:
    tensor = _as_tensor(value) if value is not UNBOUND else None
    if tensor is None or not tensor.numel():
        return 1.0
    finite = tensor[tensor.isfinite()]
    return 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)


def _pairs(new, old, paths: dict[str, str], arguments: dict):
    """``(label, new value, old value, epsilon of how it is stored)``: every output, every gradient."""
    outputs_new, grads_new = new
    outputs_old, grads_old = old
    fp64 = torch.finfo(torch.float64).eps
    pairs = [(f"`{name}`", outputs_new.get(name, UNBOUND), value, fp64) for name, value in outputs_old.items()]
    pairs += [(f"the gradient of `{paths.get(name, name)}`", grads_new.get(name, torch.zeros_like(g)), g,
               torch.finfo(arguments[name].dtype).eps) for name, g in grads_old.items()]
    return pairs


def is_trivial(result) -> bool:
    """Every floating output and every gradient is zero: the site computed no loss on this input."""
    outputs, grads = result
    for value in (*outputs.values(), *grads.values()):
        floating = (torch.is_tensor(value) and value.is_floating_point()) or isinstance(value, float)
        tensor = _as_tensor(value) if floating else None
        if tensor is not None and tensor.numel() and bool((tensor != 0).any()):
            return False
    return True


def compare(new, old, truth, precision, case: Case, arguments: dict, inputs) -> str | None:
    """Where the rewrite's ``new`` results differ from the original's ``old``, or ``None``.

    Types, dtypes, shapes and non-finite entries must agree exactly. Values must agree within
    1e-9 unless the original rounds to a lower precision: ``precision()`` runs the original
    and gives the epsilon of the least precise type it rounds to, and ``truth()`` runs it in
    fp64; both are called only when the values are not within 1e-9. A gradient is also
    stored in its input's precision. A rewrite that rounds where the original does not
    (say in fp32 where the loop casts to fp64) gets no slack.
    """
    paths = {slot.param: slot.path for slot in inputs}
    pairs = _pairs(new, old, paths, arguments)
    exact = True
    for label, got, want, _ in pairs:
        problem = _mismatch(got, want)
        if problem:
            return f"{label} {problem}"
        if _error(got, want, want) > TOLERANCE * _scale(want):
            exact = False
    if exact:
        return None
    reference = old
    with suppress(Exception):  # an original that cannot run widened to fp64 is its own truth
        reference = truth()
    rounded = precision()
    for (label, got, want, stored), (_, fp64, _, _) in zip(pairs, _pairs(reference, reference, paths, arguments),
                                                           strict=True):
        if not _comparable(got, fp64):
            return f"{label} cannot be compared with the fp64 truth"
        epsilon = max(rounded, stored)
        slack = TOLERANCE if epsilon <= torch.finfo(torch.float64).eps else LOW_PRECISION_SLACK
        new_error, old_error = _error(got, fp64, want), _error(want, fp64, want)
        within_rounding = epsilon > slack and _error(got, want, want) <= 2 * epsilon * _scale(want)
        if new_error > 1.25 * old_error + slack * _scale(fp64) and not within_rounding:
            return f"{label} differs by {_error(got, want, want):.3g} (error {new_error:.3g} against fp64, " \
                   f"the loop's {old_error:.3g})"
    return None


@contextmanager
def importable_from(root: Path | None):
    """Imports resolve as they do for the pipeline: ``root`` (where its packages live) first."""
    if root is None:
        yield
        return
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))


def check(original, rewritten, inputs, outputs: list[str], case: Case, import_root: Path | None = None) -> None:
    """Assert that ``rewritten`` computes what ``original`` computes on ``case``: values and gradients."""
    arguments = make_inputs(case, inputs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost (20x)
    try:
        with importable_from(import_root):
            old = run(original, arguments, outputs)
            new = run(rewritten, arguments, outputs)
            problem = compare(new, old, lambda: run(original, arguments, outputs, truth=True),
                              lambda: rounding(original, arguments), case, arguments, inputs)
    finally:
        torch.set_num_threads(threads)
    assert problem is None, f"{problem} (on {case.describe(inputs)})"
