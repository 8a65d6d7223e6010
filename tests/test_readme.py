"""The README's examples are what the tool prints, so they cannot go stale.

A block the README marks ``<!-- README: NAME -->`` is checked here against a real run on
the fixture pipelines. ``MTP_UPDATE_README=1`` rewrites the generated ones (the demo's
hunk and summary, the pre-commit output) from the run: review the diff. The emitted-test
excerpt elides with ``...`` lines: each piece between them must appear, in order.
"""

import os
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from cli_runner import invoke

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PIPELINES = ROOT / "fixtures" / "pipelines"
BLOCK = re.compile(r"<!-- README: (?P<name>[\w-]+) -->\n```\w*\n(?P<body>.*?)```\n", re.S)
PRE_COMMIT_HEADER = ("mtp-migrate check" + "." * 56 + "Failed\n- hook id: mtp-migrate-check\n- exit code: 1\n\n")


def blocks() -> dict[str, str]:
    return {match["name"]: match["body"] for match in BLOCK.finditer(README.read_text(encoding="utf-8"))}


def check_or_update(name: str, actual: str) -> None:
    actual = "".join(line.rstrip() + "\n" for line in actual.splitlines())  # rich pads the table's title
    if os.environ.get("MTP_UPDATE_README"):
        text = README.read_text(encoding="utf-8")
        match = next(m for m in BLOCK.finditer(text) if m["name"] == name)
        README.write_text(text[:match.start("body")] + actual + text[match.end("body"):], encoding="utf-8")
    assert blocks()[name] == actual, f"README block {name!r} is stale (MTP_UPDATE_README=1 rewrites it)"


@pytest.fixture(scope="module")
def demo():
    """``make demo``: ``mtp-migrate diff fixtures/pipelines/before``."""
    result = invoke("diff", "--no-cache", "fixtures/pipelines/before", cwd=ROOT)
    assert result.exit_code == 1, result.output
    return result


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> Path:
    """The fixture pipelines as a repository of scripts (``pipelines/run_*.py``)."""
    repository = tmp_path_factory.mktemp("readme") / "repo"
    shutil.copytree(PIPELINES / "before", repository / "pipelines")
    for name in ("tiny_mtp.py", "pyproject.toml"):
        shutil.copy(PIPELINES / name, repository)
    return repository


def test_the_demo_hunk_is_the_start_of_run_verifiables_first_rewrite(demo):
    patch = demo.stdout.split("--- a/fixtures/pipelines/before/run_verifiable.py\n", 1)[1].split("\n--- a/")[0]
    hunks = re.split(r"^(?=@@ )", patch, flags=re.M)[1:]
    hunk = next(h for h in hunks if re.search(r"^\+.*compute_mtp_ce_loss\(", h, flags=re.M))
    shown = len(blocks()["demo-diff"].splitlines(keepends=True))
    check_or_update("demo-diff", "".join(hunk.splitlines(keepends=True)[:shown]))


def test_the_demo_summary(demo):
    check_or_update("demo-summary", demo.stderr)


def test_what_a_failing_pre_commit_run_prints(scripts):
    result = invoke("check", *sorted(p.relative_to(scripts).as_posix() for p in scripts.glob("pipelines/run_*.py")),
                    cwd=scripts)
    assert result.exit_code == 1
    check_or_update("pre-commit-output", PRE_COMMIT_HEADER + result.stdout)


def test_the_emitted_test_excerpt(scripts):
    assert invoke("apply", "--emit-tests", "tests", ".", cwd=scripts).exit_code == 0
    module = (scripts / "tests" / "test_mtp_migration_run_baseline.py").read_text()
    position = 0
    for piece in re.split(r"^ *\.\.\.\n", blocks()["emitted-test"], flags=re.M):
        found = module.find(piece, position)
        assert found >= 0, f"not in the emitted module (after what came before):\n{piece}"
        position = found + len(piece)


def test_the_pre_commit_config_pins_this_release():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    hook = re.search(r"^- id: (\S+)", (ROOT / ".pre-commit-hooks.yaml").read_text(), flags=re.M)[1]
    config = blocks()["pre-commit-config"]
    assert f"  rev: v{version}\n" in config and f"    - id: {hook}\n" in config
