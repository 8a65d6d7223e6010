"""Peak memory and time of the MTP loss: the inline loop, compute_mtp_ce_loss and the fused loss.

Every variant runs in its own process so that one variant's allocator state cannot
colour another's numbers; all of them run in this one invocation, side by side.

    python benchmarks/bench_loss.py                 # B=8 S=1024 n=4 V=4096 D=512, tables + PNG
    python benchmarks/bench_loss.py --width 0       # B=4 S=256 n=4 V=32000, logits given (no unembedding)
    python benchmarks/bench_loss.py --quick         # a small shape, table only (make demo)
    python benchmarks/bench_loss.py --device cuda   # on a GPU: torch.cuda.max_memory_allocated

With ``--width D`` (the default, V/8) every variant starts from the latents ``[B, S, n, D]``
and a ``[V, D]`` unembedding: the logits variants include ``F.linear``, and training keeps
the gradients of both inputs. With ``--width 0`` the logits are the input.

Peak extra memory is measured on top of the inputs and reported in units of L, the bytes
of the logits; it includes the gradients that training keeps. On CPU it is the process's
peak RSS (VmHWM, reset through /proc/self/clear_refs) with glibc's mmap threshold pinned so
freed buffers really leave; the time comes from a second process without that setting.

The largest batch at the target shape is derived: bf16 training runs again at 2B, the
difference gives the per-sample peak (in L) and the rest is the fixed cost of the
unembedding's gradient (in units of the weight's bytes); both are scaled to S=2048 n=4
V=32000 D=4096.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "loop": "inline per-head loop (as in run_verifiable.py)",
    "loop+del": "the loop with `del` of its temporaries (the original plan)",
    "ours": "compute_mtp_ce_loss",
    "ours+overwrite": "compute_mtp_ce_loss(overwrite_logits=True)",
    "fused": "compute_mtp_ce_loss_from_hidden (latents and unembedding, no logits)",
}
MODES = [("train", "fp32"), ("train", "bf16"), ("no_grad", "fp32"), ("no_grad", "bf16")]
BUDGET_GIB = 80  # the "largest batch" column: one 80 GiB accelerator's worth of logits + loss
TARGET = {"seq": 2048, "heads": 4, "vocab": 32000, "width": 4096}  # the shape the batch is derived for, bf16


def inline_loop(logits, labels, attention_mask, weights, delete_temporaries):
    """The loop pasted into the pipelines, verbatim but for the optional `del`."""
    import torch.nn.functional as F

    batch_size, seq_len, n_future, vocab_size = logits.shape  # noqa: RUF059 (verbatim pipeline code)
    weighted_ce_loss = 0.0
    unweighted_ce_loss = 0.0
    for k in range(1, n_future + 1):
        valid_len = seq_len - k
        if valid_len <= 0:
            continue
        logits_k = logits[:, :valid_len, k - 1, :]
        labels_k = labels[:, k:k + valid_len]
        weights_k = weights[:, k:k + valid_len]
        mask_k = attention_mask[:, k:k + valid_len]
        ce_loss_k = F.cross_entropy(
            logits_k.reshape(-1, vocab_size), labels_k.reshape(-1), reduction="none", ignore_index=-100
        )
        combined_mask = mask_k.to(logits.dtype) * (labels_k != -100).to(logits.dtype)
        weighted_ce_k = ce_loss_k * weights_k.reshape(-1) * combined_mask.reshape(-1)
        mask_sum = combined_mask.sum()
        if mask_sum > 0:
            weighted_ce_loss += weighted_ce_k.sum() / mask_sum
            unweighted_ce_loss += (ce_loss_k * combined_mask.reshape(-1)).sum() / mask_sum
        if delete_temporaries:
            del logits_k, labels_k, weights_k, mask_k, ce_loss_k, combined_mask, weighted_ce_k
    return weighted_ce_loss / n_future, unweighted_ce_loss / n_future


class _Meter:
    """Peak bytes above a baseline: CUDA allocator stats, or the process's peak RSS on CPU."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def _rss(self, field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.baseline = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset VmHWM to the current RSS
            self.baseline = self._rss("VmRSS:")

    def peak(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.baseline
        return self._rss("VmHWM:") - self.baseline


def run_worker(variant, mode, dtype_name, shape, width, reps, device_name, threads):
    """One variant in this process: a warm-up, then `reps` measured runs. Prints JSON."""
    import gc

    import torch
    import torch.nn.functional as F

    from weighted_mtp.utils import compute_mtp_ce_loss, compute_mtp_ce_loss_from_hidden

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    batch, seq, heads, vocab = shape
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[:, :8] = -100  # an ignored prompt prefix
    attention_mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    attention_mask[-1, seq // 2:] = 0
    weights = torch.rand(batch, seq, device=device, dtype=dtype)
    if width:  # unit-variance logits, as with --width 0
        template = torch.randn(batch, seq, heads, width, device=device, dtype=dtype)
        unembedding = (torch.randn(vocab, width, device=device) / width**0.5).to(dtype)
    else:
        template = torch.randn(batch, seq, heads, vocab, device=device, dtype=dtype)
    training = mode == "train"

    def once(inputs):
        with torch.set_grad_enabled(training):
            if variant == "fused":
                weighted = compute_mtp_ce_loss_from_hidden(*inputs, labels, attention_mask, weights)["weighted_ce_loss"]
            else:
                logits = F.linear(*inputs) if width else inputs[0]
                if variant.startswith("loop"):
                    weighted, _ = inline_loop(logits, labels, attention_mask, weights, variant == "loop+del")
                else:
                    weighted = compute_mtp_ce_loss(
                        logits, labels, attention_mask, weights, overwrite_logits=variant == "ours+overwrite"
                    )["weighted_ce_loss"]
                del logits
            if training:
                weighted.backward()
        return float(weighted.detach())

    meter = _Meter(device)
    peaks, seconds, cpu_seconds, value = [], [], [], None
    for rep in range(reps + 1):
        if width:  # fresh leaves on the same storage: each run's gradients are its own
            inputs = [template.detach().requires_grad_(training), unembedding.detach().requires_grad_(training)]
        else:  # overwrite_logits destroys its input
            inputs = [template.clone().requires_grad_(training)]
        gc.collect()
        meter.start()
        began, cpu_began = time.perf_counter(), time.process_time()
        value = once(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed, cpu_elapsed = time.perf_counter() - began, time.process_time() - cpu_began
        peak = meter.peak()
        del inputs
        if rep:  # the first run warms up allocators and thread pools
            peaks.append(peak)
            seconds.append(elapsed)
            cpu_seconds.append(cpu_elapsed)
    logits_bytes = batch * seq * heads * vocab * template.element_size()
    print(json.dumps({"peak_L": statistics.median(peaks) / logits_bytes, "seconds": statistics.median(seconds),
                      "cpu_seconds": statistics.median(cpu_seconds),
                      "loss": value, "logits_bytes": logits_bytes, "peak_bytes": statistics.median(peaks)}))


def measure(variant, mode, dtype_name, shape, width, reps, device, threads, timed=True):
    """Peak memory from one process, time from another: the mmap threshold that makes freed buffers
    leave (so peak RSS is honest) also makes every chunk's allocation fault its pages in again,
    which in this VM took 2 to 6 times the compute. Peak memory repeats to the page: one run."""
    root = str(Path(__file__).resolve().parents[1])
    passes = [(dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=root), 1)]
    if timed:
        passes.append((dict(os.environ, PYTHONPATH=root), reps))
    results = []
    for env, runs in passes:
        command = [sys.executable, __file__, "--worker", variant, mode, dtype_name, "--shape", *map(str, shape),
                   "--width", str(width), "--reps", str(runs), "--device", device, "--threads", str(threads)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{variant} {mode} {dtype_name} failed:\n{done.stderr}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {**results[0], "seconds": results[-1]["seconds"], "cpu_seconds": results[-1]["cpu_seconds"]}


def table(rows, shape, width):
    batch, seq, heads, vocab = shape
    if not width:
        lines = [
            f"B={batch} S={seq} n={heads} V={vocab}, logits given; peak extra memory in L (bytes of the logits), "
            f"median of runs; ratios against the inline loop of the same mode; largest batch whose logits + loss fit "
            f"{BUDGET_GIB} GiB (derived from the measured peak, which scales with B).",
            "",
            "| mode | dtype | variant | peak extra (L) | x loop | time (ms) | x loop | max batch |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['mode']} | {row['dtype']} | {row['variant']} | {row['peak_L']:.2f} "
                f"| {row['memory_ratio']:.2f} | {row['seconds'] * 1e3:.0f} | {row['time_ratio']:.2f} "
                f"| {row['max_batch']} |"
            )
        return "\n".join(lines)
    lines = [
        f"B={batch} S={seq} n={heads} V={vocab} D={width}, every variant from the latents and the unembedding "
        "(F.linear included); peak extra memory in L (bytes of the logits), gradients of both inputs included; "
        "median of runs; ratios against the inline loop, and the time against ours (linear + compute_mtp_ce_loss). "
        "CPU is the process's CPU time (all threads), steadier than the wall clock on a shared machine.",
        "",
        "| mode | dtype | variant | peak extra (L) | x loop | time (ms) | x ours | CPU (ms) | x loop | x ours |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['dtype']} | {row['variant']} | {row['peak_L']:.2f} | {row['memory_ratio']:.2f} "
            f"| {row['seconds'] * 1e3:.0f} | {row['ours_time_ratio']:.2f} | {row['cpu_seconds'] * 1e3:.0f} "
            f"| {row['cpu_seconds'] / row['loop_cpu_seconds']:.2f} | {row['cpu_seconds'] / row['ours_cpu_seconds']:.2f} |"
        )
    target = TARGET
    lines += [
        "",
        f"Largest batch in {BUDGET_GIB} GiB at S={target['seq']} n={target['heads']} V={target['vocab']} "
        f"D={target['width']}, bf16 training, **derived**: the per-sample peak is the measured difference between "
        f"B={batch} and B={2 * batch} (in L of one sample), the rest is fixed (in units of the unembedding's bytes); "
        "the latents themselves count too.",
        "",
        "| variant | per-sample peak (L) | fixed (x weight) | max batch (derived) | x ours |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in (r for r in rows if "per_sample_L" in r):
        lines.append(f"| {row['variant']} | {row['per_sample_L']:.3f} | {row['fixed_W']:.2f} | {row['max_batch']} "
                     f"| {row['batch_ratio']:.1f} |")
    return "\n".join(lines)


def derive_batch(row, twice, shape, width):
    """Per-sample peak and fixed cost from runs at B and 2B, scaled to TARGET (bf16, 2 bytes)."""
    batch, seq, heads, vocab = shape
    per_sample_bytes = (twice["peak_bytes"] - row["peak_bytes"]) / batch
    row["per_sample_L"] = per_sample_bytes / (seq * heads * vocab * 2)
    row["fixed_W"] = (row["peak_bytes"] - per_sample_bytes * batch) / (vocab * width * 2)
    t = TARGET
    sample = row["per_sample_L"] * t["seq"] * t["heads"] * t["vocab"] * 2 + t["seq"] * t["heads"] * t["width"] * 2
    fixed = (1 + max(row["fixed_W"], 0)) * t["vocab"] * t["width"] * 2
    row["max_batch"] = int((BUDGET_GIB * 2**30 - fixed) // sample)


def plot(rows, path, title, variants):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [f"{mode}\n{dtype}" for mode, dtype in MODES]
    derived = [r for r in rows if "per_sample_L" in r]
    fig, axes = plt.subplots(1, 3 if derived else 2, figsize=(17 if derived else 12, 4.5))
    width = 0.8 / len(variants)
    for index, variant in enumerate(variants):
        picked = [next(r for r in rows if (r["mode"], r["dtype"], r["variant"]) == (*m, variant)) for m in MODES]
        positions = [g + (index - (len(variants) - 1) / 2) * width for g in range(len(MODES))]
        axes[0].bar(positions, [r["peak_L"] for r in picked], width, label=variant)
        axes[1].bar(positions, [r["cpu_seconds" if derived else "seconds"] * 1e3 for r in picked], width, label=variant)
    axes[0].set_ylabel("peak extra memory (x logits size)")
    axes[1].set_ylabel("CPU time per step (ms, median)" if derived else "time per step (ms, median)")
    for axis in axes[:2]:
        axis.set_xticks(range(len(MODES)), groups)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend()
    if derived:
        t = TARGET
        axes[2].bar(range(len(derived)), [r["max_batch"] for r in derived], color=[f"C{i}" for i in range(len(derived))])
        axes[2].set_xticks(range(len(derived)), [r["variant"] for r in derived], rotation=20)
        axes[2].set_ylabel(f"largest batch in {BUDGET_GIB} GiB (derived)")
        axes[2].set_title(f"bf16 training, S={t['seq']} n={t['heads']} V={t['vocab']} D={t['width']}", fontsize=10)
        axes[2].grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", nargs=4, type=int, metavar=("B", "S", "N", "V"), default=None,
                        help="default 8 1024 4 4096, or 4 256 4 32000 with --width 0")
    parser.add_argument("--width", type=int, default=None, help="D of the latents (default V/8); 0: logits given")
    parser.add_argument("--reps", type=int, default=5, help="measured runs per variant (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker (0: torch's default); 1 keeps a shared machine's load from "
                             "stalling every small op's thread barrier")
    parser.add_argument("--quick", action="store_true", help="small shape, 3 runs, print the tables only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.shape is None:
        args.shape = [2, 128, 4, 8000] if args.quick else [4, 256, 4, 32000] if args.width == 0 else [8, 1024, 4, 4096]
    if args.width is None:
        args.width = args.shape[3] // 8
    if args.worker:
        run_worker(*args.worker, args.shape, args.width, args.reps, args.device, args.threads)
        return
    if args.quick:
        args.reps = 3
    # The fused table compares the four the issue names; the logits-given one keeps its loop+del.
    variants = [v for v in VARIANTS if v != ("loop+del" if args.width else "fused")]

    def run(variant, mode, dtype_name, shape, timed=True):
        print(f"  {mode:7s} {dtype_name} {variant:15s} B={shape[0]:<3d}", end="", file=sys.stderr, flush=True)
        row = measure(variant, mode, dtype_name, shape, args.width, args.reps, args.device, args.threads, timed)
        print(f" peak {row['peak_L']:.2f} L, {row['seconds'] * 1e3:.0f} ms, CPU {row['cpu_seconds'] * 1e3:.0f} ms",
              file=sys.stderr)
        return {"mode": mode, "dtype": dtype_name, "variant": variant, **row}

    rows = [run(variant, mode, dtype_name, args.shape) for mode, dtype_name in MODES for variant in variants]
    for row in rows:
        same = {r["variant"]: r for r in rows if (r["mode"], r["dtype"]) == (row["mode"], row["dtype"])}
        row["memory_ratio"] = row["peak_L"] / same["loop"]["peak_L"]
        row["time_ratio"] = row["seconds"] / same["loop"]["seconds"]
        row["ours_time_ratio"] = row["seconds"] / same["ours"]["seconds"]
        row["loop_cpu_seconds"], row["ours_cpu_seconds"] = same["loop"]["cpu_seconds"], same["ours"]["cpu_seconds"]
        row["max_batch"] = int(BUDGET_GIB * 2**30 / ((1 + row["peak_L"]) * row["logits_bytes"] / args.shape[0]))
        tolerance = 1e-4 if row["dtype"] == "fp32" else 2e-2
        if abs(row["loss"] - same["loop"]["loss"]) > tolerance * abs(same["loop"]["loss"]):
            raise SystemExit(f"{row['variant']} disagrees with the loop: {row['loss']} vs {same['loop']['loss']}")
    if args.width:
        doubled = [args.shape[0] * 2, *args.shape[1:]]
        derived = [r for r in rows if (r["mode"], r["dtype"]) == ("train", "bf16")]
        for row in derived:
            derive_batch(row, run(row["variant"], "train", "bf16", doubled, timed=False), args.shape, args.width)
        for row in derived:
            row["batch_ratio"] = row["max_batch"] / next(r for r in derived if r["variant"] == "ours")["max_batch"]

    text = table(rows, args.shape, args.width)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"loss_fused_{args.device}" if args.width else f"loss_{args.device}"
        (args.out / f"{stem}.md").write_text(text + "\n")
        shape = f"B,S,n,V = {tuple(args.shape)}" + (f", D = {args.width}" if args.width else "")
        plot(rows, args.out / f"{stem}.png", f"MTP loss, {shape} on {args.device}", variants)
        print(f"\nwrote {args.out / f'{stem}.md'} and {args.out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
