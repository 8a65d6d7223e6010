"""The verified programs run in a child process, apart from the judge: killed at the time limit,
stopped with the tool, unable to write files, importing nothing of the repository."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtp_migrate.refusals import Code
from mtp_migrate.verify import worker as verify_worker
from mtp_migrate.verify.program import SiteProgram
from mtp_migrate.verify.sandbox import SANDBOX, Raised

SLOW = '''import torch.nn.functional as F


def mtp_loss(logits, labels, attention_mask):
    ignore = sum(range(10**10)) * 0 - 100
    _, seq_len, n_future, vocab_size = logits.shape
    total = 0.0
    for k in range(1, n_future + 1):
        valid_len = seq_len - k
        if valid_len <= 0:
            continue
        ce = F.cross_entropy(logits[:, :valid_len, k - 1].reshape(-1, vocab_size), labels[:, k:].reshape(-1),
                             reduction="none", ignore_index=ignore)
        mask = attention_mask[:, k:].reshape(-1).float() * (labels[:, k:].reshape(-1) != ignore).float()
        denom = mask.sum()
        if denom > 0:
            total += (ce * mask).sum() / denom
    return total / n_future
'''


def _program(original: str, rewritten: str = "def rewritten():\n    return _mtp_outputs(locals(), None)\n"):
    return SiteProgram(original=original, rewritten=rewritten, slots=[], outputs=[], line=1)


def test_a_slow_statement_in_the_slice_is_killed_at_the_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(verify_worker, "CALL_TIMEOUT_S", 2.0)
    from test_verify_context import forced_verdict

    started = time.monotonic()
    verdict = forced_verdict(SLOW)
    assert time.monotonic() - started < 60
    assert verdict.code is Code.VERIFIER_FAILED and "killed" in str(verdict), verdict


def test_the_child_writes_no_file_and_imports_nothing_of_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "torch.py").write_text("raise SystemExit('the current folder was imported')\n")
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "written"
    program = _program(f"def original():\n    stream = open({str(target)!r}, 'w')\n    stream.write('data')\n"
                       "    stream.flush()\n    return _mtp_outputs(locals(), None)\n")
    SANDBOX.close()
    SANDBOX.request(("load", {"original": program.original, "rewritten": program.rewritten}, {}), 120)
    with pytest.raises(Raised) as raised:
        SANDBOX.request(("run", "original", {"shape": {"B": 2, "S": 7, "H": 3, "V": 11}}, [], [], False), 10)
    assert raised.value.kind == "OSError", raised.value  # the file size limit is 0: nothing can be written
    assert not target.exists() or target.read_bytes() == b""
    SANDBOX.close()


def test_a_signal_stops_the_tool_and_its_child_at_once(tmp_path):
    (tmp_path / "run_slow.py").write_text(SLOW)
    run = subprocess.Popen([sys.executable, "-m", "mtp_migrate", "check", "--jobs", "1", "--no-cache", "."],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _children(run.pid):
        time.sleep(0.2)
    children = _children(run.pid)
    assert children, "the verifier's child process never started"
    time.sleep(1)
    sent = time.monotonic()
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    assert run.returncode == 130, (out + err).decode()[-2000:]
    time.sleep(0.5)
    assert not [child for child in children if _alive(child)]


def _children(pid: int) -> list[int]:
    """The verifier's children below ``pid`` (Linux: read off /proc)."""
    found, parents = [], {pid}
    for _ in range(3):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid in parents:
                parents.add(int(entry.name))
                if b"sandbox.py" in command and int(entry.name) not in found:
                    found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_limit_is_documented():
    text = (Path(__file__).parents[1] / "docs" / "verification.md").read_text()
    assert f"{verify_worker.CALL_TIMEOUT_S:.0f} s limit" in text
