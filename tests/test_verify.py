"""The per-site verifier: it passes the tool's rewrites and catches seeded wrong ones."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import libcst as cst
import pytest

from codemods.commands.rewrite_mtp_loop import plan
from codemods.mtp_loop.emit import replacement
from codemods.mtp_loop.recognize import reads
from codemods.verify import program, verify_programs

FIXTURES = Path(__file__).parents[1] / "fixtures" / "codemod"
IMPORTS = {"compute_mtp_ce_loss": "weighted_mtp.utils", "compute_mtp_ce_loss_unweighted": "weighted_mtp.utils"}


def site_and_replacement(case: str):
    module = cst.parse_module((FIXTURES / f"{case}.in.py").read_bytes())
    ((site, _, _),) = [p for p in plan(module, "rewrite") if p[0].spec is not None]
    return site, replacement(site, reads(module))


def mutated(statements, pattern: str, substitute: str):
    text = cst.Module(body=statements).code
    changed = re.sub(pattern, substitute, text, count=1)
    assert changed != text, pattern
    return list(cst.parse_module(changed).body)


MUTATIONS = {
    "wrong weight alignment": ("verifiable_weighted_and_unweighted", r"weights=weights,", 'weights=weights, weight_alignment="previous",'),
    "wrong normalisation": ("verifiable_weighted_and_unweighted", r"weights=weights,", 'weights=weights, normalize="weights",'),
    "wrong head averaging": ("rho1_selective_rewrite", r'head_average="valid",', ""),
    "dropped mask_ignored_labels": ("weighted_only_tensor_accumulator", r"mask_ignored_labels=False,", ""),
    "swapped outputs": ("verifiable_weighted_and_unweighted", r'\["weighted_ce_loss"\]', '["unweighted_ce_loss"]'),
    "wrong per-head metric": ("rho1_selective_rewrite", r'\["per_head_ce_loss"\]\[0\]', '["per_head_ce_loss"][1]'),
}


def test_the_tools_rewrites_verify():
    programs = [program(*site_and_replacement(case), IMPORTS) for case in
                ("verifiable_weighted_and_unweighted", "rho1_selective_rewrite", "weighted_only_tensor_accumulator",
                 "detached_weights_previous", "baseline_unweighted_zero_based")]
    for verdict in verify_programs(programs):
        assert verdict["ok"], verdict
        assert set(verdict["cases"]) == {"random", "empty_head", "all_masked", "bf16"}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_seeded_wrong_rewrite_is_detected(mutation):
    case, pattern, substitute = MUTATIONS[mutation]
    site, statements = site_and_replacement(case)
    (verdict,) = verify_programs([program(site, mutated(statements, pattern, substitute), IMPORTS)])
    assert not verdict["ok"]
    assert verdict["reason"]


def test_a_hanging_replacement_times_out():
    site, statements = site_and_replacement("verifiable_weighted_and_unweighted")
    hanging = [cst.parse_statement("while True:\n    pass\n"), *statements]
    (verdict,) = verify_programs([program(site, hanging, IMPORTS)], timeout=20)
    assert not verdict["ok"] and "timed out" in verdict["reason"]


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_verify_base_passes_after_apply_and_fails_on_a_hand_broken_copy(tmp_path):
    pipelines = Path(__file__).parents[1] / "fixtures" / "pipelines"
    shutil.copytree(pipelines / "before", tmp_path / "pipelines")
    _git("init", "-q", cwd=tmp_path)
    _git("add", "-A", cwd=tmp_path)
    _git("commit", "-qm", "before", cwd=tmp_path)
    command = [sys.executable, "-m", "codemods"]
    subprocess.run([*command, "apply", "-q", "."], cwd=tmp_path, check=True)
    _git("commit", "-qam", "mtp-migrate apply", cwd=tmp_path)

    passed = subprocess.run([*command, "verify", "--base", "HEAD~1", ".", "--json"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    sites = [s for f in json.loads(passed.stdout)["files"] for s in f["sites"]]
    assert len(sites) == 6 and all(s["verified"] for s in sites)

    broken = tmp_path / "pipelines" / "run_baseline.py"
    broken.write_text(broken.read_text().replace("attention_mask=attention_mask,", "attention_mask=attention_mask,\n"
                                                 "        mask_ignored_labels=False,", 1))
    failed = subprocess.run([*command, "verify", "--base", "HEAD~1", ".", "-q"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert failed.returncode == 1
    assert "run_baseline.py:26: NOT equivalent" in failed.stdout

    unknown = subprocess.run([*command, "verify", "--base", "no-such-rev", "."], cwd=tmp_path, capture_output=True)
    assert unknown.returncode == 2


def test_verify_base_outside_git_is_an_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "codemods", "verify", "--base", "HEAD", "."], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "not a git repository" in done.stderr
