"""Hostile inputs for the CLI, side by side for one or more source trees of mtp-migrate.

    python benchmarks/cli_scenarios.py                       # this tree
    python benchmarks/cli_scenarios.py . /path/to/old/tree   # before and after

Each scenario runs `python -m mtp_migrate` (with PYTHONPATH at the tree) in a fresh folder and
prints one table: exit code, seconds and peak RSS, and the first line the run said.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = (ROOT / "fixtures" / "pipelines" / "before" / "run_baseline.py").read_text()
NO_VERIFY = ["check", "--no-verify", "-j1", "."]


def _write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


SCENARIOS = {
    "`SEED = 0x10`, `(512)`": (_write("run_x.py", PIPELINE + "SEED = 0x10\nMAX_LEN = (512)\n"), NO_VERIFY),
    "1000 top-level statements": (_write("run_x.py", PIPELINE + "".join(f"X{i} = {i}\n" for i in range(1000))),
                                  NO_VERIFY),
    "150 nested lists": (_write("run_x.py", PIPELINE + "Y = " + "[" * 150 + "]" * 150 + "\n"), NO_VERIFY),
    "1000-term sum": (_write("run_x.py", PIPELINE + "Z = 1" + " + 1" * 1000 + "\n"), NO_VERIFY),
    "5 MB pipeline file": (_write("run_x.py", PIPELINE + ("# " + "x" * 78 + "\n") * 65000), NO_VERIFY),
    "1500 nested brackets": (_write("run_x.py", PIPELINE + "W = " + "(" * 1500 + "1" + ")" * 1500 + "\n"), NO_VERIFY),
    "--jobs 5000 on 3 files": (lambda d: [(d / f"run_{c}.py").write_text(PIPELINE) for c in "abc"],
                               ["check", "--no-verify", "--jobs", "5000", "."]),
    "empty and whitespace files": (lambda d: [(d / "run_e.py").write_text(""), (d / "run_w.py").write_text(" \n")],
                                   ["check", "--no-verify", "."]),
    "broken symlink": (lambda d: os.symlink(d / "missing.py", d / "run_b.py"), ["check", "--no-verify", "."]),
    "--utility-module 'not a module'": (_write("run_x.py", PIPELINE),
                                        ["check", "--no-verify", "--utility-module", "not a module", "."]),
    "--include '['": (_write("run_x.py", PIPELINE), ["check", "--no-verify", "--include", "[", "."]),
}


def run(tree: Path, arguments: list[str], folder: Path, timeout: float = 300) -> str:
    began = time.perf_counter()
    command = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "mtp_migrate", *arguments, "--color", "never"]
    process = subprocess.Popen(command, cwd=folder, env={**os.environ, "PYTHONPATH": str(tree)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the whole group: a hung run's workers too
        process.communicate()
        return f"hung (killed at {timeout:.0f} s)"
    lines = err.decode(errors="replace").strip().splitlines()
    peak = f"{int(lines[-1]) // 1024} MB" if lines and lines[-1].isdigit() else "?"
    said = next((line for line in (out + err).decode(errors="replace").splitlines()
                 if line.startswith(("error", "note", "skipped", "Traceback"))), "")
    return f"{process.returncode}, {time.perf_counter() - began:.1f} s, {peak}" + (f": {said[:90]}" if said else "")


def main():
    trees = [Path(arg).resolve() for arg in sys.argv[1:]] or [ROOT]
    print("| scenario | " + " | ".join(str(tree) for tree in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for name, (setup, arguments) in SCENARIOS.items():
        cells = []
        for tree in trees:
            with tempfile.TemporaryDirectory() as scratch:
                setup(Path(scratch))
                cells.append(run(tree, arguments, Path(scratch)))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
