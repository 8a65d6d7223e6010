"""The whole tool on a repository laid out as real ones are (``fixtures/repos/src_layout``):
``diff | git apply`` writes exactly what ``apply`` writes, ``check`` then passes,
``verify --base`` proves the rewrite, and the result is clean under ``ruff --select F``."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
REPOSITORY = ROOT / "fixtures" / "repos" / "src_layout"
GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@example.com"}
PIPELINES = Path("src/weighted_mtp/pipelines")

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def run(*args, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, env={**os.environ, **GIT}, timeout=600)


def tool(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "mtp_migrate", *args, "--color", "never", cwd=cwd)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {".git", ".mtp_migrate_cache"} & set(p.relative_to(root).parts)}


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> dict:
    """One repository migrated by ``apply`` and a copy patched with ``diff``'s output."""
    applied = tmp_path_factory.mktemp("e2e") / "applied"
    shutil.copytree(REPOSITORY, applied)
    run("git", "init", "-q", cwd=applied)
    run("git", "add", "-A", cwd=applied)
    assert run("git", "commit", "-q", "-m", "before", cwd=applied).returncode == 0
    patched = applied.parent / "patched"
    shutil.copytree(applied, patched)
    original = tree(applied)
    dry = tool("diff", ".", cwd=applied)
    wrote = tool("apply", ".", cwd=applied)
    return {"applied": applied, "patched": patched, "original": original, "diff": dry, "apply": wrote}


def test_diff_piped_to_git_apply_writes_what_apply_writes(migrated):
    assert migrated["diff"].returncode == 1, migrated["diff"].stderr.decode()
    assert migrated["apply"].returncode == 0, migrated["apply"].stdout.decode()
    patch = migrated["diff"].stdout
    done = run("git", "apply", "--whitespace=nowarn", "-", cwd=migrated["patched"], stdin=patch)
    assert done.returncode == 0, done.stderr.decode()
    applied, patched = tree(migrated["applied"]), tree(migrated["patched"])
    assert applied == patched
    assert applied != migrated["original"]


def test_what_the_migration_wrote(migrated):
    applied = tree(migrated["applied"])
    changed = {name for name in applied if applied[name] != migrated["original"].get(name)}
    assert changed == {"src/weighted_mtp/utils/__init__.py", "src/weighted_mtp/utils/loss_utils.py",
                       *(f"{PIPELINES}/run_{name}.py" for name in ("baseline", "rho1", "verifiable"))}
    assert applied["src/weighted_mtp/utils/loss_utils.py"] == (ROOT / "weighted_mtp/utils/loss_utils.py").read_bytes()
    crlf = applied[f"{PIPELINES}/run_verifiable.py"]
    assert b"compute_mtp_ce_loss(" in crlf and b"\n" not in crlf.replace(b"\r\n", b"")
    init = applied["src/weighted_mtp/utils/__init__.py"].decode()
    for kept in ("    # Evaluation utils\n", "\n\n    # S3 utils\n", '"download",  # checkpoints only\n'):
        assert kept in init
    assert "from .evaluation import perplexity\nfrom .loss_utils import" in init
    summary = migrated["apply"].stdout.decode()
    assert "skipped" in summary  # a rho1 validation loop that breaks out early is left, with its reason


def test_check_passes_after_apply(migrated):
    done = tool("check", ".", cwd=migrated["applied"])
    assert done.returncode == 0, done.stdout.decode()


def test_verify_base_proves_every_rewritten_site(migrated):
    done = tool("verify", "--base", "HEAD", "--json", ".", cwd=migrated["applied"])
    assert done.returncode == 0, done.stdout.decode()
    import json

    sites = [s for f in json.loads(done.stdout)["files"] for s in f["sites"]]
    assert len(sites) >= 4 and all(s["verified"] for s in sites)


def test_the_result_is_clean_under_pyflakes_rules(migrated):
    done = run(sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--select", "F", "src",
               cwd=migrated["applied"])
    assert done.returncode == 0, done.stdout.decode()
