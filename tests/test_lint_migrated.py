"""What a migration writes passes the project's own linters: ``ruff check --select I,E501``.

The utility import goes into the section ruff's isort rules put it in, sorted; the import,
the ``__init__.py`` export and the call stay within the project's line length. Each
fixture is checked with its own settings (its ``pyproject.toml``, else ruff's defaults,
which are the tool's), and a migration may add no finding: an import block that was
sorted stays sorted, and every line over the limit was already there. The vendored
``loss_utils.py`` is ours, byte for byte, and not checked here.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import invoke

ROOT = Path(__file__).parents[1]
CODEMOD = ROOT / "fixtures" / "codemod"
PIPELINES = ROOT / "fixtures" / "pipelines"


def findings(repository: Path, files: list[Path]) -> dict[Path, set[str]]:
    """Per file: ``"I001"`` if its imports are unsorted, and each line over the limit, by its text."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "I,E501",
                           "--output-format", "json", *map(str, files)], cwd=repository, capture_output=True,
                          text=True)
    assert done.returncode in (0, 1), done.stderr
    found: dict[Path, set[str]] = {path.resolve(): set() for path in files}
    for item in json.loads(done.stdout):
        path = Path(item["filename"]).resolve()
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        found[path].add(item["code"] if item["code"] != "E501" else lines[item["location"]["row"] - 1])
    return found


def migrate(repository: Path) -> tuple[dict, dict]:
    """``(findings before, findings after)`` of ``apply`` on the repository's Python files."""
    before = findings(repository, sorted(repository.rglob("*.py")))
    result = invoke("apply", "--no-verify", "--rho1", "rewrite", ".", cwd=repository)
    assert result.exit_code == 0, result.output
    after = findings(repository, [p for p in sorted(repository.rglob("*.py")) if p.name not in (
        "loss_utils.py", "mtp_loss_utils.py")])
    return before, after


def assert_nothing_new(before: dict, after: dict) -> None:
    for path, found in after.items():
        assert found <= before.get(path, set()), f"{path.name}: {sorted(found - before.get(path, set()))}"


def test_the_fixture_pipelines_after_migration():
    after = sorted((PIPELINES / "after").glob("run_*.py"))
    assert findings(PIPELINES, after) == {path.resolve(): set() for path in after}


def test_a_src_layout_repository_with_its_own_utils_package(tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(ROOT / "fixtures" / "repos" / "src_layout", repository)
    (repository / ".git").mkdir()
    before, after = migrate(repository)
    init = repository / "src" / "weighted_mtp" / "utils" / "__init__.py"
    assert "compute_mtp_ce_loss_unweighted" in init.read_text()  # the export, checked with the rest
    assert_nothing_new(before, after)


# A repository of the codemod fixtures as pipelines: in a folder of scripts (the utility vendored beside
# them, a third-party import for ruff) or in a repository with a weighted_mtp/utils package (first-party).
LAYOUTS = {"scripts": [], "weighted_mtp": ["weighted_mtp/__init__.py", "weighted_mtp/utils/__init__.py"]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_codemod_fixtures_in_each_layout(tmp_path, layout):
    repository = tmp_path / "repo"
    (repository / "pipelines").mkdir(parents=True)
    (repository / ".git").mkdir()
    for package in LAYOUTS[layout]:
        (repository / package).parent.mkdir(parents=True, exist_ok=True)
        (repository / package).write_text("")
    for case in sorted(CODEMOD.glob("*.in.py")):
        shutil.copy(case, repository / "pipelines" / f"run_{case.name.removesuffix('.in.py')}.py")
    before, after = migrate(repository)
    migrated = [p for p in (repository / "pipelines").glob("run_*.py") if "compute_mtp_ce_loss" in p.read_text()]
    assert len(migrated) > 10
    assert_nothing_new(before, after)
