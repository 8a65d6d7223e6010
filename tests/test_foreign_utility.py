"""Never write over code we do not own: a repository with its own, different loss_utils.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
REPO = ROOT / "fixtures" / "repos" / "foreign_utility"
SHIPPED = (ROOT / "weighted_mtp" / "utils" / "loss_utils.py").read_bytes()
OWNED = ["weighted_mtp/utils/loss_utils.py", "weighted_mtp/utils/__init__.py", "pipelines/run_migrated.py"]


@pytest.fixture
def repo(tmp_path):
    shutil.copytree(REPO, tmp_path / "repo")
    (tmp_path / "repo" / ".git").mkdir()
    return tmp_path / "repo"


def apply(repo: Path, *options: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "mtp_migrate", "apply", "--json", "pipelines", *options], cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr
    return {Path(f["path"]).name: f for f in json.loads(done.stdout)["files"]}


@pytest.mark.parametrize("rho1", ["del", "rewrite", "skip"])
def test_a_different_utility_is_left_byte_identical_and_the_sites_say_why(repo, rho1):
    before = {name: (repo / name).read_bytes() for name in [*OWNED, "pipelines/run_loop.py"]}
    files = apply(repo, "--rho1", rho1)
    for name, data in before.items():
        assert (repo / name).read_bytes() == data, name
    (site,) = files["run_loop.py"]["sites"]
    assert site["action"] == "skipped" and site["code"] == "MTP301"
    assert "weighted_mtp/utils/loss_utils.py" in site["reason"] and "--utility-module" in site["reason"]
    (rho1_site,) = files["run_rho1.py"]["sites"]
    expected = {"del": "del_inserted", "rewrite": "skipped", "skip": "skipped"}[rho1]
    assert rho1_site["action"] == expected  # a `del` needs no utility; a rewrite would


def test_a_new_utility_module_is_the_way_out(repo):
    files = apply(repo, "--rho1", "rewrite", "--utility-module", "weighted_mtp.utils.mtp_loss")
    assert (repo / "weighted_mtp/utils/loss_utils.py").read_bytes() == (REPO / "weighted_mtp/utils/loss_utils.py"
                                                                        ).read_bytes()
    assert (repo / "weighted_mtp/utils/mtp_loss.py").read_bytes() == SHIPPED
    assert all(s["action"] == "rewritten" and s["verified"] for s in files["run_loop.py"]["sites"])
    assert "from weighted_mtp.utils.mtp_loss import compute_mtp_ce_loss" in (repo / "pipelines/run_loop.py").read_text()


def test_a_star_import_in_the_package_that_may_rebind_the_utility_is_refused(tmp_path):
    """``from .legacy import *`` after our export line could rebind ``compute_mtp_ce_loss``: not ours to use."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "pipelines", repo / "pipelines")
    (repo / ".git").mkdir()
    (repo / "weighted_mtp" / "utils").mkdir(parents=True)
    (repo / "weighted_mtp" / "__init__.py").write_text("")
    init = repo / "weighted_mtp" / "utils" / "__init__.py"
    init.write_text("from .legacy import *  # noqa: F403\n")
    (repo / "weighted_mtp" / "utils" / "legacy.py").write_text("def compute_mtp_ce_loss(*args):\n    return 0\n")
    files = apply(repo)
    (site,) = files["run_loop.py"]["sites"]
    assert site["code"] == "MTP301" and "from .legacy" in site["reason"], site
    assert init.read_text() == "from .legacy import *  # noqa: F403\n"
    assert not (repo / "weighted_mtp" / "utils" / "loss_utils.py").exists()
