"""The main test: the tool on a repository shaped like the real ones (``fixtures/repos/real_project``).

Its package is itself ``weighted_mtp`` (``src/`` layout), its pipelines import 20+ names of
their own package and heavy libraries that are not installed here, and the loops' slices
read what those calls return. Every module of the package creates ``<file>.imported`` if
it is ever imported: ``diff``, ``check``, ``apply`` and ``verify`` must create none, and every
site must migrate and verify. A second revision (``hand_migrated/``) is a hand migration
whose own utility drifted: ``verify --base`` must say which sites and show an input.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PROJECT = ROOT / "fixtures" / "repos" / "real_project"
GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@example.com"}

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def run(*args, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, env={**os.environ, **GIT}, timeout=900)


def tool(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "mtp_migrate", *args, "--color", "never", cwd=cwd)


def markers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.imported"))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {".git", ".mtp_migrate_cache"} & set(p.relative_to(root).parts)}


def repository(folder: Path) -> Path:
    shutil.copytree(PROJECT, folder, ignore=shutil.ignore_patterns("hand_migrated"))
    run("git", "init", "-q", cwd=folder)
    run("git", "add", "-A", cwd=folder)
    assert run("git", "commit", "-q", "-m", "loops", cwd=folder).returncode == 0
    return folder


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> dict:
    applied = repository(tmp_path_factory.mktemp("real") / "applied")
    patched = applied.parent / "patched"
    shutil.copytree(applied, patched)
    original = tree(applied)
    results = {"diff": tool("diff", ".", cwd=applied), "check": tool("check", "--json", ".", cwd=applied)}
    results["rewrite"] = tool("check", "--json", "--rho1", "rewrite", ".", cwd=applied)
    results["apply"] = tool("apply", ".", cwd=applied)
    results["check after"] = tool("check", ".", cwd=applied)
    run("git", "add", "-A", cwd=applied)
    run("git", "commit", "-q", "-m", "mtp-migrate apply", cwd=applied)
    results["verify"] = tool("verify", "--base", "HEAD~1", ".", cwd=applied)
    return {"applied": applied, "patched": patched, "original": original, **results}


def test_no_module_of_the_repository_is_ever_imported(migrated):
    assert markers(migrated["applied"]) == []


def test_every_site_migrates_and_verifies(migrated):
    for mode in ("check", "rewrite"):
        done = migrated[mode]
        assert done.returncode == 1, done.stderr.decode()
        sites = {(report["path"], site["line"]): site for report in json.loads(done.stdout)["files"]
                 for site in report["sites"]}
        assert len(sites) == 5, sites
        assert all(site["verified"] and site["action"] != "skipped" for site in sites.values()), (mode, sites)
        expected = "rewritten" if mode == "rewrite" else None
        assert expected is None or {site["action"] for site in sites.values()} == {expected}


def test_diff_piped_to_git_apply_writes_what_apply_writes_and_check_then_passes(migrated):
    assert migrated["diff"].returncode == 1, migrated["diff"].stderr.decode()
    assert migrated["apply"].returncode == 0, migrated["apply"].stdout.decode()
    done = run("git", "apply", "--whitespace=nowarn", "-", cwd=migrated["patched"], stdin=migrated["diff"].stdout)
    assert done.returncode == 0, done.stderr.decode()
    assert tree(migrated["patched"]) == {k: v for k, v in tree(migrated["applied"]).items()}
    assert tree(migrated["patched"]) != migrated["original"]
    assert migrated["check after"].returncode == 0, migrated["check after"].stdout.decode()


def test_verify_proves_the_tools_own_migration(migrated):
    assert migrated["verify"].returncode == 0, migrated["verify"].stdout.decode()
    assert markers(migrated["applied"]) == []


def test_verify_judges_a_hand_migration_that_drifted(tmp_path):
    """The hand-written utility divides by the heads that had tokens; the loops by ``n_future``."""
    folder = repository(tmp_path / "hand")
    shutil.copytree(PROJECT / "hand_migrated", folder, dirs_exist_ok=True)
    run("git", "add", "-A", cwd=folder)
    run("git", "commit", "-q", "-m", "hand migration", cwd=folder)
    done = tool("verify", "--base", "HEAD~1", "--json", ".", cwd=folder)
    assert done.returncode == 1, done.stderr.decode()
    verdicts = {(Path(report["path"]).name, site["line"]): site for report in json.loads(done.stdout)["files"]
                for site in report["sites"]}
    drifted = {("run_verifiable.py", 67), ("run_verifiable.py", 137), ("run_baseline.py", 47), ("run_baseline.py", 92)}
    assert {key for key, site in verdicts.items() if not site["verified"]} == drifted
    assert verdicts[("run_rho1.py", 52)]["verified"]  # only `del` lines were added there
    for key in drifted:
        reason = verdicts[key]["reason"]
        # The simplest input it fails on, and what differs there: the values, or their kinds (the hand
        # utility returns a tensor where the loop keeps its Python 0.0, and fp64 where the loop has fp32).
        assert reason.startswith("MTP201") and "(on B=" in reason, reason
        assert "the loop gives" in reason or " tensor of shape " in reason, reason
    assert [name for name in markers(folder) if not name.endswith("utils/loss_utils.py.imported")] == []


def test_nothing_the_slice_reads_is_run(tmp_path):
    """``os.system``, ``open`` and ``torch.save`` in what the loop reads: none runs, and the site still verifies
    (their values become inputs)."""
    source = '''import os

import torch
import torch.nn.functional as F


def train_step(model, batch, path):
    labels = batch["labels"] if os.system("touch SYSTEM_RAN") == 0 else batch["labels"]
    with open("OPEN_RAN", "w") as stream:
        stream.write("x")
    attention_mask = batch["attention_mask"]
    torch.save(attention_mask, "SAVE_RAN")
    logits = model(batch["input_ids"])
    _, seq_len, n_future, vocab_size = logits.shape
    loss = 0.0
    for k in range(1, n_future + 1):
        valid_len = seq_len - k
        if valid_len <= 0:
            continue
        ce = F.cross_entropy(logits[:, :valid_len, k - 1].reshape(-1, vocab_size), labels[:, k:].reshape(-1),
                             reduction="none")
        mask = attention_mask[:, k:].reshape(-1).float() * (labels[:, k:].reshape(-1) != -100).float()
        if mask.sum() > 0:
            loss += (ce * mask).sum() / mask.sum()
    return loss / n_future
'''
    (tmp_path / "run_unsafe.py").write_text(source)
    done = tool("check", "--json", "--no-cache", "run_unsafe.py", cwd=tmp_path)
    reports = {report["path"]: report for report in json.loads(done.stdout)["files"]}
    assert set(reports) == {"run_unsafe.py", "mtp_loss_utils.py"}  # the utility it would vendor beside it
    report = reports["run_unsafe.py"]
    assert [(site["action"], site["verified"]) for site in report["sites"]] == [("rewritten", True)], report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_unsafe.py"]
    assert not any(Path(os.sep).glob("*_RAN"))
