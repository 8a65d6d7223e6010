"""mtp-migrate check against LibCST's own codemod runner on a large synthetic tree.

    python benchmarks/bench_codemod.py              # 10,000 files, ~1% with MTP loops
    python benchmarks/bench_codemod.py --files 2000

Both tools run our RewriteMTPLoopCommand over the same files with 2 workers, side by
side: `mtp-migrate check --jobs 2` (prefilter, then parse only candidates) and
`python -m libcst.tool codemod --no-format -j 2` (parses every file). LibCST's runner
writes its changes, so it gets its own copy of the tree.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "fixtures" / "pipelines" / "before").glob("run_*.py"))

ORDINARY = '''"""Module {index}: data loading and evaluation helpers."""

import json
import math
from pathlib import Path

import torch


class Scheduler{index}:
    def __init__(self, base_lr: float = 1e-3, warmup: int = {warmup}):
        self.base_lr = base_lr
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * step / {horizon}))


def load_records(path: Path) -> list[dict]:
    with open(path) as stream:
        return [json.loads(line) for line in stream if line.strip()]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    {extra}
    predictions = logits.argmax(dim=-1)
    mask = labels != -100
    return float((predictions[mask] == labels[mask]).float().mean())
'''


def build_tree(root: Path, files: int, seed: int = 0) -> int:
    """Write ``files`` run_*.py files under nested folders; return how many hold loops."""
    rng = random.Random(seed)
    loops = 0
    for index in range(files):
        folder = root / f"team{index % 10}" / f"project{index % 97}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"run_{index}.py"
        if index % 100 == 0:  # ~1% real pipelines
            shutil.copy(PIPELINES[index // 100 % len(PIPELINES)], path)
            loops += 1
        else:
            # ~0.5% mention cross_entropy outside any loop: they pass the prefilter
            extra = "loss = torch.nn.functional.cross_entropy(logits, labels)" if index % 200 == 1 else "pass"
            path.write_text(ORDINARY.format(index=index, warmup=rng.randint(10, 1000),
                                            horizon=rng.randint(1000, 10**6), extra=extra))
    return loops


def timed(command, cwd) -> tuple[float, int, str]:
    began = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - began, done.returncode, done.stdout + done.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3, help="runs of mtp-migrate check (median)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        loops = build_tree(tree, args.files)
        ours_times = []
        for _ in range(args.reps):
            seconds, code, output = timed([sys.executable, "-m", "codemods", "check", "--jobs", "2", "--quiet",
                                           str(tree)], ROOT)
            if code != 1:
                raise SystemExit(f"mtp-migrate check exited {code}, expected 1:\n{output[-2000:]}")
            ours_times.append(seconds)
        copy = Path(scratch) / "libcst_tree"
        shutil.copytree(tree, copy)
        libcst_seconds, code, output = timed(
            [sys.executable, "-m", "libcst.tool", "codemod", "--no-format", "rewrite_mtp_loop.RewriteMTPLoopCommand",
             "-j", "2", str(copy)], ROOT)
        if code != 0:
            raise SystemExit(f"libcst.tool exited {code}:\n{output[-2000:]}")
        changed = sum((copy / p.relative_to(tree)).read_bytes() != p.read_bytes() for p in tree.rglob("*.py"))

    ours = statistics.median(ours_times)
    rows = [("mtp-migrate check --jobs 2", ours, f"median of {args.reps}"),
            ("python -m libcst.tool codemod -j 2", libcst_seconds, "1 run")]
    lines = [
        f"{args.files} files, {loops} with MTP loops ({changed} changed by LibCST's runner); 2 workers each.",
        "",
        "| runner | seconds | files/s | x LibCST runner | runs |",
        "|---|---:|---:|---:|---|",
    ]
    for name, seconds, runs in rows:
        lines.append(f"| {name} | {seconds:.1f} | {args.files / seconds:,.0f} | {libcst_seconds / seconds:.1f} | {runs} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codemod.md").write_text(text + "\n")
    plot(rows, args.files, args.out / "codemod.png")


def plot(rows, files, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 2.6))
    names = [name for name, _, _ in rows]
    rates = [files / seconds for _, seconds, _ in rows]
    axis.barh(names, rates, color=["tab:green", "tab:gray"])
    for y, rate in enumerate(rates):
        axis.text(rate, y, f" {rate:,.0f}", va="center")
    axis.set_xlabel("files per second (higher is better)")
    axis.set_title(f"Scanning {files:,} files for MTP loops")
    axis.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
