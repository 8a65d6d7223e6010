"""The CLI under signals and its own bugs: the right exit code, quickly, nothing half-done."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import invoke

import mtp_migrate.cli

ROOT = Path(__file__).parents[1]
BEFORE = ROOT / "fixtures" / "pipelines" / "before"


@pytest.mark.parametrize("which", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_main_process_stops_the_run_with_130(tmp_path, which):
    for index in range(40):  # minutes of verification if nothing stopped it
        text = (BEFORE / "run_verifiable.py").read_text().replace("mask_k", f"mask_{index}_k")
        (tmp_path / f"run_{index}.py").write_text(text)
    run = subprocess.Popen([sys.executable, "-m", "mtp_migrate", "apply", "--jobs", "2", "--no-cache", "."],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(6)  # torch imported, verification under way
    assert run.poll() is None, run.communicate()
    sent = time.monotonic()
    run.send_signal(which)
    out, err = run.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert run.returncode == 130, (out + err).decode()[-2000:]
    assert b"error: interrupted" in err
    assert not list(tmp_path.glob(".*.mtp-migrate"))  # no temp file left behind
    originals = {(BEFORE / "run_verifiable.py").read_text().replace("mask_k", f"mask_{i}_k") for i in range(40)}
    for path in tmp_path.glob("run_*.py"):  # each file is its old self or fully migrated
        text = path.read_text()
        assert text in originals or "compute_mtp_ce_loss(" in text


def test_an_internal_error_exits_3_and_the_batch_goes_on(tmp_path, monkeypatch):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    shutil.copy(BEFORE / "run_rho1.py", tmp_path / "run_rho1.py")
    real = mtp_migrate.cli.migrate_file

    def buggy(path, **options):
        if path.name == "run_rho1.py":
            raise RuntimeError("a bug")
        return real(path, **options)

    monkeypatch.setattr(mtp_migrate.cli, "migrate_file", buggy)
    result = invoke("check", "--no-verify", "--jobs", "1", ".", cwd=tmp_path)
    assert result.exit_code == 3
    assert "error: run_rho1.py: internal error: RuntimeError: a bug" in result.output
    assert "files to change │ 2" in result.output  # run_baseline.py and the utility vendored beside it


def test_an_include_glob_that_matches_nothing_says_so(tmp_path):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    result = invoke("check", "--no-verify", "--include", "[", ".", cwd=tmp_path)
    assert result.exit_code == 0
    assert "note: no file matches --include [ under ." in result.output


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_die_with_a_killed_parent(tmp_path):
    for index in range(20):
        text = (BEFORE / "run_verifiable.py").read_text().replace("mask_k", f"mask_{index}_k")
        (tmp_path / f"run_{index}.py").write_text(text)
    run = subprocess.Popen([sys.executable, "-m", "mtp_migrate", "check", "--jobs", "2", "--no-cache", "."],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)
    workers = _children(run.pid)
    assert workers, "the run should have worker processes by now"
    run.kill()
    run.wait(timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


PIPELINE = (BEFORE / "run_baseline.py").read_text()
HOSTILE = {
    "run_many_statements.py": PIPELINE + "".join(f"X{i} = {i}\n" for i in range(1000)),
    "run_nested_lists.py": PIPELINE + "Y = " + "[" * 150 + "]" * 150 + "\n",
    "run_long_sum.py": PIPELINE + "Z = 1" + " + 1" * 1000 + "\n",
    "run_hex_constants.py": PIPELINE + "SEED = 0x10\nMAX_LEN = (512)\nMASK = 0b1010 + 1_000 - -3\n",
}


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_hostile_but_valid_files_are_migrated_and_a_parser_crash_is_an_error_line(tmp_path, jobs):
    for name, text in HOSTILE.items():
        (tmp_path / name).write_text(text)
    # LibCST's native parser crashes on 1500 nested brackets; Python's refuses them first.
    (tmp_path / "run_deep_brackets.py").write_text(PIPELINE + "W = " + "(" * 1500 + "1" + ")" * 1500 + "\n")
    done = subprocess.run([sys.executable, "-m", "mtp_migrate", "check", "--no-verify", "--json", "--jobs", jobs, "."],
                          cwd=tmp_path, capture_output=True, timeout=600)
    assert done.returncode == 2, done.stderr.decode()[-2000:]
    files = {f["path"]: f for f in json.loads(done.stdout)["files"]}
    assert {name: files[name]["status"] for name in HOSTILE} == dict.fromkeys(HOSTILE, "changed")
    assert files["run_deep_brackets.py"]["error"].startswith("syntax error: too many nested parentheses")


def test_a_file_over_the_size_limit_is_refused_quickly(tmp_path):
    from mtp_migrate.runner import MAX_BYTES

    filler = "# " + "x" * 78 + "\n"
    (tmp_path / "run_huge.py").write_text(PIPELINE + filler * (MAX_BYTES // len(filler) + 1))
    (tmp_path / "run_huge_but_unrelated.py").write_text(filler * (2 * MAX_BYTES // len(filler)))
    began = time.monotonic()
    result = invoke("check", "--no-verify", ".", cwd=tmp_path)
    assert time.monotonic() - began < 10
    assert result.exit_code == 2
    assert "error: run_huge.py: " in result.output and "KiB a file may have to be analysed" in result.output
    assert "run_huge_but_unrelated.py" not in result.output  # no loop can be there: never an error


def test_a_file_with_too_many_syntax_nodes_is_refused_before_libcst_sees_it(tmp_path, monkeypatch):
    from mtp_migrate.source import MAX_NODES

    (tmp_path / "run_wide.py").write_text(PIPELINE + "".join(f"V{i} = ({i}, {i})\n" for i in range(MAX_NODES // 6)))
    monkeypatch.setattr("libcst.parse_module", lambda *args: pytest.fail("LibCST parsed it"))
    result = invoke("check", "--no-verify", "--jobs", "1", ".", cwd=tmp_path)
    assert result.exit_code == 2
    assert f"error: run_wide.py: over {MAX_NODES:,} syntax nodes" in result.output


def test_every_line_ending_form_survives_apply_exactly(tmp_path):
    for name, ending in (("run_lf.py", "\n"), ("run_crlf.py", "\r\n"), ("run_cr.py", "\r")):
        (tmp_path / name).write_bytes(PIPELINE.replace("\n", ending).encode())
    assert invoke("apply", "--no-verify", ".", cwd=tmp_path).exit_code == 0
    for name, ending in (("run_lf.py", b"\n"), ("run_crlf.py", b"\r\n"), ("run_cr.py", b"\r")):
        data = (tmp_path / name).read_bytes()
        assert b"compute_mtp_ce_loss" in data and data.endswith(ending)
        others = data.replace(b"\r\n", b"") if ending == b"\r\n" else data.replace(ending, b"")
        assert b"\r" not in others and b"\n" not in others, name


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root can give a file away")
def test_apply_keeps_owner_group_and_mode(tmp_path):
    target = tmp_path / "run_rho1.py"
    shutil.copy(BEFORE / "run_rho1.py", target)
    os.chown(target, 65534, 65534)
    target.chmod(0o640)
    assert invoke("apply", "--no-verify", ".", cwd=tmp_path).exit_code == 0
    status = target.stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o7777) == (65534, 65534, 0o640)
    assert b"del " in target.read_bytes()


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_jobs_are_capped_at_the_number_of_files(tmp_path):
    for name in ("run_a.py", "run_b.py", "run_c.py"):
        shutil.copy(BEFORE / "run_baseline.py", tmp_path / name)
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mtp_migrate", "check", "--no-verify", "--jobs", "5000", "."],
                          cwd=tmp_path, capture_output=True, timeout=120)
    assert done.returncode == 1 and time.monotonic() - began < 60


def test_options_are_checked_before_any_file_is_read(tmp_path, monkeypatch):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")
    monkeypatch.setattr(mtp_migrate.cli, "discover", lambda *args: pytest.fail("a file was looked at"))
    result = invoke("check", "--utility-module", "not a module", ".", cwd=tmp_path)
    assert result.exit_code == 2 and "is not a dotted module name" in result.output


def test_verify_json_prints_json_even_for_an_early_error(tmp_path):
    result = invoke("verify", "--base", "HEAD", "--json", ".", cwd=tmp_path)
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert "not a git repository" in report["error"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_syntax_error_at_the_revision_names_the_revision(tmp_path):
    target = tmp_path / "run_baseline.py"
    target.write_text("def broken(:\n    return F.cross_entropy\n")
    _git("init", "-q", cwd=tmp_path)
    _git("add", "-A", cwd=tmp_path)
    _git("commit", "-qm", "broken", cwd=tmp_path)
    shutil.copy(BEFORE / "run_baseline.py", target)
    result = invoke("verify", "--base", "HEAD", ".", cwd=tmp_path)
    assert result.exit_code == 2
    assert "error: run_baseline.py: at HEAD: syntax error:" in result.output


def test_the_summary_counts_only_what_was_written(tmp_path, monkeypatch):
    shutil.copy(BEFORE / "run_baseline.py", tmp_path / "run_baseline.py")

    def full_disk(path, data, expected=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mtp_migrate.cli, "write_atomic", full_disk)
    result = invoke("apply", "--no-verify", "--json", ".", cwd=tmp_path)
    assert result.exit_code == 2
    summary = json.loads(result.output)["summary"]
    # run_baseline.py and the utility vendored beside it: neither written, nothing counted as done
    assert (summary["changed"], summary["sites_rewritten"], summary["errors"]) == (0, 0, 2)


def test_syntax_newer_than_this_python_is_left_to_libcst_but_never_deep_nesting(tmp_path):
    newer = "import torch.nn.functional as F\ntype Loss = float\n\n\ndef f(x):\n    return F.cross_entropy\n"
    (tmp_path / "run_newer.py").write_text(newer)
    (tmp_path / "run_newer_deep.py").write_text(newer + "W = " + "(" * 1500 + "1" + ")" * 1500 + "\n")
    (tmp_path / "run_broken.py").write_text("import torch.nn.functional as F\ndef f(:\n    return F.cross_entropy\n")
    done = subprocess.run([sys.executable, "-m", "mtp_migrate", "check", "--no-verify", "--json", "--jobs", "1", "."],
                          cwd=tmp_path, capture_output=True, timeout=120)
    assert done.returncode == 2, done.stderr.decode()[-2000:]
    files = {f["path"]: f for f in json.loads(done.stdout)["files"]}
    assert files["run_newer.py"]["status"] == "unchanged"  # `type X = ...` is Python 3.12: LibCST reads it
    assert files["run_newer_deep.py"]["error"].startswith("syntax error: too many nested parentheses")
    assert files["run_broken.py"]["error"] == "syntax error: invalid syntax (line 2, column 7)"
