"""torchfix-style fixture pairs: fixtures/codemod/<case>.in.py -> <case>.out.py.

Run with MTP_UPDATE_FIXTURES=1 to (re)write the .out.py files, then review the diff.
"""

import codecs
import importlib.util
import inspect
import os
import re
from pathlib import Path

import libcst as cst
import pytest
import torch

from mtp_migrate.runner import migrate_source

FIXTURES = Path(__file__).parents[1] / "fixtures" / "codemod"
CASES = sorted(path.name.removesuffix(".in.py") for path in FIXTURES.glob("*.in.py"))
OPTIONS = re.compile(rb"# mtp-migrate: --rho1 (\w+)")


def migrate(case_source: bytes) -> bytes:
    match = OPTIONS.search(case_source)
    return migrate_source(case_source, rho1=match.group(1).decode() if match else "del").output


@pytest.mark.parametrize("case", CASES)
def test_output_matches_expected_file(case):
    source = (FIXTURES / f"{case}.in.py").read_bytes()
    expected_path = FIXTURES / f"{case}.out.py"
    output = migrate(source)
    if os.environ.get("MTP_UPDATE_FIXTURES"):
        expected_path.write_bytes(output)
    assert output == expected_path.read_bytes()


@pytest.mark.parametrize("case", CASES)
def test_output_parses_and_second_run_changes_nothing(case):
    output = (FIXTURES / f"{case}.out.py").read_bytes()
    cst.parse_module(output.removeprefix(codecs.BOM_UTF8))
    compile(output.removeprefix(codecs.BOM_UTF8), case, "exec")
    assert migrate(output) == output


# Every skip fixture's refusal, pinned: its stable code and the reason a user reads.
SKIPS = {
    "skip_compare_after_half_cast": ("MTP117", "`(labels[:, k:].half() != PAD_ID)` compares values a cast rounded "
                                               "first: the call would compare them unrounded"),
    "skip_intermediate_appended": ("MTP110", "per-head value `ce` is used elsewhere: `per_head.append(ce.detach())`"),
    "skip_label_smoothing": ("MTP104", "cross_entropy keyword `label_smoothing` has no equivalent in the utility"),
    "skip_token_mean": ("MTP108", "`total_ce` accumulates `(ce * mask).sum()`, not a per-head ratio of sums "
                                  "(a token mean across heads?)"),
    "skip_unguarded_division": ("MTP109", "`loss` divides by a sum that is not guarded by `> 0` (the loop gives "
                                          "NaN or a value where the utility gives 0)"),
    "skip_utility_itself": ("MTP118", "a loop inside the loss utility itself"),
    "skip_torchscript": ("MTP120", "a loop inside a `torch.jit` function: TorchScript cannot compile the utility, "
                                   "so the module would fail at import"),
}


def test_skip_cases_are_unchanged_with_their_code_and_reason():
    assert sorted(SKIPS) == [case for case in CASES if case.startswith("skip_")]
    for case, (code, reason) in SKIPS.items():
        source = (FIXTURES / f"{case}.in.py").read_bytes()
        assert source == (FIXTURES / f"{case}.out.py").read_bytes(), case
        sites = migrate_source(source).sites
        assert [(s.action.value, s.refusal.code.code, s.refusal.message) for s in sites] == [("skipped", code, reason)]


def test_line_endings_bom_and_comments_survive():
    source = (FIXTURES / "crlf_bom.in.py").read_bytes()
    output = (FIXTURES / "crlf_bom.out.py").read_bytes()
    assert output.startswith(codecs.BOM_UTF8) and output != source
    assert b"\n" not in output.replace(b"\r\n", b"")  # every line ends in CRLF
    for line in (b"# per-head loss", b"# trailing comment", "\u00e9t\u00e9".encode()):
        assert line in output


# -- equivalence: import both versions and compare every function's outputs and gradients

def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2, dtype=torch.float64)


def _arguments(seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, seq, heads, vocab = 3, 7, 3, 11
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, :2] = -100
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, -3:] = 0
    labels[-1, -3:] = -100
    attention_mask[0, 4] = 0  # a masked token whose label is not ignored
    return {
        "logits": torch.randn(batch, seq, heads, vocab, generator=gen, dtype=torch.float64),
        "labels": labels,
        "attention_mask": attention_mask,
        "weights": torch.rand(batch, seq, generator=gen, dtype=torch.float64),
        "head_weights": (torch.rand(batch, seq, heads, generator=gen, dtype=torch.float64) > 0.4).double(),
        "model": _TinyModel(),
    }


def _flatten(value):
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in _flatten(value[key])]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _flatten(item)]
    return [torch.as_tensor(value, dtype=torch.float64)]


def _run(function, seed):
    args = _arguments(seed)
    grads = {name: args[name].requires_grad_(True) for name in ("logits", "weights", "head_weights")}
    wanted = {name: args[name] for name in inspect.signature(function).parameters}
    outputs = [o.double() for o in _flatten(function(**wanted))]
    total = sum((o * (i + 1)).sum() for i, o in enumerate(outputs) if o.requires_grad)
    if torch.is_tensor(total) and total.requires_grad:
        total.backward()
    return outputs, {name: t.grad for name, t in grads.items()}


@pytest.mark.parametrize("case", CASES)
def test_rewritten_functions_are_equivalent_in_fp64(case):
    before = _load(FIXTURES / f"{case}.in.py", f"{case}_in")
    after = _load(FIXTURES / f"{case}.out.py", f"{case}_out")
    functions = [name for name, value in vars(before).items()
                 if inspect.isfunction(value) and value.__module__ == before.__name__ and not name.startswith("_")]
    assert functions
    for name in functions:
        for seed in range(3):
            want_outputs, want_grads = _run(getattr(before, name), seed)
            got_outputs, got_grads = _run(getattr(after, name), seed)
            assert len(got_outputs) == len(want_outputs)
            for got, want in zip(got_outputs, want_outputs, strict=True):
                torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
            for key, want in want_grads.items():
                got = got_grads[key]
                if want is None or got is None:
                    assert (want is None or not want.any()) and (got is None or not got.any()), key
                else:
                    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12, msg=key)
