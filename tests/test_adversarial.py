"""The adversarial suite: the real CLI on loops that look equivalent and are not, and on
equivalent spellings, judged by an oracle that shares nothing with the tool's verifier.

- ``fixtures/adversarial/unsound/<case>.py``: each must be refused, or rewritten into
  something still equivalent. ``fixtures/adversarial/naive/<case>.py`` is the plausible
  wrong rewrite a careless tool would write; the oracle must tell it apart, so every
  unsound case is shown to be a real trap.
- ``fixtures/adversarial/equivalent/<case>.py``: each must be migrated, exactly.

Both ``--rho1 del`` (the default) and ``--rho1 rewrite`` runs are checked. A case's tests have its path as
their id: ``pytest -k equivalent/div_method.py`` runs one case (the CLI over that file alone), ``-k unsound``
the traps only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from adversarial_oracle import differences, exercised
from lint_emitted import ruff_emitted

ROOT = Path(__file__).parents[1] / "fixtures" / "adversarial"
UNSOUND = sorted(ROOT.glob("unsound/*.py"))
EQUIVALENT = sorted(ROOT.glob("equivalent/*.py"))
MODES = ("del", "rewrite")
MIGRATED_SHARE = 0.9


def _case_id(path: Path) -> str:
    """``unsound/<case>.py`` or ``equivalent/<case>.py``: ``-k equivalent/x.py`` selects that case alone
    (``-k x`` would also select ``x_more``), ``-k equivalent`` only the equivalent cases' tests."""
    return path.relative_to(ROOT).as_posix()


def _selected(session) -> dict[str, list[Path]]:
    """``{mode: cases}`` the selected tests of this module read from ``migrated``: a case's test its case in its
    mode; a test over the whole suite (no ``case`` parameter) the ``rewrite`` run over every case."""
    wanted = {mode: set() for mode in MODES}
    for item in session.items:
        if item.path != Path(__file__) or "migrated" not in item.fixturenames:
            continue
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if "case" in params:
            wanted[params["mode"]].add(params["case"])
        else:
            wanted["rewrite"].update(UNSOUND + EQUIVALENT)
    return {mode: sorted(cases) for mode, cases in wanted.items() if cases}


@pytest.fixture(scope="module")
def migrated(request, tmp_path_factory) -> dict:
    """``{mode: (folder, {relative path: file report})}`` after one ``apply`` per mode over the cases the session
    selected (one run over many files is fast: the CLI verifies them in parallel)."""
    runs = {}
    for mode, cases in _selected(request.session).items():
        folder = tmp_path_factory.mktemp(f"adversarial_{mode}")
        for case in cases:
            (folder / case.parent.name).mkdir(exist_ok=True)
            shutil.copy2(case, folder / case.parent.name / case.name)
        emit = ["--emit-tests", "emitted"] if mode == "rewrite" else []
        kinds = sorted({case.parent.name for case in cases})
        done = subprocess.run([sys.executable, "-m", "mtp_migrate", "apply", "--include", "*.py", "--rho1", mode, *emit,
                               "--json", *kinds], cwd=folder, capture_output=True, text=True, timeout=1800)
        assert done.returncode in (0, 1), done.stderr
        reports = {report["path"]: report for report in json.loads(done.stdout)["files"]}
        runs[mode] = (folder, reports)
    return runs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", UNSOUND, ids=_case_id)
def test_unsound_case_is_refused_or_rewritten_soundly(migrated, case, mode):
    folder, _ = migrated[mode]
    assert differences(case, folder / "unsound" / case.name) == []


@pytest.mark.parametrize("case", UNSOUND, ids=_case_id)
def test_the_naive_rewrite_of_an_unsound_case_is_caught(case):
    naive = ROOT / "naive" / case.name
    assert naive.is_file(), f"{case.name} needs its naive rewrite in fixtures/adversarial/naive/"
    assert differences(case, naive), "the oracle cannot tell the naive rewrite apart: the case traps nothing"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", EQUIVALENT, ids=_case_id)
def test_equivalent_case_stays_equivalent(migrated, case, mode):
    folder, _ = migrated[mode]
    assert differences(case, folder / "equivalent" / case.name) == []


def _fully_migrated(report: dict | None) -> bool:
    return bool(report) and report["status"] == "changed" and all(
        site["action"] == "rewritten" and site["verified"] for site in report["sites"])


def test_equivalent_spellings_migrate(migrated):
    _, reports = migrated["rewrite"]
    refused = {case.name: reports.get(f"equivalent/{case.name}") for case in EQUIVALENT
               if not _fully_migrated(reports.get(f"equivalent/{case.name}"))}
    share = 1 - len(refused) / len(EQUIVALENT)
    detail = "\n".join(f"{name}: {[(s['line'], s['reason']) for s in (r or {}).get('sites', [])]}"
                       for name, r in refused.items())
    assert share >= MIGRATED_SHARE, f"{share:.0%} migrated; refused:\n{detail}"


def test_the_tests_emitted_for_unseen_loops_pass_and_pass_ruff(migrated):
    """``--emit-tests`` on every spelling the suite has: each frozen loop and its call agree again,
    outside the tool, and the modules pass the rules a user's lint run has (``lint_emitted.RULES``) whatever
    the loop's code."""
    folder, reports = migrated["rewrite"]
    modules = sorted((folder / "emitted").glob("test_*.py"))
    assert len(modules) == sum(any(s["action"] == "rewritten" for s in r["sites"]) for r in reports.values())
    lint = ruff_emitted("emitted", folder)
    assert lint.returncode == 0, lint.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=line", "emitted"],
                         cwd=folder, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:]


@pytest.mark.parametrize("case", UNSOUND + EQUIVALENT, ids=_case_id)
def test_case_is_documented_and_exercised(case):
    source = case.read_text()
    assert source.lstrip().startswith('"""'), "each case says what it tests in its docstring"
    assert exercised(case) >= 5, "the oracle's grid must run the original on several cases"


# What each kind's docstring starts with: the trap it sets, what its rewrite gets wrong, the spelling it is.
DOCSTRINGS = {"unsound": ("Trap:",), "naive": ("Naive rewrite",), "equivalent": ("Spelling:", "Equivalent"),
              "reference": ("Correct rewrite of equivalent/",)}
PAIRS = {"unsound": "naive", "equivalent": "reference"}  # a case and the rewrite that proves what it is


def missing_pieces(root: Path) -> list[str]:
    """What CONTRIBUTING.md's recipe asks of every case under ``root`` and it lacks: a case's pair (a trap's
    naive rewrite, a spelling's reference), a pair without its case, a docstring saying what the file is,
    a TODO left by ``scripts/new_case.py``."""
    missing = []
    for kind, pair in PAIRS.items():
        cases = {path.name for path in (root / kind).glob("*.py")}
        pairs = {path.name for path in (root / pair).glob("*.py")}
        missing += [f"{kind}/{name}: no {pair}/{name}" for name in sorted(cases - pairs)]
        missing += [f"{pair}/{name}: no {kind}/{name} it is the {pair} of" for name in sorted(pairs - cases)]
    for kind, starts in DOCSTRINGS.items():
        for path in sorted((root / kind).glob("*.py")):
            source = path.read_text(encoding="utf-8")
            if not source.lstrip().startswith(tuple(f'"""{start}' for start in starts)):
                missing.append(f"{kind}/{path.name}: its docstring does not start with {' or '.join(starts)}")
            if "TODO" in source:
                missing.append(f"{kind}/{path.name}: a TODO is left")
    return missing


def test_every_case_is_complete():
    missing = missing_pieces(ROOT)
    assert not missing, "incomplete cases (see CONTRIBUTING.md):\n" + "\n".join(missing)


def test_the_scaffold_writes_what_the_completeness_check_reads(tmp_path):
    """``scripts/new_case.py`` writes the four files with only TODOs missing; its spelling's template is
    run by the oracle and its reference agrees with it."""
    done = subprocess.run([sys.executable, str(ROOT.parents[1] / "scripts" / "new_case.py"), "--spelling", "a_spelling",
                           "--trap", "a_trap", "--corpus", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = [f"{kind}/a_spelling.py" for kind in ("equivalent", "reference")] + \
        [f"{kind}/a_trap.py" for kind in ("unsound", "naive")]
    assert sorted(missing_pieces(tmp_path)) == sorted(f"{path}: a TODO is left" for path in written)
    for path in tmp_path.glob("*/*.py"):
        path.write_text(re.sub(r"TODO |.*# TODO.*\n", "", path.read_text()))
    assert missing_pieces(tmp_path) == []
    assert exercised(tmp_path / "equivalent" / "a_spelling.py") >= 5
    assert differences(tmp_path / "equivalent" / "a_spelling.py", tmp_path / "reference" / "a_spelling.py") == []


def test_suite_is_large_enough():
    assert len(UNSOUND) >= 60 and len(EQUIVALENT) >= 40
