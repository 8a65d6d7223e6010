"""The verification subprocess: JSON programs on stdin, one verdict per program on stdout."""

from __future__ import annotations

import importlib
import json
import sys

import torch

from codemods.verify.harness import SHAPE

CASES = ("random", "empty_head", "all_masked", "bf16")
TOLERANCE = 1e-9


def _inputs(case: str, per_head_weights: bool, seed: int = 0):
    batch, seq, heads, vocab = SHAPE
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, seq, heads, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, :2] = -100  # an ignored prompt
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -2:] = 0  # padding whose labels are ignored ...
    labels[-1, -2:] = -100
    mask[0, 4] = 0  # ... and a masked token whose label is not
    weights = torch.rand((batch, seq, heads) if per_head_weights else (batch, seq), generator=gen, dtype=torch.float64)
    if case == "empty_head":  # the last head's targets are positions >= heads: no valid token there
        labels[:, heads:] = -100
        mask[:, heads:] = 0
    if case == "all_masked":
        mask.zero_()
    return {"logits": logits, "labels": labels, "attention_mask": mask, "weights": weights}


def _bind(program, tensors, dtype):
    args = {}
    for name, binding in program["bindings"].items():
        kind = binding[0]
        if kind == "tensor":
            args[name] = tensors[binding[1]]
        elif kind == "dim":
            args[name] = tensors[binding[1]].shape[binding[2]]
        elif kind == "int":
            args[name] = binding[1]
        elif kind == "dtype":
            args[name] = dtype
        elif kind == "module":
            args[name] = importlib.import_module(binding[1])
        else:
            args[name] = getattr(importlib.import_module(binding[1]), binding[2])
    return args


def _run(function, program, tensors, dtype):
    """Outputs and d(sum_i (i+2) * output_i)/d(logits, weights)."""
    tensors = {k: v.detach().clone() if v.is_floating_point() else v for k, v in tensors.items()}
    for role in ("logits", "weights"):
        tensors[role] = tensors[role].to(dtype).requires_grad_(True)
    outputs = function(**_bind(program, tensors, dtype))
    values = [torch.as_tensor(outputs[name], dtype=torch.float64).detach() for name in program["outputs"]]
    differentiable = [outputs[n] for n in program["outputs"] if torch.is_tensor(outputs[n]) and outputs[n].requires_grad]
    if differentiable:
        sum((i + 2) * out.double() for i, out in enumerate(differentiable)).backward()
    grads = [torch.zeros_like(tensors[r], dtype=torch.float64) if tensors[r].grad is None else tensors[r].grad.double()
             for r in ("logits", "weights")]
    return values, grads


def _compare_exact(old, new) -> str | None:
    for label, a, b in [*(("output " + str(i), a, b) for i, (a, b) in enumerate(zip(old[0], new[0], strict=True))),
                        ("logits grad", old[1][0], new[1][0]), ("weights grad", old[1][1], new[1][1])]:
        if not torch.allclose(a, b, atol=TOLERANCE, rtol=TOLERANCE, equal_nan=True):
            return f"{label} differs by {(a - b).abs().max().item():.3g}"
    return None


def _compare_bf16(exact, old, new) -> str | None:
    pairs = [*(("output " + str(i), e, a, b) for i, (e, a, b) in enumerate(zip(exact[0], old[0], new[0], strict=True))),
             ("logits grad", exact[1][0], old[1][0], new[1][0]), ("weights grad", exact[1][1], old[1][1], new[1][1])]
    for label, e, a, b in pairs:
        old_error, new_error = (a - e).norm().item(), (b - e).norm().item()
        if new_error > old_error * 1.01 + 1e-6 * (1 + e.norm().item()):
            return f"bf16 {label}: error {new_error:.3g} vs the original's {old_error:.3g}"
    return None


def verify(program) -> dict:
    namespace: dict = {}
    exec(compile(program["original"], "<original site>", "exec"), namespace)
    exec(compile(program["replacement"], "<replacement>", "exec"), namespace)
    original, replacement = namespace["original"], namespace["replacement"]
    cases, failure = {}, None
    for case in CASES:
        tensors = _inputs(case, program["per_head_weights"])
        try:
            if case == "bf16":
                exact = _run(original, program, {k: v.to(torch.bfloat16).double() if v.is_floating_point() else v
                                                 for k, v in tensors.items()}, torch.float64)
                old = _run(original, program, tensors, torch.bfloat16)
            else:
                old = _run(original, program, tensors, torch.float64)
        except Exception as error:  # the original itself fails here: the case does not count
            cases[case] = f"original raises {type(error).__name__}"
            continue
        try:
            new = _run(replacement, program, tensors, torch.bfloat16 if case == "bf16" else torch.float64)
            problem = _compare_bf16(exact, old, new) if case == "bf16" else _compare_exact(old, new)
        except Exception as error:
            problem = f"replacement raises {type(error).__name__}: {error}"
        cases[case] = problem or "equal"
        if problem and failure is None:
            failure = f"{case}: {problem}"
    counted = [c for c, verdict in cases.items() if not verdict.startswith("original raises")]
    if failure is None and not counted:
        failure = "the original raised on every case"
    return {"line": program["line"], "ok": failure is None, "reason": failure, "cases": cases}


if __name__ == "__main__":
    print(json.dumps([verify(program) for program in json.load(sys.stdin)]))
