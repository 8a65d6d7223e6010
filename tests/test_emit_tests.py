"""``--emit-tests DIR``: the equivalence tests a migration leaves in the target repository.

They run with torch and pytest alone (the tool's packages are made unimportable), pass
the lint rules a user's repository has (``lint_emitted.RULES``), fail where a seeded change
to the vendored utility breaks a site and only there, and survive re-runs: idempotent,
extended by newly migrated sites, never written over a file the tool did not write.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import invoke
from lint_emitted import ruff_emitted

ROOT = Path(__file__).parents[1]
REPOSITORY = ROOT / "fixtures" / "repos" / "src_layout"
PIPELINES = Path("src/weighted_mtp/pipelines")
UTILITY = Path("src/weighted_mtp/utils/loss_utils.py")
GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@example.com"}
# pytest in a process where neither the tool nor the weighted_mtp installed with it can be imported.
WITHOUT_THE_TOOL = """
import importlib.abc, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower() + str(f).lower()]
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("codemods", "mtp_migrate"):
            raise ImportError(f"the emitted tests imported {name}")
sys.meta_path.insert(0, Blocked())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(*args, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env={**os.environ, **GIT})


def run_emitted(repository: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_THE_TOOL, "-q", "-p", "no:cacheprovider", "--tb=no", "-rf", "tests",
                           *args], cwd=repository, capture_output=True, text=True, timeout=300)


def failing(result: subprocess.CompletedProcess) -> set[str]:
    """The test functions with a failing case (``-rf`` lines: ``FAILED tests/x.py::test_y[case]``)."""
    return set(re.findall(r"^FAILED \S+::(\w+)", result.stdout, flags=re.M))


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not {".git", ".mtp_migrate_cache", "__pycache__"} & set(p.relative_to(root).parts)}


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Path:
    """The fixture repository, committed, then ``apply --emit-tests tests/`` (no rho1 loop of it can be
    rewritten: one is read after the loop, one breaks)."""
    repository = tmp_path_factory.mktemp("emit") / "repo"
    shutil.copytree(REPOSITORY, repository)
    git("init", "-q", cwd=repository)
    git("add", "-A", cwd=repository)
    git("commit", "-q", "-m", "before", cwd=repository)
    result = invoke("apply", "--rho1", "rewrite", "--emit-tests", "tests", ".", cwd=repository)
    assert result.exit_code == 0, result.output
    return repository


@pytest.fixture
def copy(migrated, tmp_path) -> Path:
    target = tmp_path / "repo"
    shutil.copytree(migrated, target)
    return target


def test_one_module_per_migrated_file_naming_file_line_and_revision(migrated):
    modules = sorted(p.name for p in (migrated / "tests").glob("test_*.py"))
    assert modules == ["test_mtp_migration_run_baseline.py", "test_mtp_migration_run_verifiable.py"]
    text = (migrated / "tests" / "test_mtp_migration_run_verifiable.py").read_text()
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=migrated, capture_output=True,
                              text=True).stdout.strip()
    assert f"last from revision {revision}." in text
    assert 'GUARDED_FILE = "../src/weighted_mtp/pipelines/run_verifiable.py"' in text
    pipeline = (migrated / PIPELINES / "run_verifiable.py").read_text().splitlines()
    tests = re.findall(r"^def test_run_verifiable_line_(\d+)_(\w+)\(", text, flags=re.M)
    # The negative batch's site is refused: its length comes from the positive batch, so it runs on logits one
    # position shorter, which the utility rejects (tests/test_verify.py).
    assert [function for _, function in tests] == ["train_step", "validate_verifiable"]
    for line, function in tests:
        assert "compute_mtp_ce_loss" in pipeline[int(line) - 1] or "compute_mtp_ce_loss" in pipeline[int(line)]
        assert any(re.match(rf"\s*def {function}\(", code) for code in pipeline[:int(line)])


def test_the_modules_import_only_torch_pytest_and_the_standard_library(migrated):
    for module in (migrated / "tests").glob("test_*.py"):
        tree = ast.parse(module.read_text())
        top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert top - sys.stdlib_module_names == {"torch", "pytest"}, module.name
        inner = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} - {None}
        assert not {name for name in inner if name.startswith(("codemods", "mtp_migrate"))}


def test_the_generated_tests_pass_without_the_tool(migrated):
    result = run_emitted(migrated)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"(\d+) passed", result.stdout) and int(re.search(r"(\d+) passed", result.stdout).group(1)) > 100


def test_the_generated_tests_pass_a_users_lint_rules(migrated):
    result = ruff_emitted("tests", migrated)
    assert result.returncode == 0, result.stdout


WEIGHTED = {"test_run_verifiable_line_37_train_step", "test_run_verifiable_line_98_validate_verifiable"}
SEEDS = {  # (the change to the vendored utility, the tests that must fail; every other test must pass)
    "head_average": (('head_average: str = "all"', 'head_average: str = "valid"'), WEIGHTED),
    "weight_alignment": (('weight_alignment: str = "target"', 'weight_alignment: str = "previous"'), WEIGHTED),
    "mask_ignored_labels": (("if mask_ignored_labels:", "if False:"),
                            WEIGHTED | {"test_run_baseline_line_22_train_step",
                                        "test_run_baseline_line_40_validate_baseline"}),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_a_seeded_change_to_the_utility_fails_the_sites_it_breaks(copy, seed):
    (old, new), expected = SEEDS[seed]
    utility = copy / UTILITY
    text = utility.read_text()
    assert old in text
    utility.write_text(text.replace(old, new))
    result = run_emitted(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert failing(result) == expected, result.stdout[-3000:]


def test_a_rerun_is_idempotent_and_check_agrees(copy):
    before = snapshot(copy)
    assert invoke("apply", "--rho1", "rewrite", "--emit-tests", "tests", ".", cwd=copy).exit_code == 0
    assert invoke("check", "--rho1", "rewrite", "--emit-tests", "tests", ".", cwd=copy).exit_code == 0
    assert snapshot(copy) == before


def test_a_newly_migrated_site_is_added_and_the_old_sections_are_kept(copy):
    git("checkout", "--", str(PIPELINES / "run_verifiable.py"), cwd=copy)  # its loops back, as if newly written
    module = copy / "tests" / "test_mtp_migration_run_verifiable.py"
    kept = module.read_text()
    body = kept[kept.index("# === mtp-migrate site"):]
    pipeline = copy / PIPELINES / "run_verifiable.py"
    head, tail = pipeline.read_text().rsplit("reduction=", 1)  # the validation site's loop, spelled anew
    pipeline.write_text(f"{head}ignore_index=-100, reduction={tail}")
    assert invoke("apply", "--emit-tests", "tests", str(pipeline), cwd=copy).exit_code == 0
    text = module.read_text()
    assert body in text  # every earlier section, byte for byte
    assert len(re.findall(r"^# === mtp-migrate site", text, flags=re.M)) == 3
    assert run_emitted(copy, "tests/test_mtp_migration_run_verifiable.py").returncode == 0


def test_a_module_the_tool_did_not_write_is_left_and_its_pipeline_not_migrated(tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(REPOSITORY, repository)
    mine = repository / "tests" / "test_mtp_migration_run_baseline.py"
    mine.parent.mkdir()
    mine.write_text("def test_mine():\n    assert True\n")
    before = (repository / PIPELINES / "run_baseline.py").read_bytes()
    result = invoke("apply", "--emit-tests", "tests", ".", cwd=repository)
    assert result.exit_code == 2
    assert "test_mtp_migration_run_baseline.py: exists and was not written by mtp-migrate" in result.output
    assert mine.read_text() == "def test_mine():\n    assert True\n"
    assert (repository / PIPELINES / "run_baseline.py").read_bytes() == before
    assert (repository / "tests" / "test_mtp_migration_run_verifiable.py").is_file()  # the others go on


def test_diff_previews_the_modules_and_writes_nothing(tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(REPOSITORY, repository)
    before = snapshot(repository)
    result = invoke("diff", "--emit-tests", "tests", ".", cwd=repository)
    assert result.exit_code == 1
    assert "+++ b/tests/test_mtp_migration_run_verifiable.py" in result.output
    assert snapshot(repository) == before


def test_two_pipelines_of_one_name_get_a_module_each(tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(REPOSITORY, repository)
    twin = repository / "src" / "weighted_mtp" / "experiments"
    twin.mkdir()
    shutil.copy(repository / PIPELINES / "run_baseline.py", twin / "run_baseline.py")
    assert invoke("apply", "--emit-tests", "tests", ".", cwd=repository).exit_code == 0
    names = {p.name for p in (repository / "tests").glob("test_*run_baseline.py")}
    assert names == {"test_mtp_migration_src_weighted_mtp_experiments_run_baseline.py",
                     "test_mtp_migration_src_weighted_mtp_pipelines_run_baseline.py"}


def test_emit_tests_needs_verification(tmp_path):
    result = invoke("apply", "--no-verify", "--emit-tests", "tests", ".", cwd=tmp_path)
    assert result.exit_code == 2
    assert "needs verification" in result.output


BASELINE = ROOT / "fixtures" / "pipelines" / "before" / "run_baseline.py"
LAYOUTS = {  # where the pipeline is -> the module the utility is vendored as
    "pipelines/run_baseline.py": "mtp_loss_utils",  # a folder of scripts: `python pipelines/run_baseline.py`
    "trainer/pipelines/run_baseline.py": "trainer.pipelines.mtp_loss_utils",  # a package: `python -m ...`
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_a_repository_without_a_utility_package_the_tests_check_the_vendored_copy(tmp_path, layout):
    repository = tmp_path / "repo"
    pipeline = repository / layout
    pipeline.parent.mkdir(parents=True)
    (repository / ".git").mkdir()
    shutil.copy(BASELINE, pipeline)
    for package in pipeline.relative_to(repository).parents[:-1]:
        if package.parts[0] == "trainer":
            (repository / package / "__init__.py").write_text("")
    assert invoke("apply", "--emit-tests", "tests", ".", cwd=repository).exit_code == 0
    vendored = pipeline.with_name("mtp_loss_utils.py")
    assert re.search(rf"^from {LAYOUTS[layout]} import \(?\s*compute_mtp_ce_loss,", pipeline.read_text(), flags=re.M)
    passed = run_emitted(repository)
    assert passed.returncode == 0 and " 0 passed" not in passed.stdout, passed.stdout + passed.stderr
    vendored.write_text(vendored.read_text().replace("if mask_ignored_labels:", "if False:"))
    failed = run_emitted(repository)
    tests = re.findall(r"^def (test_\w+)\(", (repository / "tests" / "test_mtp_migration_run_baseline.py").read_text(),
                       flags=re.M)
    assert len(tests) == 2 and failing(failed) == set(tests), failed.stdout[-3000:]  # both sites mask ignored labels


def test_a_loop_that_imports_torch_nn_as_nn_is_frozen_with_a_from_import(tmp_path):
    """``import torch.nn as nn`` in the loop's file: the frozen loop says ``from torch import nn`` (the same
    module; ruff's PLR0402 flags the other form), passes the lint and still runs."""
    pipelines = tmp_path / "repo" / "pipelines"
    pipelines.mkdir(parents=True)
    (tmp_path / "repo" / ".git").mkdir()
    source = BASELINE.read_text()
    assert "import torch.nn.functional as F\n" in source
    source = source.replace("import torch.nn.functional as F\n", "import torch.nn as nn\n")
    (pipelines / "run_baseline.py").write_text(source.replace("F.cross_entropy(", "nn.functional.cross_entropy("))
    assert invoke("apply", "--emit-tests", "tests", ".", cwd=tmp_path / "repo").exit_code == 0
    module = (tmp_path / "repo" / "tests" / "test_mtp_migration_run_baseline.py").read_text()
    assert "    from torch import nn\n" in module and "import torch.nn as nn" not in module
    lint = ruff_emitted("tests", tmp_path / "repo")
    assert lint.returncode == 0, lint.stdout
    passed = run_emitted(tmp_path / "repo")
    assert passed.returncode == 0 and " 0 passed" not in passed.stdout, passed.stdout + passed.stderr
