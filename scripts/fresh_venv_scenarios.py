"""Real installs in fresh virtual environments: mtp-migrate beside a project's own ``weighted_mtp``.

    .venv/bin/python scripts/fresh_venv_scenarios.py [--keep DIR]

The user's project is ``fixtures/repos/src_layout``: a distribution ``weighted-mtp`` with
its own ``weighted_mtp`` package (``models``, ``pipelines``, ``utils``). Every scenario
starts from ``python -m venv`` and installs with pip from the configured index, the way a
user does. To stay fast and offline, no venv downloads torch: a ``.pth`` file points at a
folder of links to the torch of the venv running this script and to torch's requirements
(numpy left out, as in a pre-commit environment). Scenarios:

- the user's package installed editable, then non-editable, then after mtp-migrate; install
  and uninstall mtp-migrate in both orders: the user's package imports and its files stay
  byte for byte, ``pip check`` is clean, and only ``mtp_migrate`` is added;
- mtp-migrate installed editable and non-editable: the shipped utility is found (as
  ``mtp_migrate.loss``) and ``weighted_mtp`` is not importable from the tool;
- migrating the user's repository with the installed tool vendors the utility into it;
  the migrated pipeline and the emitted tests run with mtp-migrate uninstalled, the tests
  with a ``conftest.py`` that imports ``weighted_mtp``, and fail on a seeded bug in the
  vendored copy;
- a repository of scripts (``fixtures/pipelines``): the emitted tests pass in a venv with
  torch and pytest only;
- ``--help``, ``explain`` and a ``check`` with nothing to verify import no torch; no NumPy
  warning anywhere.

Prints each command and check, and each scenario's time; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USER_PROJECT = ROOT / "fixtures" / "repos" / "src_layout"
SCRIPTS = ROOT / "fixtures" / "pipelines"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
FAILURES: list[str] = []
UNTRACKED = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")


def run(command: list, cwd: Path | None = None, expect: int | None = 0) -> str:
    """Run ``command`` (in ``cwd``, else in a folder of no package: never this checkout)."""
    shown = " ".join(str(part) for part in command)
    print(f"  $ {shown}" + (f"    (in {cwd})" if cwd else ""))
    done = subprocess.run([str(part) for part in command], cwd=cwd or tempfile.gettempdir(), capture_output=True,
                          text=True)
    output = done.stdout + done.stderr
    if expect is not None and done.returncode != expect:
        check(False, f"exit {done.returncode}, expected {expect}: {shown}\n{output[-3000:]}")
    return output


def check(condition: bool, what: str) -> None:
    print(f"    {'ok  ' if condition else 'FAIL'} {what}")
    if not condition:
        FAILURES.append(what)


def torch_only(folder: Path) -> Path:
    """Links to torch and the distributions it requires (transitively), numpy and setuptools left out."""
    folder.mkdir(parents=True)
    todo, seen = ["torch"], set()
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen or name in ("numpy", "setuptools"):
            continue
        seen.add(name)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # a requirement for another platform or Python
            continue
        todo += [r for r in distribution.requires or [] if "extra ==" not in r]
        base = Path(distribution.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in distribution.files or []} - {"..", "__pycache__"}:
            if (base / top).exists() and not (folder / top).exists() and not top.endswith(".pth"):
                (folder / top).symlink_to(base / top)
    return folder


class Venv:
    def __init__(self, path: Path, torch: Path):
        run([sys.executable, "-m", "venv", path])
        site = next(path.glob("lib/python*/site-packages"))
        (site / "torch-only.pth").write_text(f"{torch}\n")
        self.path, self.site = path, site

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name

    def pip(self, *args, expect: int | None = 0) -> str:
        return run([self.bin("python"), "-m", "pip", "--disable-pip-version-check", *args], expect=expect)

    def python(self, code: str, cwd: Path | None = None, expect: int | None = 0) -> str:
        return run([self.bin("python"), "-c", code], cwd=cwd, expect=expect)

    def files(self, prefix: str) -> dict[str, str]:
        """``{path: sha256}`` of what lies under site-packages/``prefix``*."""
        return {p.relative_to(self.site).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.site.glob(f"{prefix}*/**/*")) if p.is_file() and "__pycache__" not in p.parts}


WHERE = "import {0}; print({0}.__file__)"


def user_package_intact(venv: Venv, project: Path, files: dict | None) -> None:
    out = venv.python("import weighted_mtp.models.tiny_mtp, weighted_mtp.utils.s3, weighted_mtp.pipelines; "
                      "print(weighted_mtp.__file__)", cwd=venv.path)
    check("weighted_mtp" in out and (str(project) in out if files is None else str(venv.site) in out),
          f"the user's weighted_mtp imports, from {'the project (editable)' if files is None else 'site-packages'}")
    if files is not None:
        check(venv.files("weighted_mtp") == files, "the user's installed files are unchanged, byte for byte")
    problems = [line for line in venv.pip("check", expect=None).splitlines() if re.search(r"weighted|mtp", line, re.I)]
    check(not problems, "pip check: nothing about weighted-mtp or mtp-migrate" + (f" {problems}" if problems else ""))


def tool_works(venv: Venv, editable_root: Path | None = None) -> None:
    out = venv.python("from mtp_migrate.config import SHIPPED_UTILITY; print(SHIPPED_UTILITY)", cwd=venv.path)
    shipped = (editable_root / "weighted_mtp/utils/loss_utils.py") if editable_root else (
        venv.site / "mtp_migrate/loss/loss_utils.py")
    check(str(shipped) in out, f"the shipped utility is found at {shipped}")
    if editable_root is None:
        top = venv.python("import importlib.metadata as m; print(m.distribution('mtp-migrate').read_text("
                          "'top_level.txt'))")
        check(top.split() == ["mtp_migrate"], "the wheel's only top-level name: mtp_migrate")
    check(f"version {VERSION}" in run([venv.bin("mtp-migrate"), "--version"]), f"mtp-migrate --version: {VERSION}")


def scenario_user_first(work: Path, torch: Path, dist: Path, user_wheel: Path, editable: bool) -> None:
    kind = "editable" if editable else "non-editable"
    print(f"\n== the user's weighted_mtp installed {kind}, then mtp-migrate, then mtp-migrate uninstalled")
    project = work / f"user-{kind}"
    shutil.copytree(USER_PROJECT, project)
    venv = Venv(work / f"venv-user-{kind}", torch)
    venv.pip("install", "-q", *(["-e", project] if editable else [user_wheel]))
    files = None if editable else venv.files("weighted_mtp")
    user_package_intact(venv, project, files)
    venv.pip("install", "-q", next(dist.glob("mtp_migrate-*.whl")))
    user_package_intact(venv, project, files)
    tool_works(venv)
    out = venv.python("import weighted_mtp.utils.loss_utils", cwd=venv.path, expect=1)
    check("No module named 'weighted_mtp.utils.loss_utils'" in out, "the tool added nothing to the user's package")
    if editable:
        migrate_and_test(venv, project)
    venv.pip("uninstall", "-y", "-q", "mtp-migrate")
    user_package_intact(venv, project, files)
    check(not list(venv.site.glob("mtp_migrate*")), "uninstalling removed mtp_migrate, and only it")
    if editable:
        after_uninstall(venv, project)


def migrate_and_test(venv: Venv, project: Path) -> None:
    """Migrate the (editable) user project with the installed tool, keeping its equivalence tests."""
    run(["git", "init", "-q"], cwd=project)
    out = run([venv.bin("mtp-migrate"), "apply", "--rho1", "rewrite", "--emit-tests", "tests", "."], cwd=project)
    check("NumPy" not in out, "apply prints no NumPy warning")
    vendored = project / "src/weighted_mtp/utils/loss_utils.py"
    check(vendored.read_bytes() == (ROOT / "weighted_mtp/utils/loss_utils.py").read_bytes(),
          "apply vendored loss_utils.py into the user's own weighted_mtp/utils/")
    out = venv.python("from weighted_mtp.utils import compute_mtp_ce_loss; import sys; "
                      "print(sys.modules[compute_mtp_ce_loss.__module__].__file__)", cwd=venv.path)
    check(str(project) in out, "from weighted_mtp.utils import compute_mtp_ce_loss: the user's vendored copy")
    venv.pip("install", "-q", "pytest")
    (project / "conftest.py").write_text("import weighted_mtp  # noqa: F401  (a conftest of the user's)\n")


def after_uninstall(venv: Venv, project: Path) -> None:
    print("   -- mtp-migrate uninstalled: the migrated code and its tests run without it")
    venv.python("import weighted_mtp.pipelines.run_baseline as p; print(p.compute_mtp_ce_loss_unweighted)",
                cwd=venv.path)
    out = run([venv.bin("python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=project)
    check(" passed" in out and "failed" not in out, "the emitted tests pass (conftest.py imports weighted_mtp)")
    vendored = project / "src/weighted_mtp/utils/loss_utils.py"
    vendored.write_text(vendored.read_text().replace("if mask_ignored_labels:", "if False:"))
    out = run([venv.bin("python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=project, expect=1)
    check(" failed" in out, "a bug seeded into the vendored copy fails them: they check the user's copy")


def scenario_tool_first(work: Path, torch: Path, dist: Path, user_wheel: Path) -> None:
    print("\n== mtp-migrate installed first, then the user's weighted_mtp (non-editable), then either uninstalled")
    for uninstalled in ("mtp-migrate", "weighted-mtp"):
        venv = Venv(work / f"venv-tool-first-{uninstalled}", torch)
        venv.pip("install", "-q", next(dist.glob("mtp_migrate-*.whl")))
        tool = venv.files("mtp_migrate")
        venv.pip("install", "-q", user_wheel)
        files = venv.files("weighted_mtp")
        user_package_intact(venv, USER_PROJECT, files)
        check(venv.files("mtp_migrate") == tool, "the user's install left mtp-migrate's files as they were")
        venv.pip("uninstall", "-y", "-q", uninstalled)
        if uninstalled == "mtp-migrate":
            user_package_intact(venv, USER_PROJECT, files)
        else:
            check(not list(venv.site.glob("weighted_mtp*")), "uninstalling the user's package removed all of it")
            check(venv.files("mtp_migrate") == tool, "and left mtp-migrate's files as they were")
            tool_works(venv)


def scenario_tool_editable(work: Path, torch: Path) -> None:
    print("\n== mtp-migrate installed editable")
    venv = Venv(work / "venv-tool-editable", torch)
    venv.pip("install", "-q", "-e", ROOT)
    tool_works(venv, editable_root=ROOT)
    out = venv.python("import weighted_mtp", cwd=venv.path, expect=1)
    check("No module named 'weighted_mtp'" in out, "import weighted_mtp fails: the checkout's folder is not exposed")
    out = run([venv.bin("mtp-migrate"), "explain", "MTP203"])
    check("**Means:**" in out, "explain prints the documented section")


def scenario_startup_and_scripts(work: Path, torch: Path, dist: Path) -> None:
    print("\n== start-up without torch, no NumPy warning; a repository of scripts, tested with torch and pytest only")
    venv = Venv(work / "venv-startup", torch)
    venv.pip("install", "-q", next(dist.glob("mtp_migrate-*.whl")))
    out = venv.python("import numpy", expect=1)
    check("No module named 'numpy'" in out, "numpy is not installed (torch warns at import then)")
    empty = work / "nothing-to-verify"
    empty.mkdir()
    (empty / "run_plain.py").write_text("import torch.nn.functional as F\n\n\ndef f(x, y):\n    return F.cross_entropy(x, y)\n")
    for args, cwd in ((["--help"], None), (["explain", "MTP203"], None), (["check", "."], empty)):
        out = run([venv.bin("python"), "-X", "importtime", "-m", "mtp_migrate", *args], cwd=cwd)
        imported = {line.split("|")[-1].strip() for line in out.splitlines() if line.startswith("import time:")}
        check("torch" not in imported, f"mtp-migrate {' '.join(args)} imports no torch")
    repository = work / "scripts-repo"
    shutil.copytree(SCRIPTS / "before", repository / "pipelines")
    for name in ("tiny_mtp.py", "pyproject.toml"):
        shutil.copy(SCRIPTS / name, repository)
    out = run([venv.bin("mtp-migrate"), "check", "."], cwd=repository, expect=1)
    check("NumPy" not in out and "pending pipelines/run_baseline.py:" in out,
          "check (verifying every site) names the pending sites and prints no NumPy warning")
    run([venv.bin("mtp-migrate"), "apply", "-q", "--emit-tests", "tests", "."], cwd=repository)
    check((repository / "pipelines/mtp_loss_utils.py").is_file(), "apply vendored pipelines/mtp_loss_utils.py")
    bare = Venv(work / "venv-torch-pytest", torch)
    bare.pip("install", "-q", "pytest")
    out = run([bare.bin("python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=repository)
    check(" passed" in out and "failed" not in out, "the emitted tests pass with torch and pytest only")
    out = run([bare.bin("python"), "pipelines/run_baseline.py", "--help"], cwd=repository)
    check("usage:" in out, "python pipelines/run_baseline.py --help: the script imports its vendored utility")


def timed(scenario, *args, **kwargs) -> None:
    start = time.monotonic()
    scenario(*args, **kwargs)
    print(f"   ({time.monotonic() - start:.0f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="mtp-fresh-venvs-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        torch = torch_only(work / "torch-only")
        dist = work / "dist"
        print("== building the wheels (mtp-migrate, the user's weighted-mtp), from copies: a build leaves build/")
        for source, copy in ((ROOT, work / "mtp-migrate-source"), (USER_PROJECT, work / "user-source")):
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*UNTRACKED))
            run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, copy])
        user_wheel = next(dist.glob("weighted_mtp-*.whl"))
        timed(scenario_user_first, work, torch, dist, user_wheel, editable=True)
        timed(scenario_user_first, work, torch, dist, user_wheel, editable=False)
        timed(scenario_tool_first, work, torch, dist, user_wheel)
        timed(scenario_tool_editable, work, torch)
        timed(scenario_startup_and_scripts, work, torch, dist)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(FAILURES)} check(s) failed" if FAILURES else "\nall checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
