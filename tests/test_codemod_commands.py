"""Before/after tests of the individual commands (LibCST CodemodTest style) and their rules."""

import os
import subprocess
import sys
from pathlib import Path

import libcst as cst
import pytest
from libcst.codemod import CodemodTest

from mtp_migrate.commands.add_utility_import import AddUtilityImportCommand
from mtp_migrate.commands.export_utility import ExportUtilityCommand
from mtp_migrate.commands.insert_mtp_del import InsertMTPDelCommand
from mtp_migrate.commands.remove_dead_code import RemoveDeadCodeCommand
from mtp_migrate.refusals import Code
from mtp_migrate.runner import migrate_source
from mtp_migrate.vendoring import utility_target

ROOT = Path(__file__).parents[1]
FIXTURES = ROOT / "fixtures" / "codemod"



def migrated(source: str, **options) -> str:
    return migrate_source(source.encode(), **options).output.decode()


class TestRemoveDeadCode(CodemodTest):
    TRANSFORM = RemoveDeadCodeCommand

    def test_keeps_the_names_still_used(self):
        before = "def f(x):\n    b, s, n, v = x.shape\n    model_dtype = next(m.parameters()).dtype\n    return n\n"
        after = "def f(x):\n    n = x.shape[2]\n    return n\n"
        self.assertCodemod(before, after, names=["b", "s", "n", "v", "model_dtype"])

    def test_only_touches_names_the_rewrite_freed(self):
        before = "import logging\n\ndef f(x):\n    dtype = x.dtype\n    return 1\n"
        self.assertCodemod(before, before, names=["unrelated"])

    def test_never_removes_protected_imports(self):
        before = (
            "from __future__ import annotations\n"
            "import logging  # noqa: F401\n"
            "from typing import Any\n"
            "import torch.nn.functional as F\n"
            "__all__ = ['Any']\n"
        )
        after = (
            "from __future__ import annotations\n"
            "import logging  # noqa: F401\n"
            "from typing import Any\n"
            "__all__ = ['Any']\n"
        )
        self.assertCodemod(before, after, names=["annotations", "logging", "Any", "F"])

    def test_keeps_imports_of_init_modules(self):
        before = "import torch.nn.functional as F\n"
        self.assertCodemod(before, before, names=["F"], context_override=_context("pkg/__init__.py"))

    def test_comment_above_a_removed_line_moves_down(self):
        before = "def f(x):\n    # shapes\n    b, s = x.shape\n    return 1\n"
        after = "def f(x):\n    # shapes\n    return 1\n"
        self.assertCodemod(before, after, names=["b", "s"])


def _context(filename):
    from libcst.codemod import CodemodContext

    return CodemodContext(filename=filename)


class TestAddUtilityImport(CodemodTest):
    TRANSFORM = AddUtilityImportCommand

    def test_adds_a_new_import(self):
        before = "import torch\n\nx = 1\n"
        after = "import torch\nfrom weighted_mtp.utils import compute_mtp_ce_loss\n\nx = 1\n"
        self.assertCodemod(before, after, names=["compute_mtp_ce_loss"])

    def test_merges_in_sorted_order(self):
        before = "from weighted_mtp.utils import (\n    aaa,\n    zzz,\n)\n"
        after = "from weighted_mtp.utils import (\n    aaa,\n    compute_mtp_ce_loss,\n    zzz,\n)\n"
        self.assertCodemod(before, after, names=["compute_mtp_ce_loss"])

    def test_merges_on_one_line(self):
        before = "from weighted_mtp.utils import zzz\n"
        after = "from weighted_mtp.utils import compute_mtp_ce_loss, zzz\n"
        self.assertCodemod(before, after, names=["compute_mtp_ce_loss"])

    def test_other_utility_module(self):
        before = "x = 1\n"
        after = "from my.losses import compute_mtp_ce_loss\n\nx = 1\n"
        self.assertCodemod(before, after, names=["compute_mtp_ce_loss"], utility_module="my.losses")

    # ruff's isort sections: stdlib, third-party, first-party (here: these), relative.
    FIRST_PARTY = staticmethod(lambda module: module.split(".")[0] in ("weighted_mtp", "trainer", "zeta"))

    def test_a_first_party_import_joins_its_section_sorted(self):
        before = '"""Doc."""\n\nimport os\n\nimport torch\n\nfrom trainer.data import load\nfrom zeta import z\n'
        after = ('"""Doc."""\n\nimport os\n\nimport torch\n\nfrom trainer.data import load\n'
                 "from weighted_mtp.utils import compute_mtp_ce_loss\nfrom zeta import z\n")
        self.assertCodemod(before, after, names=["compute_mtp_ce_loss"], first_party=self.FIRST_PARTY)

    def test_a_missing_section_is_opened_between_its_neighbours(self):
        before = "import os\n\nfrom trainer.data import load\n\nx = 1\n"
        after = "import os\n\nfrom mtp_loss_utils import compute_mtp_ce_loss\n\nfrom trainer.data import load\n\nx = 1\n"
        self.assertCodemod(before, after, names=["compute_mtp_ce_loss"], utility_module="mtp_loss_utils",
                           first_party=self.FIRST_PARTY)

    def test_the_first_import_gets_the_blank_lines_ruff_wants(self):
        before = '"""Doc."""\n\n\ndef f():\n    pass\n'
        after = '"""Doc."""\n\nfrom weighted_mtp.utils import compute_mtp_ce_loss\n\n\ndef f():\n    pass\n'
        self.assertCodemod(before, after, names=["compute_mtp_ce_loss"])

    def test_a_long_import_is_wrapped_at_the_line_length(self):
        before = "import torch\n"
        after = ("import torch\nfrom weighted_mtp.utils import (\n    compute_mtp_ce_loss,\n"
                 "    compute_mtp_ce_loss_unweighted,\n)\n")
        self.assertCodemod(before, after, names=["compute_mtp_ce_loss", "compute_mtp_ce_loss_unweighted"],
                           line_length=60)
        self.assertCodemod(before, "import torch\nfrom weighted_mtp.utils import compute_mtp_ce_loss, "
                                   "compute_mtp_ce_loss_unweighted\n",
                           names=["compute_mtp_ce_loss", "compute_mtp_ce_loss_unweighted"], line_length=88)

    def test_an_import_that_grows_too_long_is_wrapped(self):
        before = "from weighted_mtp.utils import perplexity  # noqa: F401\n"
        after = ("from weighted_mtp.utils import (  # noqa: F401\n    compute_mtp_ce_loss,\n    perplexity,\n)\n")
        self.assertCodemod(before, after, names=["compute_mtp_ce_loss"], line_length=60)


class TestInsertDel(CodemodTest):
    TRANSFORM = InsertMTPDelCommand

    def test_rho1_loop_gets_del_and_second_run_nothing(self):
        source = (FIXTURES / "rho1_selective.in.py").read_text()
        expected = (FIXTURES / "rho1_selective.out.py").read_text()
        self.assertCodemod(source, expected)
        self.assertCodemod(expected, expected)

    def test_names_read_after_the_loop_are_not_deleted(self):
        source = (FIXTURES / "rho1_selective.in.py").read_text().replace(
            "    return weighted_ce_loss,", "    print(selection_k)\n    return weighted_ce_loss,")
        output = migrated(source)
        assert "del logits_k, labels_k, mask_k, ce_k, selected, selected_sum\n" in output


class TestExportUtility(CodemodTest):
    TRANSFORM = ExportUtilityCommand

    def test_adds_import_and_all_entries(self):
        before = '"""Utils."""\n\nfrom .other import helper\n\n__all__ = ["helper"]\n'
        after = (
            '"""Utils."""\n\nfrom .loss_utils import compute_mtp_ce_loss, compute_mtp_ce_loss_unweighted\n'
            "from .other import helper\n\n"
            '__all__ = ["helper", "compute_mtp_ce_loss", "compute_mtp_ce_loss_unweighted"]\n'
        )
        self.assertCodemod(before, after)
        self.assertCodemod(after, after)

    def test_the_import_and_a_one_line_all_are_wrapped_at_the_line_length(self):
        before = 'from .other import helper\n\n__all__ = ["helper"]\n'
        after = ("from .loss_utils import (\n    compute_mtp_ce_loss,\n    compute_mtp_ce_loss_unweighted,\n)\n"
                 'from .other import helper\n\n__all__ = [\n    "helper",\n    "compute_mtp_ce_loss",\n'
                 '    "compute_mtp_ce_loss_unweighted",\n]\n')
        self.assertCodemod(before, after, line_length=60)


def test_rho1_modes():
    source = (FIXTURES / "rho1_selective.in.py").read_text()
    assert migrated(source, rho1="skip") == source
    assert "compute_mtp_ce_loss(" in migrated(source, rho1="rewrite")
    assert "del logits_k" in migrated(source, rho1="del")


def test_utility_module_option():
    output = migrated((FIXTURES / "existing_del_lines.in.py").read_text(), utility_module="my_project.losses")
    assert "from my_project.losses import compute_mtp_ce_loss\n" in output


SHIPPED = (ROOT / "weighted_mtp" / "utils" / "loss_utils.py").read_bytes()


def _package(tmp_path, init: str = 'from weighted_mtp.utils.misc import helper\n\n__all__ = ["helper"]\n'):
    package = tmp_path / "weighted_mtp" / "utils"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text(init)
    (package / "misc.py").write_text("def helper():\n    pass\n")
    (tmp_path / ".git").mkdir()
    return package


def test_vendoring_writes_identical_utility_and_exports(tmp_path):
    package = _package(tmp_path)
    target = utility_target(tmp_path)
    assert target.problem is None
    assert set(target.writes) == {package / "loss_utils.py", package / "__init__.py"}
    assert target.writes[package / "loss_utils.py"][1] == SHIPPED
    init = target.writes[package / "__init__.py"][1].decode()
    # first-party, sorted before .misc, wrapped at 88 (95 characters on one line)
    assert init.startswith("from weighted_mtp.utils.loss_utils import (\n    compute_mtp_ce_loss,\n"
                           "    compute_mtp_ce_loss_unweighted,\n)\nfrom weighted_mtp.utils.misc import helper\n")
    assert '"compute_mtp_ce_loss_unweighted"]' in init
    for path, (_, new) in target.writes.items():
        path.write_bytes(new)
    utility_target.cache_clear()
    assert utility_target(tmp_path).writes == {}
    assert utility_target(ROOT / "fixtures").writes == {}  # our own package is never vendored into


def test_a_different_loss_utils_is_never_overwritten(tmp_path):
    package = _package(tmp_path)
    (package / "loss_utils.py").write_text("def compute_mtp_ce_loss(*a):\n    return 0\n")
    target = utility_target(tmp_path / "weighted_mtp")
    assert target.writes == {} and target.problem.code is Code.FOREIGN_UTILITY
    assert "loss_utils.py" in str(target.problem) and "--utility-module" in str(target.problem)


def test_an_init_that_exports_another_function_is_never_overwritten(tmp_path):
    _package(tmp_path, "from weighted_mtp.utils.legacy import compute_mtp_ce_loss\n")
    target = utility_target(tmp_path)
    assert target.writes == {} and target.problem.code is Code.FOREIGN_UTILITY and "__init__.py" in str(target.problem)


def test_a_new_utility_module_is_written_beside_the_package(tmp_path):
    package = _package(tmp_path)
    (package / "loss_utils.py").write_text("# theirs\n")
    target = utility_target(tmp_path, "weighted_mtp.utils.mtp_loss")
    assert target.problem is None and target.writes == {package / "mtp_loss.py": (b"", SHIPPED)}


def test_a_utility_module_nowhere_in_the_tree_is_refused(tmp_path):
    (tmp_path / ".git").mkdir()
    target = utility_target(tmp_path, "elsewhere.losses")
    assert target.problem.code is Code.UTILITY_UNAVAILABLE


def test_without_a_utility_package_it_goes_beside_a_folder_of_scripts(tmp_path):
    (tmp_path / ".git").mkdir()
    scripts = tmp_path / "pipelines"
    scripts.mkdir()
    target = utility_target(scripts)
    assert (target.module, target.root, target.problem) == ("mtp_loss_utils", scripts, None)
    assert target.writes == {scripts / "mtp_loss_utils.py": (b"", SHIPPED)}
    (scripts / "mtp_loss_utils.py").write_bytes(SHIPPED)
    utility_target.cache_clear()
    assert utility_target(scripts).writes == {} and utility_target(scripts).module == "mtp_loss_utils"


def test_in_a_package_it_is_imported_by_its_dotted_path(tmp_path):
    (tmp_path / ".git").mkdir()
    folder = tmp_path / "trainer" / "pipelines"
    folder.mkdir(parents=True)
    for package in (folder, folder.parent):
        (package / "__init__.py").write_text("")
    target = utility_target(folder)
    assert (target.module, target.root) == ("trainer.pipelines.mtp_loss_utils", tmp_path)
    assert list(target.writes) == [folder / "mtp_loss_utils.py"]


@pytest.mark.parametrize("theirs", ["mtp_loss_utils.py", "mtp_loss_utils/__init__.py"])
def test_a_module_of_that_name_not_ours_is_never_overwritten(tmp_path, theirs):
    (tmp_path / ".git").mkdir()
    (tmp_path / theirs).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / theirs).write_text("def compute_mtp_ce_loss(*a):\n    return 0\n")
    target = utility_target(tmp_path)
    assert target.writes == {} and target.problem.code is Code.FOREIGN_UTILITY and "mtp_loss_utils" in str(target.problem)


def test_the_projects_configuration_chooses_the_module_and_the_option_wins(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.mtp-migrate]\nutility-module = "trainer.losses"\n')
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "__init__.py").write_text("")
    (tmp_path / "pipelines").mkdir()
    assert utility_target(tmp_path / "pipelines").writes == {tmp_path / "trainer" / "losses.py": (b"", SHIPPED)}
    assert utility_target(tmp_path / "pipelines", "trainer.other").module == "trainer.other"
    (tmp_path / "pyproject.toml").write_text('[tool.mtp-migrate]\nutility-module = "not a module"\n')
    utility_target.cache_clear()
    assert utility_target(tmp_path / "pipelines").problem.code is Code.UTILITY_UNAVAILABLE


EXPORT_FIXTURES = ROOT / "fixtures" / "export"


@pytest.mark.parametrize("case", sorted(p.name.removesuffix(".in.py") for p in EXPORT_FIXTURES.glob("*.in.py")))
def test_export_fixture_pairs(case):
    """``fixtures/export/<case>.in.py`` -> ``.out.py``: a package ``__init__.py`` exporting the vendored utility."""
    before = (EXPORT_FIXTURES / f"{case}.in.py").read_text()
    expected = EXPORT_FIXTURES / f"{case}.out.py"
    after = ExportUtilityCommand(_context("weighted_mtp/utils/__init__.py")).transform_module(
        cst.parse_module(before)).code
    if os.environ.get("MTP_UPDATE_FIXTURES"):
        expected.write_text(after)
    assert after == expected.read_text()
    kept = [line for line in before.splitlines() if line.strip().startswith("#") or not line.strip()]
    assert [line for line in after.splitlines() if line.strip().startswith("#") or not line.strip()] == kept


def test_export_keeps_comments_and_blank_lines_of_all(tmp_path):
    before = (
        "from .evaluation import evaluate\nfrom .s3 import upload\n\n__all__ = [\n    # Evaluation utils\n"
        '    "evaluate",\n\n    # S3 utils\n    "upload",  # the only one\n]\n'
    )
    after = ExportUtilityCommand(_context("pkg/__init__.py")).transform_module(cst.parse_module(before)).code
    assert "    # Evaluation utils\n" in after and "    # S3 utils\n" in after and '"upload",  # the only one\n' in after
    assert after.count("# the only one") == 1
    listed = [line.strip().strip('",') for line in after.split("__all__ = [")[1].splitlines() if '"' in line]
    assert listed == sorted(listed)  # a sorted list stays sorted


def test_runs_through_libcst_tool(tmp_path):
    for case in ("rho1_selective", "crlf_bom"):
        (tmp_path / f"{case}.py").write_bytes((FIXTURES / f"{case}.in.py").read_bytes())
    subprocess.run(
        [sys.executable, "-m", "libcst.tool", "codemod", "--no-format", "rewrite_mtp_loop.RewriteMTPLoopCommand",
         str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    for case in ("rho1_selective", "crlf_bom"):
        assert (tmp_path / f"{case}.py").read_bytes() == (FIXTURES / f"{case}.out.py").read_bytes()
