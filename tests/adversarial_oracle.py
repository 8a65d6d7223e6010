"""An oracle for the adversarial suite, independent of the tool's own verifier.

Every public function of a case module is called, before and after migration, on a grid
of inputs chosen by parameter name (see ``inputs``). Where the original returns, the
migrated function must return leaves of the same kind (a Python float is not a tensor;
tensors agree in dtype and shape), NaN and infinities where the original has them, and
the same values and gradients of every floating input that requires grad: 1e-9 in fp64;
in bf16/fp32, no worse than the original against the original run in fp64.

The grid deliberately contradicts what pipelines usually assume: B differs from the
head count, S runs from 1 to past the heads, integer parameters (``n_future``, ...)
go below, at and above the logits' heads, masks are bool, float, soft, segment ids or
differentiable, and weights are negative, above 1, integer or per-head. Some names carry
the shapes real code has: ``reward_weights`` ``[B, S, 1]`` (a reward head's output),
``input_weights`` one position short, ``full_labels`` and ``full_attention_mask`` one
position longer than the logits (``model(input_ids[:, :-1])``), ``nan_logits`` NaN
at a position whose every target is an ignored label, and ``masked_nan_logits`` NaN (inf for
head 1) in every head's row whose target is the masked token whose label is not ignored.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode

SUPPORT = Path(__file__).parents[1] / "fixtures" / "adversarial" / "support"
MASK_KINDS = ("long", "bool", "float", "soft", "segments", "grad")
WEIGHT_KINDS = ("positive", "negative", "large", "integer")


@dataclass(frozen=True)
class Case:
    batch: int = 2
    seq: int = 7
    heads: int = 3
    vocab: int = 11
    dtype: torch.dtype = torch.float64
    mask: str = "long"
    weights: str = "positive"
    heads_delta: int = 0  # integer parameters that name a head count: heads + delta
    length_delta: int = 0  # tensors that only carry a length (input_ids): seq + delta
    seed: int = 0

    def describe(self) -> str:
        return (f"B={self.batch} S={self.seq} H={self.heads} V={self.vocab} {str(self.dtype).split('.')[-1]} "
                f"mask={self.mask} weights={self.weights} heads{self.heads_delta:+d} length{self.length_delta:+d}")


def grid() -> list[Case]:
    base = Case()
    cases = [base]
    cases += [replace(base, seq=s) for s in (1, 2, 3, 4, 9)]
    cases += [replace(base, batch=b, seed=b) for b in (1, 3, 4)]
    cases += [replace(base, vocab=v) for v in (2, 37)]
    cases += [replace(base, heads=h, seed=h) for h in (1, 2, 4)]
    cases += [replace(base, mask=m, seed=i) for i, m in enumerate(MASK_KINDS)]
    cases += [replace(base, weights=w, seed=i) for i, w in enumerate(WEIGHT_KINDS)]
    cases += [replace(base, heads_delta=d) for d in (-2, -1, 1)]
    cases += [replace(base, length_delta=d) for d in (-1, 1)]
    cases += [replace(base, dtype=d, mask=m) for d, m in itertools.product((torch.float32, torch.bfloat16),
                                                                            ("long", "soft"))]
    cases += [replace(base, mask=m, weights=w, seed=3) for m, w in (("soft", "negative"), ("segments", "large"))]
    return cases


def _mask(case: Case, gen: torch.Generator, shape) -> torch.Tensor:
    ones = torch.ones(shape, dtype=torch.long)
    ones[-1, -2:] = 0  # padding
    if shape[1] > 4:
        ones[0, 4] = 0  # a masked token whose label is not ignored
    if case.mask == "long":
        return ones
    if case.mask == "bool":
        return ones.bool()
    if case.mask == "float":
        return ones.double()
    if case.mask == "segments":
        return ones * torch.randint(1, 4, shape, generator=gen)
    soft = torch.rand(shape, generator=gen, dtype=torch.float64) * ones
    return soft.requires_grad_(case.mask == "grad")


def _weights(case: Case, gen: torch.Generator, shape) -> torch.Tensor:
    if case.weights == "integer":
        return torch.randint(0, 4, shape, generator=gen)
    raw = torch.rand(shape, generator=gen, dtype=torch.float64)
    raw = {"positive": raw, "negative": 4 * raw - 2, "large": 1 + 5 * raw}[case.weights]
    return raw.requires_grad_(True)


def inputs(case: Case, parameters) -> dict:
    """Arguments for a function with these parameter names; unknown names keep their defaults."""
    gen = torch.Generator().manual_seed(case.seed)
    b, s, h, v = case.batch, case.seq, case.heads, case.vocab
    labels = torch.randint(0, v, (b, s), generator=gen)
    labels[:, :2] = -100  # an ignored prompt
    labels[-1, -2:] = -100  # padding
    heads = h + case.heads_delta
    logits = {name: (3 * torch.randn(b, s, h, v, generator=gen, dtype=torch.float64)).requires_grad_(True)
              for name in ("logits", "pos_logits", "neg_logits")}
    mask = _mask(case, gen, (b, s))
    known = {
        **logits,
        "labels": labels, "pos_labels": labels, "neg_labels": labels.flip(0),
        "attention_mask": mask, "mask": mask, "pos_attention_mask": mask, "loss_mask": mask,
        "weights": _weights(case, gen, (b, s)), "head_weights": _weights(case, gen, (b, s, h)),
        "input_ids": torch.randint(0, v, (b, s + case.length_delta), generator=gen),
        "n_future": heads, "heads": heads, "seq_len": s, "vocab_size": v, "ignore_index": -100,
        "model_dtype": torch.float64, "device": torch.device("cpu"),
    }
    # Shapes real code has, drawn after the rest so that the other inputs keep their values.
    full_labels = torch.cat([labels, torch.randint(0, v, (b, 1), generator=gen)], dim=1)
    full_labels[-1, -3:] = -100  # padding
    nan_logits = 3 * torch.randn(b, s, h, v, generator=gen, dtype=torch.float64)
    if s >= 3:
        nan_logits[-1, s - 3] = float("nan")  # heads 1 and 2 read it for the padded targets s-2 and s-1
    masked_nan_logits = 3 * torch.randn(b, s, h, v, generator=gen, dtype=torch.float64)
    if s > 4:  # the mask's 0 at token 4 (its label is not ignored): head k reads it at position 4 - k
        for k in range(1, min(h, 4) + 1):
            masked_nan_logits[0, 4 - k, k - 1] = float("nan")
        masked_nan_logits[0, 3, 0, 0] = float("inf")
    known.update({
        "masked_nan_logits": masked_nan_logits.requires_grad_(True),
        "reward_weights": _weights(case, gen, (b, s, 1)), "input_weights": _weights(case, gen, (b, s - 1)),
        "full_labels": full_labels, "full_attention_mask": _mask(case, gen, (b, s + 1)),
        "nan_logits": nan_logits.requires_grad_(True),
    })
    config = SimpleNamespace(n_future=heads, vocab_size=v, ignore_index=-100, seq_len=s,
                             model=SimpleNamespace(dtype=torch.float64, n_future=heads))
    known["config"] = known["cfg"] = config
    known["self"] = SimpleNamespace(config=config, n_future=heads, model_dtype=torch.float64,
                                    device=torch.device("cpu"), ignore_index=-100)
    arguments = {}
    for name, parameter in parameters.items():
        if name in known:
            arguments[name] = known[name]
        elif parameter.default is inspect.Parameter.empty:
            raise KeyError(f"the oracle has no input for parameter `{name}`")
    return arguments


def _cast(arguments: dict, dtype: torch.dtype) -> dict:
    """Floating tensors (and ``model_dtype``) in ``dtype``, fresh leaves with the same requires_grad."""
    cast = {}
    for name, value in arguments.items():
        if torch.is_tensor(value) and value.is_floating_point():
            cast[name] = value.detach().to(dtype).requires_grad_(value.requires_grad)
        elif name == "model_dtype":
            cast[name] = dtype
        elif isinstance(value, SimpleNamespace):
            cast[name] = _cast_namespace(value, dtype)
        else:
            cast[name] = value
    return cast


def _cast_namespace(namespace: SimpleNamespace, dtype: torch.dtype) -> SimpleNamespace:
    fields = {}
    for key, value in vars(namespace).items():
        if isinstance(value, SimpleNamespace):
            fields[key] = _cast_namespace(value, dtype)
        else:
            fields[key] = dtype if isinstance(value, torch.dtype) else value
    return SimpleNamespace(**fields)


def _leaves(value) -> list:
    if isinstance(value, dict):
        return [leaf for key in sorted(value, key=str) for leaf in _leaves(value[key])]
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _kind(leaf) -> str:
    """What a returned leaf is beyond its value: a Python type, or a tensor's dtype and shape."""
    if torch.is_tensor(leaf):
        return f"{leaf.dtype} tensor of shape {tuple(leaf.shape)}"
    return type(leaf).__name__


def run(function, arguments: dict):
    """``(values, grads, kinds)``: every returned leaf as fp64, the gradients of the differentiable inputs, and
    what each leaf is (its Python type, or its dtype and shape)."""
    result = function(**arguments)
    leaves = _leaves(result)
    values = [torch.as_tensor(leaf, dtype=torch.float64).detach() if isinstance(leaf, int | float) or torch.is_tensor(leaf)
              else leaf for leaf in leaves]
    differentiable = [leaf for leaf in leaves if torch.is_tensor(leaf) and leaf.requires_grad]
    inputs_with_grad = {name: value for name, value in arguments.items()
                        if torch.is_tensor(value) and value.requires_grad}
    grads = {name: torch.zeros(value.shape, dtype=torch.float64) for name, value in inputs_with_grad.items()}
    if differentiable and inputs_with_grad:
        total = sum((index + 2) * leaf.double().sum() for index, leaf in enumerate(differentiable))
        found = torch.autograd.grad(total, list(inputs_with_grad.values()), allow_unused=True)
        for name, grad in zip(inputs_with_grad, found, strict=True):
            if grad is not None:
                grads[name] = grad.double()
    return values, grads, [_kind(leaf) for leaf in leaves]


def _same(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got == want) | (got.isnan() & want.isnan())


def _error(got, want) -> float:
    """The largest difference; NaN against a number, or one infinity against another value, is infinite."""
    if torch.is_tensor(want) and torch.is_tensor(got):
        if got.shape != want.shape:
            return float("inf")
        if not got.numel():
            return 0.0
        difference = torch.where(_same(got, want), torch.zeros_like(got), (got - want).abs())
        return difference.nan_to_num(nan=float("inf")).max().item()
    return 0.0 if got == want else float("inf")


def _non_finite_differ(got, want) -> bool:
    """NaN equals only NaN and an infinity only itself, whatever the tolerance."""
    if not (torch.is_tensor(want) and torch.is_tensor(got)) or got.shape != want.shape:
        return False
    return bool((~_same(got, want) & ~(got.isfinite() & want.isfinite())).any())


class _ExactFormula(TorchFunctionMode):
    """The loop's own formula in exact arithmetic: every cast to a lower float precision becomes fp64."""

    LOW = (torch.float32, torch.float16, torch.bfloat16)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16):
            # A copy, as the narrowing cast makes one: `.double()` of an fp64 leaf is the leaf itself,
            # and the loop's in-place edits of it would raise.
            return args[0].to(torch.float64, copy=True)
        args = tuple(torch.float64 if isinstance(a, torch.dtype) and a in self.LOW else a for a in args)
        if isinstance(kwargs.get("dtype"), torch.dtype) and kwargs["dtype"] in self.LOW:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def _exact(original, arguments: dict):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _ExactFormula():
            return run(original, _cast(arguments, torch.float64))
    finally:
        torch.set_default_dtype(previous)


def compare(original, migrated, case: Case) -> str | None:
    """``None`` if ``migrated`` matches ``original`` on ``case`` (or the original raises there).

    Matching means within 1e-9 (relative to the values' scale) of what the loop returns;
    where the loop itself rounds (low-precision inputs, or a cast to a lower precision
    inside), it means no further from the loop's exact formula than the loop is, or, in
    low precision, within two rounding units of the loop (two roundings of the same
    numbers cancel differently). The exact formula is the loop run on the same (rounded)
    inputs with every float cast widened to fp64.
    """
    parameters = inspect.signature(original).parameters
    base = _cast(inputs(case, parameters), case.dtype)
    try:
        want = run(original, _cast(base, case.dtype))
    except Exception:
        return None  # the original raises: the case does not count
    try:
        got = run(migrated, _cast(base, case.dtype))
    except Exception as error:
        return f"{case.describe()}: the migrated code raises {type(error).__name__}: {error}"
    if len(got[0]) != len(want[0]):
        return f"{case.describe()}: {len(got[0])} outputs instead of {len(want[0])}"
    for index, (got_kind, want_kind) in enumerate(zip(got[2], want[2], strict=True)):
        if got_kind != want_kind:
            return f"{case.describe()}: output {index} is a {got_kind}, not a {want_kind}"
    pairs = [(f"output {i}", g, w) for i, (g, w) in enumerate(zip(got[0], want[0], strict=True))]
    pairs += [(f"d/d{name}", got[1][name], want[1][name]) for name in want[1]]
    for label, g, w in pairs:
        if _non_finite_differ(g, w):
            return f"{case.describe()}: {label} is NaN or infinite where the original's is not the same"
    scales = [1.0 + (w.abs().max().item() if torch.is_tensor(w) and w.numel() else 0.0) for _, _, w in pairs]
    if all(_error(g, w) <= 1e-9 * scale for (_, g, w), scale in zip(pairs, scales, strict=True)):
        return None
    try:
        exact = _exact(original, base)
    except Exception:
        exact = want
    references = [*exact[0], *(exact[1][name] for name in want[1])]
    slack = 1e-9 if case.dtype == torch.float64 else 1e-6
    for (label, g, w), t, scale in zip(pairs, references, scales, strict=True):
        if not torch.is_tensor(t):
            if _error(g, w) > 0:
                return f"{case.describe()}: {label} differs"
            continue
        rounding = case.dtype != torch.float64 and _error(g, w) <= 2 * torch.finfo(case.dtype).eps * scale
        if _error(g, t) > 1.25 * _error(w, t) + slack * scale and not rounding:
            return (f"{case.describe()}: {label} differs by {_error(g, w):.3g} (error {_error(g, t):.3g} against "
                    f"the exact formula, the original's {_error(w, t):.3g})")
    return None


def load(path: Path, name: str):
    """``path`` as ``python path`` imports it: its own folder, where the utility is vendored, first."""
    if str(SUPPORT) not in sys.path:
        sys.path.insert(0, str(SUPPORT))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def public_functions(module) -> list[str]:
    return [name for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")]


def differences(before: Path, after: Path) -> list[str]:
    """Every case on which a public function of ``after`` departs from ``before``."""
    original, migrated = load(before, f"{before.stem}_before"), load(after, f"{after.stem}_after")
    found = []
    for name in public_functions(original):
        for case in grid():
            problem = compare(getattr(original, name), getattr(migrated, name), case)
            if problem:
                found.append(f"{name}: {problem}")
                break
    return found


def exercised(path: Path) -> int:
    """How many grid cases the original's functions return on (a case that never runs tests nothing)."""
    module = load(path, f"{path.stem}_exercised")
    count = 0
    for name in public_functions(module):
        function = getattr(module, name)
        for case in grid():
            try:
                run(function, _cast(inputs(case, inspect.signature(function).parameters), case.dtype))
                count += 1
            except Exception:
                pass
    return count
