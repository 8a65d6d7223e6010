"""Nothing the tool writes or runs can leave the repository broken: write order, symlinks, signals,
renames, odd file names and syntax the analysis must walk (issue 20)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtp_migrate.runner import default_verifier, migrate_source
from mtp_migrate.source import MigrationError, write_atomic
from mtp_migrate.vendoring import SHIPPED_UTILITY

ROOT = Path(__file__).parents[1]
BEFORE = ROOT / "fixtures" / "pipelines" / "before"


def test_a_match_statement_around_or_beside_a_site_is_walked():
    text = (BEFORE / "run_baseline.py").read_text()
    start, stop = text.index("    ce_loss = torch.tensor(0.0"), text.index("    optimizer.zero_grad()")
    site = "".join(f"        {line}" if line.strip() else line for line in text[start:stop].splitlines(keepends=True))
    text = text[:start] + '    match batch.get("mode"):\n        case "skip":\n            return {}\n' \
                          "        case _:\n" + site + text[stop:]
    result = migrate_source(text.encode(), "run_match.py", verifier=default_verifier())
    assert [(site.action.value, site.verified) for site in result.sites] == [("rewritten", True)] * 2
    assert "        case _:\n            ce_loss = compute_mtp_ce_loss_unweighted(" in result.output.decode()


def _git_project(tmp_path: Path) -> Path:
    """A repository with its own ``weighted_mtp/utils`` package and one pipeline to migrate."""
    (tmp_path / ".git").mkdir(parents=True)
    (tmp_path / "weighted_mtp" / "utils").mkdir(parents=True)
    (tmp_path / "weighted_mtp" / "__init__.py").write_text("")
    (tmp_path / "weighted_mtp" / "utils" / "__init__.py").write_text('"""Utilities."""\n')
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    return tmp_path


def _tool(*args: str, cwd: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "mtp_migrate", *args, "--color", "never", "--jobs", "1"], cwd=cwd,
                          capture_output=True, text=True, preexec_fn=limit if file_size_limit else None, timeout=600)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {".git", ".mtp_migrate_cache"} & set(p.relative_to(root).parts)}


def test_a_utility_that_cannot_be_written_leaves_every_pipeline_as_it_was(tmp_path):
    root = _git_project(tmp_path)
    before = _tree(root)
    assert SHIPPED_UTILITY.stat().st_size > 16 << 10 > len(before["run_baseline.py"])
    failed = _tool("apply", ".", cwd=root, file_size_limit=16 << 10)  # as `ulimit -f 16` or a full disk
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert _tree(root) == before  # neither the pipeline nor the __init__.py exporting the missing module
    assert "error: weighted_mtp/utils/loss_utils.py: cannot write: File too large" in failed.stdout
    assert "error: run_baseline.py: not migrated: weighted_mtp/utils/loss_utils.py could not be written" \
           in failed.stdout
    assert "error: weighted_mtp/utils/__init__.py: not written: weighted_mtp/utils/loss_utils.py" in failed.stdout
    assert _tool("check", ".", cwd=root).returncode == 1
    again = _tool("apply", ".", cwd=root)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (root / "weighted_mtp/utils/loss_utils.py").read_bytes() == SHIPPED_UTILITY.read_bytes()
    assert "compute_mtp_ce_loss" in (root / "weighted_mtp/utils/__init__.py").read_text()
    assert _tool("check", ".", cwd=root).returncode == 0


def test_check_reports_a_migrated_pipeline_whose_utility_the_repository_lacks(tmp_path):
    root = _git_project(tmp_path)
    init = (root / "weighted_mtp/utils/__init__.py").read_bytes()
    assert _tool("apply", ".", cwd=root).returncode == 0
    migrated = (root / "run_baseline.py").read_bytes()
    (root / "weighted_mtp/utils/loss_utils.py").unlink()  # as a run that wrote the pipelines first left it
    (root / "weighted_mtp/utils/__init__.py").write_bytes(init)
    check = _tool("check", ".", cwd=root)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "note: run_baseline.py imports the loss utility from weighted_mtp.utils, which the repository lacks " \
           "(weighted_mtp/utils/loss_utils.py, weighted_mtp/utils/__init__.py)" in check.stderr
    assert _tool("apply", ".", cwd=root).returncode == 0
    assert (root / "weighted_mtp/utils/loss_utils.py").read_bytes() == SHIPPED_UTILITY.read_bytes()
    assert (root / "run_baseline.py").read_bytes() == migrated
    assert _tool("check", ".", cwd=root).returncode == 0


@pytest.mark.parametrize("linked", ["weighted_mtp", "weighted_mtp/utils", "weighted_mtp/utils/__init__.py",
                                    "weighted_mtp/utils/loss_utils.py"])
def test_the_utility_is_never_written_through_a_symlink(tmp_path, linked):
    root = _git_project(tmp_path / "repo")
    shutil.copy(SHIPPED_UTILITY, root / "weighted_mtp/utils/loss_utils.py")
    outside = tmp_path / "outside"
    shutil.move(root / linked, outside)
    (root / linked).symlink_to(outside)
    before_outside = {p: p.read_bytes() for p in [outside, *outside.rglob("*")] if p.is_file()}
    before = _tree(root)
    done = _tool("apply", ".", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _tree(root) == before
    assert {p: p.read_bytes() for p in [outside, *outside.rglob("*")] if p.is_file()} == before_outside
    assert f"MTP302: {root.resolve() / linked} is a symlink (not followed): mtp-migrate writes no file through one" \
           in done.stdout.replace("\n", " ")


def test_a_write_never_replaces_a_symlink(tmp_path):
    (tmp_path / "target.py").write_text("kept\n")
    (tmp_path / "link.py").symlink_to(tmp_path / "target.py")
    with pytest.raises(MigrationError, match="symlink"):
        write_atomic(tmp_path / "link.py", b"new\n", expected=b"kept\n")
    assert (tmp_path / "link.py").is_symlink() and (tmp_path / "target.py").read_text() == "kept\n"


@pytest.mark.parametrize("delay", [0.25, 0.5, 1.0])  # while the command line loads (a second or more), or just after
@pytest.mark.parametrize("which", [signal.SIGINT, signal.SIGTERM])
def test_an_early_signal_exits_130_without_a_traceback(tmp_path, which, delay):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    run = subprocess.Popen([sys.executable, "-m", "mtp_migrate", "check", "--no-cache", "."], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    run.send_signal(which)
    out, err = run.communicate(timeout=60)
    assert (run.returncode, err.splitlines()[-1:]) == (130, ["error: interrupted"]), out + err
    assert "Traceback" not in err


GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@example.com"}


def _git(*args: str, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(["git", *args], cwd=cwd, input=stdin, capture_output=True, env={**os.environ, **GIT})
    assert done.returncode == 0, done.stderr.decode()
    return done


def _committed(tmp_path: Path, files: dict[str, bytes]) -> Path:
    tmp_path.mkdir(exist_ok=True)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    _git("init", "-q", cwd=tmp_path)
    _git("add", "-A", cwd=tmp_path)
    _git("commit", "-qm", "before", cwd=tmp_path)
    return tmp_path


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@needs_git
def test_a_file_renamed_and_edited_past_gits_threshold_is_still_verified(tmp_path):
    root = _committed(tmp_path, {"run_a.py": (BEFORE / "run_baseline.py").read_bytes()})
    assert _tool("apply", "--no-cache", ".", cwd=root).returncode == 0
    _git("mv", "run_a.py", "run_b.py", cwd=root)
    with (root / "run_b.py").open("a") as stream:  # now less than half of it is the old file
        stream.write("".join(f"\n\ndef helper_{i}(x):\n    return x + {i}\n" for i in range(60)))
    shutil.copy(BEFORE / "run_rho1.py", root / "run_c.py")  # new, and less like the old file than run_b.py
    _git("add", "run_c.py", cwd=root)
    assert _git("diff", "-M", "--name-status", "HEAD", cwd=root).stdout.split() == [
        b"D", b"run_a.py", b"A", b"run_b.py", b"A", b"run_c.py"]
    done = _tool("verify", "--base", "HEAD", "--json", ".", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    [report] = [f for f in json.loads(done.stdout)["files"] if f["sites"]]
    assert report["path"] == "run_b.py" and [s["verified"] for s in report["sites"]] == [True, True]


@needs_git
def test_a_deleted_file_whose_loops_cannot_be_paired_is_not_judged(tmp_path):
    root = _committed(tmp_path, {"run_a.py": (BEFORE / "run_baseline.py").read_bytes(),
                                 "run_notes.py": b"x = 1  # no loop: its deletion is nothing to judge\n",
                                 "train.py": (BEFORE / "run_baseline.py").read_bytes()})  # not --include'd
    for name in ("run_a.py", "run_notes.py", "train.py"):
        (root / name).unlink()
    done = _tool("verify", "--base", "HEAD", ".", cwd=root)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.count("run_a.py is gone since HEAD") == 2
    assert "run_notes.py" not in done.stdout and "train.py" not in done.stdout
    assert _tool("verify", "--base", "HEAD", "--exclude", "run_a.py", ".", cwd=root).returncode == 0


@needs_git
def test_verify_says_binary_file_as_check_does(tmp_path):
    root = _committed(tmp_path, {"run_a.py": (BEFORE / "run_baseline.py").read_bytes()})
    (root / "run_a.py").write_bytes(b"\0\1binary")
    for verb in (("check",), ("verify", "--base", "HEAD")):
        done = _tool(*verb, ".", cwd=root)
        assert done.returncode == 2
        assert "error: run_a.py: binary file (contains NUL bytes)" in done.stdout + done.stderr


@needs_git
def test_odd_file_names_are_quoted_as_git_quotes_them_and_the_patch_applies(tmp_path):
    names = ["run_a\nb.py", "run_c d.py", "run_é.py", 'run_"q\\.py', "run_\t.py"]
    root = _committed(tmp_path / "applied", {name: (BEFORE / "run_baseline.py").read_bytes() for name in names})
    patched = tmp_path / "patched"
    shutil.copytree(root, patched)
    diff = _tool("diff", "--no-verify", ".", cwd=root)
    assert diff.returncode == 1, diff.stderr
    assert '--- "a/run_a\\nb.py"\n+++ "b/run_a\\nb.py"\n' in diff.stdout
    assert "--- a/run_c d.py\t\n" in diff.stdout and '+++ "b/run_\\303\\251.py"\n' in diff.stdout
    assert _tool("apply", "--no-verify", ".", cwd=root).returncode == 0
    _git("apply", "-", cwd=patched, stdin=diff.stdout.encode())
    assert _tree(patched) == _tree(root) != {name: (BEFORE / "run_baseline.py").read_bytes() for name in names}
