"""The input domain of a verification: the cases, chosen to contradict assumptions
(``harness.make_inputs`` turns a case into tensors).

A case fixes the shapes (B, S, H heads, V) and a choice for each slot. Integers are
symbolic in the shapes (``H-1``, ``S``, ``V``...) so that a head count below, at and above
the logits' heads follows the shape; tensors take any value kind whatever their name
says: token ids with ignored positions, 0/1 masks as long, bool or float, soft and
segment-id masks, a mask that requires grad, weights that are negative, above 1 or
integer, and the logits with NaN and infinities in the rows whose targets are masked or
padding. Names only order the candidates (the likeliest first), never restrict them.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from mtp_migrate.verify.harness import Case

LARGE_SHAPE = {"B": 5, "S": 17, "H": 6, "V": 64}  # every dimension above the grid's, once
SHAPE_VARIANTS = [{"S": 1}, {"S": 2}, {"S": 3}, {"S": 4}, {"S": 12}, {"B": 1}, {"B": 3}, {"B": 4}, {"V": 2},
                  {"V": 37}, {"H": 1}, {"H": 2}, {"H": 4}]
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)

SCALARS = [("H", 0), ("H", -1), ("H", 1), ("S", 0), ("S", -1), ("S", 1), ("V", 0), ("B", 0), ("const", -100),
           ("const", 0), ("const", 1), ("const", 2), ("const", 0.5)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64]
FLOATING_KINDS = {"logits", "mask_float", "mask_soft", "mask_grad", "weights", "weights_negative", "weights_large"}
TENSOR_KINDS = ["tokens", "mask_long", "mask_bool", "mask_float", "mask_soft", "mask_segments", "mask_grad",
                "weights", "weights_negative", "weights_large", "weights_integer"]
WEIGHT_KINDS = ["weights", "weights_negative", "weights_large", "weights_integer"]
PER_HEAD = "heads"  # a vector of H + 1 values, one per head and one more (`w[k]` with a main head's weight first)
_PREFERRED = [  # (words in the slot's name, what to try first)
    (("label", "target", "token", "ids"), "tokens"),
    (("mask",), "mask_long"),
    (("head", "scale", "lam"), f"weights@{PER_HEAD}"),  # a vector indexed by the head: `head_scales[k - 1]`
    (("weight", "sel", "reward", "adv", "coef", "score"), "weights"),
    (("future", "head", "n_"), ("H", 0)),
    (("vocab",), ("V", 0)),
    (("seq", "len", "length"), ("S", 0)),
    (("batch",), ("B", 0)),
    (("ignore", "pad"), ("const", -100)),
]


def candidates(slot) -> list:
    """Every value kind a slot may take, the likeliest first by its name."""
    if slot.kind == "tensor":
        if (slot.rank or 0) >= 4:
            options = ["logits"]
        elif slot.rank == 0:
            options = ["scalar"]
        elif slot.rank == 3 and not slot.rank_is_exact:  # at least 3: the logits, or per-head values
            options = ["logits", *(f"{kind}@3" for kind in TENSOR_KINDS)]
        elif slot.rank == 1 and not slot.rank_is_exact:  # indexed once: per sample, or per head (`w[k - 1]`)
            options = [*TENSOR_KINDS, *(f"{kind}@{PER_HEAD}" for kind in WEIGHT_KINDS)]
        else:
            options = list(TENSOR_KINDS)
    elif slot.kind == "sized":
        options = [length for length in SCALARS if length[0] != "const"]
    elif slot.kind == "dtype":
        options = list(DTYPES)
    elif slot.kind == "device":
        options = ["cpu"]
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
    logits = {slot.param: "logits_nonfinite" for slot in slots if base.choices[slot.param] == "logits"}
    if logits:  # padded rows with NaN / inf logits: a loss that ignores their targets is 0 there, exactly
        cases.append(replace(base, choices={**base.choices, **logits}))
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


def extra_cases(base: Case, slots) -> list[Case]:
    """Shapes and precisions real code has and the grid leaves out, tried once a site passed the grid:
    weights of shape ``[B, S, 1]`` (a reward head's), every tensor but the logits one position
    longer (``logits = model(input_ids[:, :-1])``), each floating input in fp64 among fp32 ones,
    and every dimension larger than the grid's."""
    tensors = [slot for slot in slots if slot.kind == "tensor" and slot.rank != 0]
    cases = [replace(base, singleton=(slot.param,)) for slot in tensors if slot.weights and slot.rank == 2]
    longer = {slot.param: 1 for slot in tensors if base.choices[slot.param] != "logits"}
    if longer:
        cases.append(replace(base, lengths=longer))
    for slot in tensors:
        if base.choices[slot.param].split("@")[0] in FLOATING_KINDS:
            cases.append(replace(base, dtype=torch.float32, dtypes={slot.param: torch.float64}))
    cases.append(replace(base, shape=dict(LARGE_SHAPE)))
    return cases
