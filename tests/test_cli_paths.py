"""What the CLI does with paths it cannot use and files that change under it: one ``error:``
line each, exit 2, and the rest of the batch goes on; nothing of the user's lost."""

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cli_runner import invoke
from click.testing import CliRunner

import mtp_migrate.runner
from mtp_migrate import cache
from mtp_migrate.cli import main
from mtp_migrate.source import STALE_AFTER_S

ROOT = Path(__file__).parents[1]
BEFORE = ROOT / "fixtures" / "pipelines" / "before"
NOBODY = 65534


def _as_unprivileged_user(function) -> tuple[int, str]:
    """Run ``function()`` (returning ``(exit code, output)``) in a child that dropped root's privileges."""
    cache.environment()  # needs files an unprivileged user may not read
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = json.dumps(function())
        except BaseException as error:  # reported to the parent, which fails the test
            payload = json.dumps([-1, repr(error), ""])
        os.write(write, payload.encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.waitpid(child, 0)
    return tuple(json.loads(data))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to drop privileges")
def test_unreadable_paths_are_error_lines_for_an_unprivileged_user():
    tree = Path(tempfile.mkdtemp(prefix="mtp-unprivileged-"))
    try:
        shutil.copy(BEFORE / "run_baseline.py", tree / "run_baseline.py")
        (tree / "locked").mkdir()
        shutil.copy(BEFORE / "run_baseline.py", tree / "locked" / "run_hidden.py")
        shutil.copy(BEFORE / "run_baseline.py", tree / "run_unreadable.py")
        for path in (tree, *tree.rglob("*")):
            os.chown(path, NOBODY, NOBODY)
        tree.chmod(0o755)
        (tree / "locked").chmod(0o000)
        (tree / "run_unreadable.py").chmod(0o000)

        def check():
            os.chdir(tree)
            options = ["check", "--no-verify", "--jobs", "1", "--color", "never", "."]
            text, report = (CliRunner().invoke(main, options + extra) for extra in ([], ["--json"]))
            return text.exit_code, text.output, report.output

        code, output, report = _as_unprivileged_user(check)
        assert code == 2, output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert errors == ["error: locked: cannot read directory: Permission denied",
                          "error: run_unreadable.py: cannot read: Permission denied"]
        assert "Traceback" not in output
        statuses = {f["path"]: f["status"] for f in json.loads(report)["files"]}
        assert statuses == {"locked": "error", "run_unreadable.py": "error", "run_baseline.py": "changed",
                            "mtp_loss_utils.py": "changed"}  # the utility, vendored beside the pipeline
    finally:
        (tree / "locked").chmod(0o755)
        shutil.rmtree(tree)


def test_an_undecodable_file_name_is_one_error_line(tmp_path):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    try:
        (tmp_path / os.fsdecode(b"run_\xff.py")).write_text("x = 1\n")
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take undecodable names")
    result = invoke("check", "--no-verify", ".", cwd=tmp_path)
    assert result.exit_code == 2
    assert "error: run_\\xff.py: file name is not valid UTF-8" in result.output
    report = json.loads(invoke("check", "--no-verify", "--json", ".", cwd=tmp_path).output)
    assert {f["path"]: f["status"] for f in report["files"]} == {"run_baseline.py": "changed",
                                                                 "mtp_loss_utils.py": "changed",
                                                                 "run_\\xff.py": "error"}


def test_apply_removes_stale_temp_files_of_its_own_and_says_so(tmp_path):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    stale = tmp_path / ".run_baseline.py.k3x9_q2a.mtp-migrate"
    fresh = tmp_path / ".run_other.py.abcdefgh.mtp-migrate"  # another run may be writing it right now
    theirs = tmp_path / ".run_baseline.py.mine.bak"
    for path in (stale, fresh, theirs):
        path.write_text("half")
    long_ago = time.time() - STALE_AFTER_S - 5
    os.utime(stale, (long_ago, long_ago))
    os.utime(theirs, (long_ago, long_ago))
    dry = invoke("check", "--no-verify", ".", cwd=tmp_path)
    assert "note: .run_baseline.py.k3x9_q2a.mtp-migrate: temp file left by an interrupted run" in dry.output
    assert stale.exists()
    result = invoke("apply", "--no-verify", ".", cwd=tmp_path)
    assert result.exit_code == 0
    assert "note: removed .run_baseline.py.k3x9_q2a.mtp-migrate" in result.output
    assert not stale.exists() and fresh.exists() and theirs.exists()


def test_a_file_edited_while_verification_runs_is_left_alone(tmp_path, monkeypatch):
    target = tmp_path / "run_baseline.py"
    shutil.copy(BEFORE / "run_baseline.py", target)
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_other.py")
    real = mtp_migrate.runner.verify_sites

    def edit_then_verify(original, written, decisions, utility, utility_file, cache=None):
        if target.read_bytes().startswith(b"#"):
            return real(original, written, decisions, utility, utility_file, cache)
        target.write_bytes(b"# edited by the user during the run\n" + target.read_bytes())
        return real(original, written, decisions, utility, utility_file, cache)

    monkeypatch.setattr(mtp_migrate.runner, "verify_sites", edit_then_verify)
    result = invoke("apply", "--jobs", "1", "--no-cache", ".", cwd=tmp_path)
    assert result.exit_code == 2
    assert "error: run_baseline.py: changed during the run; left as it is" in result.output
    assert target.read_bytes().startswith(b"# edited by the user during the run\n")
    assert b"compute_mtp_ce_loss" not in target.read_bytes()
    assert b"compute_mtp_ce_loss" in (tmp_path / "run_other.py").read_bytes()  # the batch went on


def test_github_output_annotates_pending_and_refused_sites(tmp_path):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    (tmp_path / "run_broken.py").write_text("def loss(:\n    return F.cross_entropy\n")
    result = invoke("check", "--no-verify", "--output-format", "github", ".", cwd=tmp_path)
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert any(line.startswith("::warning file=run_baseline.py,line=") and "pending" in line for line in lines)
    assert any(line.startswith("::error file=run_broken.py,title=mtp-migrate::syntax error") for line in lines)
    alias = json.loads(invoke("check", "--no-verify", "--json", ".", cwd=tmp_path).output)
    spelled = json.loads(invoke("check", "--no-verify", "--output-format", "json", ".", cwd=tmp_path).output)
    assert alias == spelled


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_verify_base_reports_an_undecodable_file_name_as_an_error(tmp_path):
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    try:
        odd = tmp_path / os.fsdecode(b"run_\xfe.py")
        shutil.copy(BEFORE / "run_baseline.py", odd)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take undecodable names")
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "before"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True, capture_output=True, env={**os.environ, **env})
    assert invoke("apply", "--no-verify", "run_baseline.py", cwd=tmp_path).exit_code == 0
    odd.write_text(odd.read_text() + "\n# edited\n")
    result = invoke("verify", "--base", "HEAD", "--jobs", "1", ".", cwd=tmp_path)
    assert result.exit_code == 2, result.output
    assert "error: run_\\xfe.py: file name is not valid UTF-8" in result.output
    assert "run_baseline.py:" in result.output and "NOT equivalent" not in result.output
