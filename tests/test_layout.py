"""The house rules of the code base, checked: option defaults, refusal docs, import direction, sizes."""

import ast
import inspect
import re
import tomllib
from pathlib import Path

from mtp_migrate.config import OPTION_DEFAULTS
from mtp_migrate.refusals import Code
from weighted_mtp.utils import compute_mtp_ce_loss

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "mtp_migrate"


def test_option_defaults_are_the_utilitys():
    parameters = inspect.signature(compute_mtp_ce_loss).parameters
    assert {name: parameters[name].default for name in OPTION_DEFAULTS} == OPTION_DEFAULTS


def test_every_refusal_code_is_documented_once():
    text = (ROOT / "docs" / "refusals.md").read_text()
    documented = re.findall(r"^## (MTP\d{3})\b", text, flags=re.M)
    assert sorted(documented) == sorted(code.code for code in Code)
    assert len({code.code for code in Code}) == len(Code)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {name for name in names if name.startswith("mtp_migrate")}


# cli -> runner -> (commands, verify) -> mtp_loop -> cst helpers; verify never imports commands.
FORBIDDEN = {
    "mtp_loop": ("mtp_migrate.commands", "mtp_migrate.verify", "mtp_migrate.cli", "mtp_migrate.runner", "mtp_migrate.since",
                 "mtp_migrate.report", "mtp_migrate.cache"),
    "verify": ("mtp_migrate.commands", "mtp_migrate.cli", "mtp_migrate.runner", "mtp_migrate.since", "mtp_migrate.report"),
    "commands": ("mtp_migrate.verify", "mtp_migrate.cli", "mtp_migrate.runner", "mtp_migrate.since", "mtp_migrate.report",
                 "mtp_migrate.cache"),
}


def test_imports_point_one_way():
    for package, forbidden in FORBIDDEN.items():
        for path in (PACKAGE / package).glob("*.py"):
            bad = [name for name in _imports(path) if name.startswith(forbidden)]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_the_verifiers_analysis_owes_nothing_to_the_recognizer():
    """Only the verifier's interface with the plan (which sites were edited, the emitted tests) may read
    ``mtp_loop``: the programs, the policy, the inputs and the judging are built on ``flow`` alone."""
    for path in (PACKAGE / "verify").glob("*.py"):
        if path.name in ("__init__.py", "emit.py"):
            continue
        bad = [name for name in _imports(path) if name.startswith("mtp_migrate.mtp_loop")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_no_path_outside_the_repository_is_cited():
    for path in [*ROOT.glob("mtp_migrate/**/*.py"), *ROOT.glob("weighted_mtp/**/*.py"), ROOT / "README.md",
                 *ROOT.glob("docs/*.md")]:
        assert "shared/DESIGN" not in path.read_text(), path


def test_the_wheel_lists_every_package():
    """pyproject.toml lists the packages (the package-dir mappings rule out discovery): none may be missing."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in PACKAGE.rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | set(setuptools["package-dir"])
