"""The input domain of a verification: values for every slot, chosen to contradict assumptions.

A case fixes the shapes (B, S, H heads, V) and a choice for each slot. Integers are
symbolic in the shapes (``H-1``, ``S``, ``V``...) so that a head count below, at and above
the logits' heads follows the shape; tensors take any value kind whatever their name
says: token ids with ignored positions, 0/1 masks as long, bool or float, soft and
segment-id masks, a mask that requires grad, weights that are negative, above 1 or
integer. Names only order the candidates (the likeliest first), never restrict them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

BASE_SHAPE = {"B": 2, "S": 7, "H": 3, "V": 11}  # B differs from H; S leaves every head some positions
SHAPE_VARIANTS = [{"S": 1}, {"S": 2}, {"S": 3}, {"S": 4}, {"S": 12}, {"B": 1}, {"B": 3}, {"B": 4}, {"V": 2},
                  {"V": 37}, {"H": 1}, {"H": 2}, {"H": 4}]
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)

SCALARS = [("H", 0), ("H", -1), ("H", 1), ("S", 0), ("S", -1), ("S", 1), ("V", 0), ("B", 0), ("const", -100),
           ("const", 0), ("const", 1), ("const", 2), ("const", 0.5)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64]
TENSOR_KINDS = ["tokens", "mask_long", "mask_bool", "mask_float", "mask_soft", "mask_segments", "mask_grad",
                "weights", "weights_negative", "weights_large", "weights_integer"]
_PREFERRED = [  # (words in the slot's name, what to try first)
    (("label", "target", "token", "ids"), "tokens"),
    (("mask",), "mask_long"),
    (("weight", "sel", "reward", "adv", "coef", "score"), "weights"),
    (("future", "head", "n_"), ("H", 0)),
    (("vocab",), ("V", 0)),
    (("seq", "len", "length"), ("S", 0)),
    (("batch",), ("B", 0)),
    (("ignore", "pad"), ("const", -100)),
]


@dataclass(frozen=True)
class Case:
    shape: dict = field(default_factory=lambda: dict(BASE_SHAPE))
    dtype: torch.dtype = torch.float64
    choices: dict = field(default_factory=dict)  # slot param -> candidate
    lengths: dict = field(default_factory=dict)  # slot param -> S offset of its dimension 1
    seed: int = 0

    def describe(self, slots) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.shape.items())
        parts = [shape, str(self.dtype).removeprefix("torch.")]
        for slot in slots:
            choice = self.choices.get(slot.param)
            parts.append(f"{slot.path}={_show(choice)}")
            if self.lengths.get(slot.param):
                parts.append(f"{slot.path} length S{self.lengths[slot.param]:+d}")
        return ", ".join(parts)


def _show(choice) -> str:
    if isinstance(choice, tuple):
        kind, offset = choice
        return str(offset) if kind == "const" else f"{kind}{offset:+d}" if offset else kind
    return str(choice).removeprefix("torch.")


def candidates(slot) -> list:
    """Every value kind a slot may take, the likeliest first by its name."""
    if slot.kind == "tensor":
        if (slot.rank or 0) >= 4:
            options = ["logits"]
        elif slot.rank == 0:
            options = ["scalar"]
        elif slot.rank == 3 and not slot.rank_is_exact:  # at least 3: the logits, or per-head values
            options = ["logits", *(f"{kind}@3" for kind in TENSOR_KINDS)]
        else:
            options = list(TENSOR_KINDS)
    elif slot.kind == "dtype":
        options = list(DTYPES)
    elif slot.kind == "device":
        options = [torch.device("cpu")]
    else:
        options = list(SCALARS)
    for words, preferred in _PREFERRED:
        matching = [o for o in options if o == preferred or (isinstance(o, str) and o.split("@")[0] == preferred)]
        if any(word in slot.hint for word in words) and matching:
            options = [*matching, *(o for o in options if o not in matching)]
            break
    return options


def base_cases(slots, seed: int) -> list[Case]:
    """Assignments to try, in order, until the original runs on one."""
    options = {slot.param: candidates(slot) for slot in slots}
    first = Case(choices={p: o[0] for p, o in options.items()}, seed=seed)
    tried = [first]
    for slot in slots:  # one slot at a time
        for option in options[slot.param][1:]:
            tried.append(replace(first, choices={**first.choices, slot.param: option}))
    rng = random.Random(seed)
    for _ in range(48):  # then several at once
        tried.append(replace(first, choices={p: rng.choice(o) for p, o in options.items()}))
    return tried


def variations(base: Case, slots, seed: int) -> list[Case]:
    """The cases around a base the original runs on: each assumption contradicted in turn."""
    cases = [base]
    for slot in slots:
        for option in candidates(slot):
            if option != base.choices[slot.param]:
                cases.append(replace(base, choices={**base.choices, slot.param: option}))
    for change in SHAPE_VARIANTS:
        cases.append(replace(base, shape={**base.shape, **change}))
    for dtype in LOW_PRECISION:
        cases.append(replace(base, dtype=dtype))
    for slot in slots:
        if slot.kind == "tensor" and slot.rank != 0:
            for delta in (-1, 1):
                cases.append(replace(base, lengths={slot.param: delta}))
    rng = random.Random(seed)
    for index in range(8):
        cases.append(Case(shape={**base.shape, **rng.choice(SHAPE_VARIANTS[:5])},
                          dtype=rng.choice((torch.float64, torch.float64, torch.bfloat16)),
                          choices={s.param: rng.choice(candidates(s)) for s in slots}, seed=seed + index + 1))
    return cases


def values(case: Case, slots) -> dict:
    """The argument for every slot under ``case`` (fresh tensors: leaves that may require grad)."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = case.shape
    arguments = {}
    for slot in slots:
        choice = case.choices[slot.param]
        if slot.kind == "scalar":
            kind, offset = choice
            arguments[slot.param] = offset if kind == "const" else shape[kind] + offset
        elif slot.kind in ("dtype", "device"):
            arguments[slot.param] = choice
        else:
            kind, _, rank = choice.partition("@")
            rank = int(rank) if rank else 4 if kind == "logits" else slot.rank
            arguments[slot.param] = _tensor(kind, rank, shape, case, gen, case.lengths.get(slot.param, 0))
    return arguments


def _tensor(kind: str, rank: int | None, shape: dict, case: Case, gen, delta: int) -> torch.Tensor:
    b, s, h, v = shape["B"], shape["S"] + delta, shape["H"], shape["V"]
    dims = {0: (), 1: (b,), 2: (b, s), 3: (b, s, h), 4: (b, s, h, v)}.get(rank or 2, (b, s, h, v, 2))
    if kind == "logits":
        return (3 * torch.randn(dims, generator=gen, dtype=torch.float64)).to(case.dtype).requires_grad_(True)
    if kind == "scalar":
        return torch.tensor(1.5, dtype=case.dtype)
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
        "mask_float": lambda: ones.to(case.dtype),
        "mask_soft": lambda: (raw * ones).to(case.dtype),
        "mask_segments": lambda: ones * torch.randint(1, 4, dims, generator=gen),
        "mask_grad": lambda: (raw * ones).to(case.dtype).requires_grad_(True),
        "weights": lambda: raw.to(case.dtype).requires_grad_(True),
        "weights_negative": lambda: (4 * raw - 2).to(case.dtype).requires_grad_(True),
        "weights_large": lambda: (1 + 5 * raw).to(case.dtype).requires_grad_(True),
        "weights_integer": lambda: torch.randint(0, 4, dims, generator=gen),
    }
    return made[kind]()
