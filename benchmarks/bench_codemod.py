"""mtp-migrate check and apply against LibCST's own codemod runner on a large synthetic tree.

    python benchmarks/bench_codemod.py              # 10,000 files, ~1% with MTP loops
    python benchmarks/bench_codemod.py --files 2000 --reps 1

Side by side in one run, 2 workers each, on the same tree (a git repository):

- `mtp-migrate check`, cold: the cache emptied first, every site verified;
- `mtp-migrate check`, warm: the cache from the cold run;
- `mtp-migrate apply`, cold: a fresh copy of the tree, the cache emptied;
- `python -m libcst.tool codemod --no-format -j 2` with our RewriteMTPLoopCommand
  (parses every file, verifies nothing, writes its changes on its own copy).

Each pipeline copy gets its own variable names, so no two sites share a verification
result: the cold runs verify every site. Then one warm worker's time per site
(verification only, median over the fixture pipelines' sites).
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
    (root / ".git").mkdir(parents=True)  # the project root: the cache lives beside it
    for index in range(files):
        folder = root / f"team{index % 10}" / f"project{index % 97}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"run_{index}.py"
        if index % 100 == 0:  # ~1% real pipelines, each with names of its own
            text = PIPELINES[index // 100 % len(PIPELINES)].read_text()
            path.write_text(text.replace("mask_k", f"mask_{index}_k"))
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


def _median_run(command, cwd, reps: int, expected: int, before=None) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        seconds, code, output = timed(command, cwd)
        if code != expected:
            raise SystemExit(f"{' '.join(map(str, command))} exited {code}, expected {expected}:\n{output[-2000:]}")
        times.append(seconds)
    return statistics.median(times)


def site_verification_ms() -> tuple[float, int]:
    """One warm worker's time per site: the fixture pipelines' sites, verified after a first one (median)."""
    import torch

    from mtp_migrate.runner import SHIPPED_UTILITY, migrate_source
    from mtp_migrate.verify import programs
    from mtp_migrate.verify.worker import verify

    built = []

    def capture(original, written, decisions, utility):
        built.extend(programs(original, written, decisions, str(SHIPPED_UTILITY), utility.module)[0])
        return {decision.line: None for decision in decisions}

    for path in PIPELINES:
        migrate_source(path.read_bytes(), str(path), verifier=capture)
    torch.set_num_threads(1)  # as the CLI's workers run
    verify(built[0])  # warm: torch's first-call costs are paid once per worker
    times = []
    for program in built:
        began = time.perf_counter()
        verify(program)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000, len(built)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=3, help="runs of each mtp-migrate row (median)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        loops = build_tree(tree, args.files)
        cache = tree / ".mtp_migrate_cache"

        def empty_cache():
            shutil.rmtree(cache, ignore_errors=True)

        check = [sys.executable, "-m", "mtp_migrate", "check", "--jobs", "2", "--quiet", str(tree)]
        cold = _median_run(check, ROOT, args.reps, 1, before=empty_cache)
        warm = _median_run(check, ROOT, args.reps, 1)
        copy = Path(scratch) / "apply_tree"

        def fresh_copy():
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(tree, copy, ignore=shutil.ignore_patterns(".mtp_migrate_cache"))

        apply = [sys.executable, "-m", "mtp_migrate", "apply", "--jobs", "2", "--quiet", str(copy)]
        applied = _median_run(apply, ROOT, args.reps, 0, before=fresh_copy)
        sites = sum(text.count("compute_mtp_ce_loss(") + text.count("compute_mtp_ce_loss_unweighted(")
                    for text in (p.read_text() for p in copy.rglob("run_*.py")))
        libcst_copy = Path(scratch) / "libcst_tree"
        shutil.copytree(tree, libcst_copy, ignore=shutil.ignore_patterns(".mtp_migrate_cache"))
        libcst_seconds, code, output = timed(
            [sys.executable, "-m", "libcst.tool", "codemod", "--no-format", "rewrite_mtp_loop.RewriteMTPLoopCommand",
             "-j", "2", str(libcst_copy)], ROOT)
        if code != 0:
            raise SystemExit(f"libcst.tool exited {code}:\n{output[-2000:]}")
    per_site, measured_sites = site_verification_ms()

    runs = f"median of {args.reps}"
    rows = [("mtp-migrate check, cold (verifies)", cold, runs), ("mtp-migrate check, warm (cached)", warm, runs),
            ("mtp-migrate apply, cold (verifies)", applied, runs),
            ("python -m libcst.tool codemod (no verification)", libcst_seconds, "1 run")]
    lines = [
        f"{args.files} files, {loops} with MTP loops, {sites} sites rewritten by apply; 2 workers each.",
        "",
        "| runner | seconds | files/s | x LibCST runner | runs |",
        "|---|---:|---:|---:|---|",
    ]
    for name, seconds, count in rows:
        lines.append(f"| {name} | {seconds:.1f} | {args.files / seconds:,.0f} | {libcst_seconds / seconds:.1f} | {count} |")
    lines += ["", f"A warm worker verifies a site in {per_site:.0f} ms (median over the {measured_sites} sites "
                  "of the fixture pipelines, one thread)."]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codemod.md").write_text(text + "\n")
    plot(rows, args.files, args.out / "codemod.png")


def plot(rows, files, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 3.2))
    names = [name for name, _, _ in rows]
    rates = [files / seconds for _, seconds, _ in rows]
    axis.barh(names, rates, color=["tab:green"] * (len(rows) - 1) + ["tab:gray"])
    for y, rate in enumerate(rates):
        axis.text(rate, y, f" {rate:,.0f}", va="center")
    axis.set_xscale("log")  # a cold run and a cached one differ by two orders of magnitude
    axis.set_xlabel("files per second, log scale (higher is better)")
    axis.set_title(f"Scanning {files:,} files for MTP loops")
    axis.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
