"""mtp-migrate end to end: exit codes, bad input, safe writes, parallel runs, JSON."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cli_runner import invoke
from click.testing import CliRunner

from mtp_migrate import source
from mtp_migrate.cli import main
from mtp_migrate.refusals import Code, Refusal

ROOT = Path(__file__).parents[1]
BEFORE = ROOT / "fixtures" / "pipelines" / "before"
AFTER = ROOT / "fixtures" / "pipelines" / "after"
FIXTURES = ROOT / "fixtures" / "codemod"


@pytest.fixture
def repo(tmp_path):
    """A copy of the before/ pipelines (and their settings) plus ordinary files, a venv and an ignored file."""
    shutil.copytree(BEFORE, tmp_path / "pipelines")
    shutil.copy(BEFORE.parent / "pyproject.toml", tmp_path)
    (tmp_path / "run_plain.py").write_text("print('no loop here')\n")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / ".venv" / "lib" / "run_inside_venv.py")
    (tmp_path / "ignored").mkdir()
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "ignored" / "run_ignored.py")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    return tmp_path


def snapshot(root: Path) -> dict:
    """Every file of the tree but the tool's own cache (which diff and check may fill)."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and ".mtp_migrate_cache" not in p.parts}


def test_diff_writes_nothing_and_exits_1(repo):
    before = snapshot(repo)
    result = invoke("diff", ".", cwd=repo)
    assert result.exit_code == 1, result.output
    assert "+from mtp_loss_utils import compute_mtp_ce_loss" in result.output
    assert "+++ b/pipelines/mtp_loss_utils.py" in result.output  # no weighted_mtp package: vendored beside them
    assert "run_ignored" not in result.output and "run_inside_venv" not in result.output
    assert snapshot(repo) == before


def test_check_exits_1_then_apply_then_0_and_apply_is_idempotent(repo):
    assert invoke("check", ".", cwd=repo).exit_code == 1
    mode = 0o750
    os.chmod(repo / "pipelines" / "run_rho1.py", mode)
    result = invoke("apply", ".", cwd=repo)
    assert result.exit_code == 0, result.output
    for name in ("run_verifiable.py", "run_baseline.py", "run_rho1.py", "mtp_loss_utils.py"):
        assert (repo / "pipelines" / name).read_bytes() == (AFTER / name).read_bytes()
    assert stat.S_IMODE((repo / "pipelines" / "run_rho1.py").stat().st_mode) == mode
    after_first = snapshot(repo)
    assert invoke("apply", ".", cwd=repo).exit_code == 0
    assert snapshot(repo) == after_first
    assert invoke("check", ".", cwd=repo).exit_code == 0
    assert not list(repo.rglob("*.mtp-migrate"))


def test_crlf_and_bom_survive_apply(tmp_path):
    target = tmp_path / "run_crlf.py"
    shutil.copy(FIXTURES / "crlf_bom.in.py", target)
    assert invoke("apply", str(target), cwd=tmp_path).exit_code == 0
    expected = (FIXTURES / "crlf_bom.out.py").read_bytes()  # its utility import, vendored here: first-party,
    # so a section of its own after `import torch`
    expected = expected.replace(b"import torch\r\nfrom weighted_mtp.utils import", b"import torch\r\n\r\nfrom mtp_loss_utils import")
    assert target.read_bytes() == expected


BAD_INPUTS = {
    "run_syntax.py": b"import torch.nn.functional as F\ndef f(:\n    F.cross_entropy\n",
    "run_latin1.py": "x = 'caf\u00e9'  # cross_entropy\n".encode("latin-1"),
    "run_binary.py": b"\x00\x01cross_entropy\x00",
}


@pytest.mark.parametrize("name", [*BAD_INPUTS, "run_unreadable.py"])
def test_bad_input_is_one_error_line_and_the_batch_goes_on(tmp_path, monkeypatch, name):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_good.py")
    bad = tmp_path / name
    if name in BAD_INPUTS:
        bad.write_bytes(BAD_INPUTS[name])
    else:  # root reads mode-000 files, so fail the read itself
        bad.write_text("x = 1\n")
        real_read = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self: (
            (_ for _ in ()).throw(PermissionError(13, "Permission denied")) if self.name == name else real_read(self)))
    result = invoke("check", ".", "--json", "--jobs", "1", cwd=tmp_path)
    assert result.exit_code == 2
    report = {Path(f["path"]).name: f for f in json.loads(result.output)["files"]}
    assert report[name]["status"] == "error" and report[name]["error"]
    assert "\n" not in report[name]["error"]
    assert report["run_good.py"]["status"] == "changed"
    text = invoke("check", ".", "--jobs", "1", cwd=tmp_path)
    assert text.exit_code == 2
    assert sum(1 for line in text.output.splitlines() if line.startswith(f"error: {name}")) == 1


def test_plain_symlink_is_skipped_not_followed(tmp_path):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "real.py")
    os.symlink(tmp_path / "real.py", tmp_path / "run_link.py")
    result = invoke("apply", ".", "--json", cwd=tmp_path)
    files = {Path(f["path"]).name: f for f in json.loads(result.output)["files"]}
    assert files["run_link.py"]["status"] == "skipped"
    assert (tmp_path / "run_link.py").is_symlink()
    assert result.exit_code == 0


def test_symlinks_are_reported_alike_broken_or_not(tmp_path):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "real.py")
    os.symlink(tmp_path / "real.py", tmp_path / "run_link.py")
    os.symlink(tmp_path / "missing.py", tmp_path / "run_broken.py")
    os.symlink(tmp_path / "run_loop.py", tmp_path / "run_loop.py")
    names = ("run_broken.py", "run_link.py", "run_loop.py")
    for arguments in ((".",), names):
        result = invoke("check", "--no-verify", *arguments, cwd=tmp_path)
        assert result.exit_code == 0, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("skipped ")]
        assert lines == [f"skipped {name}: symlink (not followed)" for name in names]


def test_json_schema(repo):
    result = invoke("diff", ".", "--json", cwd=repo)
    report = json.loads(result.output)
    assert set(report) == {"files", "summary", "notes"}
    for entry in report["files"]:
        assert set(entry) == {"path", "status", "error", "sites"}
        assert entry["status"] in {"changed", "unchanged", "skipped", "error"}
        for site in entry["sites"]:
            assert set(site) == {"line", "action", "code", "reason", "verified"}
            assert (site["code"] is None) == (site["action"] != "skipped")
            assert site["action"] in {"rewritten", "del_inserted", "skipped"}
    summary = report["summary"]
    assert (summary["sites_rewritten"], summary["dels_inserted"], summary["sites_skipped"]) == (5, 1, 1)


def test_jobs_2_equals_jobs_1(repo):
    for index in range(3):
        shutil.copy(BEFORE / "run_baseline.py", repo / f"run_copy_{index}.py")
    serial = invoke("diff", ".", "--jobs", "1", cwd=repo)
    parallel = invoke("diff", ".", "--jobs", "2", cwd=repo)
    assert serial.exit_code == parallel.exit_code == 1
    assert serial.output == parallel.output


def test_interrupted_write_leaves_the_original_intact(tmp_path, monkeypatch):
    target = tmp_path / "run_baseline.py"
    shutil.copy(BEFORE / "run_baseline.py", target)
    original = target.read_bytes()

    def crash(*_):
        raise KeyboardInterrupt  # killed between writing the temp file and replacing

    monkeypatch.setattr(source.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        source.write_atomic(target, b"half")
    assert target.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_baseline.py"]


def test_vendoring_into_a_weighted_mtp_repo(tmp_path):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    package = tmp_path / "weighted_mtp" / "utils"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Utils."""\n')
    assert invoke("apply", ".", cwd=tmp_path).exit_code == 0
    assert (package / "loss_utils.py").read_bytes() == (ROOT / "weighted_mtp" / "utils" / "loss_utils.py").read_bytes()
    assert "compute_mtp_ce_loss_unweighted" in (package / "__init__.py").read_text()


def test_missing_path_and_verify_are_errors(tmp_path):
    assert invoke("check", "does-not-exist", cwd=tmp_path).exit_code == 2
    assert invoke("verify", "--base", "HEAD", cwd=tmp_path).exit_code == 2


def test_subprocess_exit_codes_and_no_color(tmp_path):
    shutil.copy(BEFORE / "run_rho1.py", tmp_path / "run_rho1.py")
    env = dict(os.environ, NO_COLOR="1")
    command = [sys.executable, "-m", "mtp_migrate", "diff", "."]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "\x1b[" not in done.stdout and "+        del logits_k" in done.stdout
    assert subprocess.run([sys.executable, "-m", "mtp_migrate", "apply", "-q", "."], cwd=tmp_path).returncode == 0
    done = subprocess.run([sys.executable, "-m", "mtp_migrate", "check", "."], cwd=tmp_path, capture_output=True)
    assert done.returncode == 0


def test_apply_verifies_sites_and_skips_one_that_fails(tmp_path, monkeypatch):
    target = tmp_path / "run_baseline.py"
    shutil.copy(BEFORE / "run_baseline.py", target)
    original = target.read_bytes()
    import mtp_migrate.runner

    def refuse_all(original, edited, decisions, utility, utility_file, cache=None):
        return {d.line: Refusal(Code.NOT_EQUIVALENT, "`loss` differs by 0.5 (on B=2 ...)") for d in decisions}

    monkeypatch.setattr(mtp_migrate.runner, "verify_sites", refuse_all)
    result = invoke("apply", ".", "--json", "--jobs", "1", cwd=tmp_path)
    sites = json.loads(result.output)["files"][0]["sites"]
    assert [s["action"] for s in sites] == ["skipped", "skipped"]
    assert all(s["code"] == "MTP201" and not s["verified"] for s in sites)
    assert target.read_bytes() == original and result.exit_code == 0


def test_empty_and_whitespace_files_are_simply_unchanged(tmp_path):
    (tmp_path / "run_empty.py").write_bytes(b"")
    (tmp_path / "run_blank.py").write_bytes(b"\n  \n")
    result = invoke("check", ".", "--json", cwd=tmp_path)
    assert result.exit_code == 0
    assert {f["status"] for f in json.loads(result.output)["files"]} == {"unchanged"}


def test_apply_reports_verified_sites_and_no_verify_skips_verification(tmp_path):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_other.py")
    verified = json.loads(invoke("apply", "run_baseline.py", "--json", cwd=tmp_path).output)
    files = {f["path"]: f for f in verified["files"]}
    assert [s["verified"] for s in files["run_baseline.py"]["sites"]] == [True, True]
    assert verified["summary"]["sites_verified"] == 2
    unverified = json.loads(invoke("apply", "run_other.py", "--json", "--no-verify", cwd=tmp_path).output)
    (other,) = [f for f in unverified["files"] if f["path"] == "run_other.py"]
    assert [(s["action"], s["verified"]) for s in other["sites"]] == [("rewritten", False)] * 2


def test_the_cache_serves_a_second_run_and_no_cache_bypasses_it(tmp_path, monkeypatch):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    (tmp_path / ".git").mkdir()
    first = invoke("check", ".", "--json", "--jobs", "1", cwd=tmp_path)
    cache = tmp_path / ".mtp_migrate_cache"
    assert (cache / ".gitignore").read_text().endswith("*\n") and list(cache.rglob("*.json"))
    import mtp_migrate.runner

    def unreachable(*args, **kwargs):
        raise AssertionError("a cached file was migrated again")

    monkeypatch.setattr(mtp_migrate.runner, "migrate_source", unreachable)
    second = invoke("check", ".", "--json", "--jobs", "1", cwd=tmp_path)
    assert second.output == first.output
    bypassed = invoke("check", ".", "--json", "--jobs", "1", "--no-cache", cwd=tmp_path)
    assert "migrated again" in json.loads(bypassed.output)["files"][0]["error"]


def test_check_names_each_pending_and_refused_site_with_its_line_and_code(tmp_path):
    """What a failing pre-commit run shows: every site of the JSON report, one line each, refusals with a hint."""
    for name in ("run_baseline.py", "run_rho1.py"):
        shutil.copy(BEFORE / name, tmp_path / name)
    files = json.loads(invoke("check", ".", "--json", cwd=tmp_path).output)["files"]
    result = invoke("check", ".", cwd=tmp_path)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    sites = [(f["path"], s) for f in files for s in f["sites"]]
    assert {s["action"] for _, s in sites} == {"rewritten", "del_inserted", "skipped"}
    for path, site in sites:
        if site["action"] == "skipped":
            expected = f"skipped {path}:{site['line']}: {site['reason']} (mtp-migrate explain {site['code']})"
        else:
            expected = f"pending {path}:{site['line']}: "
        assert any(line.startswith(expected) for line in lines), (expected, result.output)
    assert "pending mtp_loss_utils.py: written with the migration" in lines


def test_version_is_the_projects():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip().endswith(f"version {version}")


@pytest.mark.parametrize("args", [["--help"], ["explain", "MTP203"], ["check", "."]], ids=" ".join)
def test_start_up_imports_no_torch(tmp_path, args):
    """Nothing to verify, nothing to import torch for (it takes seconds): --help, explain, a check without sites."""
    (tmp_path / "run_plain.py").write_text("import torch.nn.functional as F\n\n\ndef f(x, y):\n    return F.cross_entropy(x, y)\n")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "mtp_migrate", *args], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "mtp_migrate.cli" in imported and "torch" not in imported
