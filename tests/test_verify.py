"""The verifier: it passes the tool's rewrites, catches seeded wrong ones, and is independent of the recognizer."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import libcst as cst
import pytest
import torch
from libcst.codemod import CodemodContext

from mtp_migrate.commands.rewrite_mtp_loop import RewriteMTPLoopCommand
from mtp_migrate.mtp_loop.plan import edit, plan, utility_import
from mtp_migrate.mtp_loop.spec import Action
from mtp_migrate.refusals import Code
from mtp_migrate.vendoring import SHIPPED_UTILITY
from mtp_migrate.verify import programs, verify_sites
from mtp_migrate.verify import worker as verify_worker
from mtp_migrate.verify.harness import Case, _mtp_outputs, compare, rounding, run

FIXTURES = Path(__file__).parents[1] / "fixtures" / "codemod"


def verdicts(source: str, mutate=None, rho1: str = "rewrite") -> dict:
    """Plan ``source``, optionally mutate each rewrite's text, and verify every edited site."""
    module = cst.parse_module(source)
    decisions = plan(module, rho1=rho1)
    if mutate is not None:
        decisions = [replace(d, statements=tuple(cst.parse_module(mutate(cst.Module(body=list(d.statements)).code)).body))
                     if d.action is Action.REWRITTEN else d for d in decisions]
    return verify_sites(module, written(module, decisions), decisions, utility_import(module), str(SHIPPED_UTILITY))


def written(module, decisions):
    """The module as the rewrite command writes it, its edited sites marked for the verifier."""
    command = RewriteMTPLoopCommand(CodemodContext())
    return command.cleanup(edit(module, decisions, mark=True), decisions, utility_import(module))


def fixture(case: str) -> str:
    return (FIXTURES / f"{case}.in.py").read_text()


CASES = ["verifiable_weighted_and_unweighted", "rho1_selective_rewrite", "weighted_only_tensor_accumulator",
         "detached_weights_previous", "positive_negative_two_sites", "precomputed_loss_mask", "logits_double"]


@pytest.mark.parametrize("case", CASES)
def test_the_tools_rewrites_verify(case):
    results = verdicts(fixture(case))
    assert results and all(refusal is None for refusal in results.values()), results


def _sub(pattern: str, substitute: str):
    def mutate(text: str) -> str:
        changed = re.sub(pattern, substitute, text, count=1)
        assert changed != text, pattern
        return changed
    return mutate


BOOL_MASK = """
import torch.nn.functional as F


def loss(logits, labels, attention_mask):
    _, seq_len, n_future, vocab_size = logits.shape
    total = 0.0
    for k in range(1, n_future + 1):
        ce = F.cross_entropy(logits[:, :-k, k - 1].reshape(-1, vocab_size), labels[:, k:].reshape(-1), reduction="none")
        mask = attention_mask[:, k:].bool().reshape(-1)
        mask_sum = mask.sum()
        if mask_sum > 0:
            total += (ce * mask).sum() / mask_sum
    return total / n_future
"""

MASKED_FILL = """
import torch.nn.functional as F


def loss(logits, labels, attention_mask):
    _, seq_len, n_future, vocab_size = logits.shape
    total = 0.0
    for k in range(1, n_future + 1):
        labels_k = labels[:, k:].masked_fill(attention_mask[:, k:] == 0, -100)
        count = (labels_k != -100).sum()
        if count > 0:
            total += F.cross_entropy(logits[:, :-k, k - 1].reshape(-1, vocab_size), labels_k.reshape(-1),
                                     reduction="sum") / count
    return total / n_future
"""

MUTATIONS = {
    "wrong weight alignment": ("verifiable_weighted_and_unweighted", r"weights=weights\[:, :seq_len\],",
                               'weights=weights[:, :seq_len], weight_alignment="previous",'),
    "wrong normalisation": ("verifiable_weighted_and_unweighted", r"weights=weights\[:, :seq_len\],",
                            'weights=weights[:, :seq_len], normalize="weights",'),
    "wrong head averaging": ("rho1_selective_rewrite", r'head_average="valid",', ""),
    "dropped mask_ignored_labels": ("weighted_only_tensor_accumulator", r"mask_ignored_labels=False,", ""),
    "swapped outputs": ("verifiable_weighted_and_unweighted", r'\["weighted_ce_loss"\]', '["unweighted_ce_loss"]'),
    "wrong per-head metric": ("rho1_selective_rewrite", r'\["per_head_ce_loss"\]\[0\]', '["per_head_ce_loss"][1]'),
    "all heads assumed": ("config_heads_noqa_import", r"n_future=N_FUTURE,", ""),
    "mask cast dropped": (BOOL_MASK, r"attention_mask=attention_mask.bool\(\)", "attention_mask=attention_mask"),
    "weights not detached": ("detached_weights_previous", r"weights=weights.detach\(\)", "weights=weights"),
    "an output left unbound": ("verifiable_weighted_and_unweighted", r"(?s)unweighted_ce_loss = \(.*?\n\)", "pass"),
    # What the loop binds beyond its values: the cut, its Python zero, its dtype and its precision.
    "longer labels passed whole": ("verifiable_weighted_and_unweighted", r"labels=labels\[:, :seq_len\]", "labels=labels"),
    "a float accumulator read as a tensor": ("verifiable_weighted_and_unweighted",
                                             r' if ce_losses\["heads_with_tokens"\]\s*else 0.0', ""),
    "the accumulator's dtype dropped": ("weighted_only_tensor_accumulator", r"\.to\(model_dtype\)$", ""),
    "the weights' dtype dropped": ("verifiable_weighted_and_unweighted", r"\.to\(\s*torch\.promote_types\([^\n]*\)\s*\)",
                                   ""),
    "fp32 where the loop computes in fp64": ("logits_double", r"logits=logits\.double\(\)", "logits=logits"),
    "fp32 cast to fp64 where the loop computes in fp64": ("logits_double",
                                                          r'(?s)logits=logits\.double\(\)(.*?)\["unweighted_ce_loss"\]',
                                                          r'logits=logits\1["unweighted_ce_loss"].double()'),
    # The filled labels' loss as the loss times the mask (the reverted 4d3b096): equal on finite logits, NaN where
    # a masked row's logits are NaN and the loop's ignore_index gives 0; only the non-finite logits case sees it.
    "filled labels as the loss times the mask": (MASKED_FILL, r"labels=labels\.masked_fill\(attention_mask == 0, -100\)",
                                                 "labels=labels"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_seeded_wrong_rewrite_is_detected(mutation):
    case, pattern, substitute = MUTATIONS[mutation]
    results = verdicts(case if "\n" in case else fixture(case), _sub(pattern, substitute))
    refusals = [r for r in results.values() if r is not None]
    assert refusals, results
    assert all(r.code in (Code.NOT_EQUIVALENT, Code.REWRITE_RAISES) for r in refusals), refusals
    assert " (on B=" in str(refusals[0])  # the reason names the input it failed on


def test_logits_one_position_shorter_than_the_loops_length_are_refused():
    """A loop that takes its length from the labels reads logits positions up to S - 2 only, so it runs on
    logits one position shorter (`model(input_ids[:, :-1])`); the utility requires [B, S] logits and raises.
    The site is refused with the input that shows it, where the verifier once excused it."""
    (refusal,) = verdicts(fixture("baseline_unweighted_zero_based")).values()
    assert refusal.code is Code.REWRITE_RAISES and "logits length S-1" in str(refusal), refusal


def _result(value, grad=None):
    return {"loss": value}, ({} if grad is None else {"logits": grad})


@pytest.mark.parametrize(("new", "old", "problem"), [
    (torch.tensor(0.0, dtype=torch.float64), 0.0, "is a float64 tensor of shape (), not a Python float"),
    (0, 0.0, "is a Python int, not a Python float"),
    (torch.tensor(1.0, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float64), "is a float32 tensor"),
    (torch.zeros(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), "of shape (2,), not a float64 tensor"),
    (torch.tensor(0.0, dtype=torch.float64), torch.tensor(float("nan"), dtype=torch.float64), "NaN or infinite"),
    (torch.tensor(float("nan"), dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), "NaN or infinite"),
    (torch.tensor(float("-inf"), dtype=torch.float64), torch.tensor(float("inf"), dtype=torch.float64), "NaN or"),
])
def test_outputs_agree_in_type_dtype_shape_and_non_finite_entries(new, old, problem):
    case, never = Case(), lambda: pytest.fail("values are not compared where the kinds differ")
    found = compare(_result(new), _result(old), never, never, case, {}, [])
    assert found is not None and problem in found, found


def test_nan_equals_nan_and_equal_infinities_agree():
    special = torch.tensor([float("nan"), float("inf"), 1.0], dtype=torch.float64)
    assert compare(_result(special.clone()), _result(special), None, None, Case(), {}, []) is None


def test_the_low_precision_slack_never_excuses_a_rewrite_less_precise_than_the_loop():
    """A loop that casts fp32 logits to fp64 rounds nothing to fp32: a rewrite that computes in fp32
    and casts its result to fp64 has an fp32 error, which the loop does not have."""
    logits = torch.randn(2, 5, dtype=torch.float64).float().requires_grad_(True)
    labels = torch.tensor([1, 3])

    def loop(logits):
        return _mtp_outputs({}, torch.nn.functional.cross_entropy(logits.double(), labels))

    def fp32_then_cast(logits):
        return _mtp_outputs({}, torch.nn.functional.cross_entropy(logits, labels).double())

    arguments = {"logits": logits}
    old, new = run(loop, arguments, []), run(fp32_then_cast, arguments, [])
    assert rounding(loop, arguments) == torch.finfo(torch.float64).eps
    problem = compare(new, old, lambda: run(loop, arguments, [], truth=True), lambda: rounding(loop, arguments),
                      Case(dtype=torch.float32), arguments, [])
    assert problem is not None and problem.startswith("`return` differs"), problem
    # The same fp32 computation is within the slack where the loop itself rounds to fp32.
    same = compare(new, run(fp32_then_cast, arguments, []), lambda: run(fp32_then_cast, arguments, [], truth=True),
                   lambda: rounding(fp32_then_cast, arguments), Case(dtype=torch.float32), arguments, [])
    assert same is None and rounding(fp32_then_cast, arguments) == torch.finfo(torch.float32).eps


def test_a_hanging_rewrite_times_out(monkeypatch):
    monkeypatch.setattr(verify_worker, "CALL_TIMEOUT_S", 1.0)
    results = verdicts(fixture("verifiable_weighted_and_unweighted"),
                       lambda text: "while True:\n    pass\n" + text)
    (refusal,) = results.values()
    assert refusal.code is Code.VERIFIER_FAILED and "longer than" in str(refusal)


def test_the_verifier_binds_nothing_from_the_recognizer():
    """F is whatever the file imports: here a module the verifier cannot import, so nothing is claimed."""
    source = fixture("verifiable_weighted_and_unweighted").replace(
        "import torch.nn.functional as F", "import torch.nn.functional as F\nimport not_a_module_anywhere as G")
    source = source.replace("ce_loss_k = F.cross_entropy(", "ce_loss_k = G.cross_entropy(")
    module = cst.parse_module(source)
    decisions = plan(module, rho1="rewrite")
    assert [d.action for d in decisions] == [Action.SKIPPED]
    assert decisions[0].refusal.code is Code.NOT_TORCH_CROSS_ENTROPY
    # Forced through anyway, the verifier refuses to run the loop: it does not assume G is torch.
    (good,) = plan(cst.parse_module(fixture("verifiable_weighted_and_unweighted")), rho1="rewrite")
    forced = [replace(good, site=replace(decisions[0].site, spec=good.site.spec))]
    results = verify_sites(module, written(module, forced), forced, utility_import(module), str(SHIPPED_UTILITY))
    (refusal,) = results.values()
    assert refusal.code is Code.OPAQUE_CALL, refusal
    assert "`G.cross_entropy`" in str(refusal) and "`not_a_module_anywhere`" in str(refusal)


def test_slots_are_read_off_the_code():
    module = cst.parse_module((Path(__file__).parents[1] / "fixtures" / "pipelines" / "before" / "run_verifiable.py")
                              .read_text())
    decisions = plan(module)
    built, _ = programs(module, written(module, decisions), decisions, str(SHIPPED_UTILITY), "weighted_mtp.utils")
    paths = {slot.path: slot for slot in built[0].slots}
    assert paths['pos_out["logits"]'].kind == "tensor" and paths['pos_out["logits"]'].rank == 4
    assert paths['positive["labels"]'].kind == "tensor"
    assert "weights" in paths  # td_error_weights(...) is project code: its result is an input
    assert "weighted_ce_loss" in built[0].outputs and "unweighted_ce_loss" in built[0].outputs


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_verify_base_passes_after_apply_and_fails_on_a_hand_broken_copy(tmp_path):
    pipelines = Path(__file__).parents[1] / "fixtures" / "pipelines"
    shutil.copytree(pipelines / "before", tmp_path / "pipelines")
    _git("init", "-q", cwd=tmp_path)
    _git("add", "-A", cwd=tmp_path)
    _git("commit", "-qm", "before", cwd=tmp_path)
    command = [sys.executable, "-m", "mtp_migrate"]
    subprocess.run([*command, "apply", "-q", "."], cwd=tmp_path, check=True)
    _git("commit", "-qam", "mtp-migrate apply", cwd=tmp_path)

    passed = subprocess.run([*command, "verify", "--base", "HEAD~1", ".", "--json"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    sites = [s for f in json.loads(passed.stdout)["files"] for s in f["sites"]]
    assert len(sites) == 6 and all(s["verified"] for s in sites)

    broken = tmp_path / "pipelines" / "run_baseline.py"
    text = broken.read_text()
    broken.write_text(text.replace("logits=logits,", "logits=logits,\n        mask_ignored_labels=False,", 1))
    failed = subprocess.run([*command, "verify", "--base", "HEAD~1", ".", "-q"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "run_baseline.py:26: NOT equivalent: MTP201" in failed.stdout

    _git("mv", "pipelines/run_baseline.py", "pipelines/run_baseline_renamed.py", cwd=tmp_path)
    renamed = subprocess.run([*command, "verify", "--base", "HEAD~1", ".", "-q", "--include", "run_*.py"],
                             cwd=tmp_path, capture_output=True, text=True)
    assert renamed.returncode == 1 and "run_baseline_renamed.py:26: NOT equivalent" in renamed.stdout

    unknown = subprocess.run([*command, "verify", "--base", "no-such-rev", "."], cwd=tmp_path, capture_output=True)
    assert unknown.returncode == 2


def test_verify_base_outside_git_is_an_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mtp_migrate", "verify", "--base", "HEAD", "."], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "not a git repository" in done.stderr
