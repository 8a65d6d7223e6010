"""Peak memory and time of the MTP loss: the inline loop against compute_mtp_ce_loss.

Every variant runs in its own process so that one variant's allocator state cannot
colour another's numbers; all of them run in this one invocation, side by side.

    python benchmarks/bench_loss.py                 # B=4 S=256 n=4 V=32000, table + PNG
    python benchmarks/bench_loss.py --quick         # a small shape, table only (make demo)
    python benchmarks/bench_loss.py --device cuda   # on a GPU: torch.cuda.max_memory_allocated

Peak extra memory is measured on top of the inputs and reported in units of L, the bytes
of the logits; it includes the gradient that training keeps (1.0 L for every variant
but overwrite_logits). On CPU it is the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) with glibc's mmap threshold pinned so freed buffers really leave.
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
}
MODES = [("train", "fp32"), ("train", "bf16"), ("no_grad", "fp32"), ("no_grad", "bf16")]
BUDGET_GIB = 80  # the "largest batch" column: one 80 GiB accelerator's worth of logits + loss


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


def run_worker(variant, mode, dtype_name, shape, reps, device_name):
    """One variant in this process: a warm-up, then `reps` measured runs. Prints JSON."""
    import gc

    import torch

    from weighted_mtp.utils import compute_mtp_ce_loss

    torch.manual_seed(0)
    device = torch.device(device_name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    batch, seq, heads, vocab = shape
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[:, :8] = -100  # an ignored prompt prefix
    attention_mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    attention_mask[-1, seq // 2:] = 0
    weights = torch.rand(batch, seq, device=device, dtype=dtype)
    template = torch.randn(batch, seq, heads, vocab, device=device, dtype=dtype)
    training = mode == "train"

    def once(logits):
        with torch.set_grad_enabled(training):
            if variant.startswith("loop"):
                weighted, _ = inline_loop(logits, labels, attention_mask, weights, variant == "loop+del")
            else:
                weighted = compute_mtp_ce_loss(
                    logits, labels, attention_mask, weights, overwrite_logits=variant == "ours+overwrite"
                )["weighted_ce_loss"]
            if training:
                weighted.backward()
        return float(weighted)

    meter = _Meter(device)
    peaks, seconds, value = [], [], None
    for rep in range(reps + 1):
        logits = template.clone().requires_grad_(training)  # overwrite_logits destroys its input
        gc.collect()
        meter.start()
        began = time.perf_counter()
        value = once(logits)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - began
        peak = meter.peak()
        del logits
        if rep:  # the first run warms up allocators and thread pools
            peaks.append(peak)
            seconds.append(elapsed)
    logits_bytes = template.numel() * template.element_size()
    print(json.dumps({"peak_L": statistics.median(peaks) / logits_bytes, "seconds": statistics.median(seconds),
                      "loss": value, "logits_bytes": logits_bytes}))


def measure(variant, mode, dtype_name, shape, reps, device):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, __file__, "--worker", variant, mode, dtype_name, "--shape", *map(str, shape),
               "--reps", str(reps), "--device", device]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{variant} {mode} {dtype_name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows, shape):
    batch, seq, heads, vocab = shape
    lines = [
        f"B={batch} S={seq} n={heads} V={vocab}; peak extra memory in L (bytes of the logits), median of runs; "
        f"ratios against the inline loop of the same mode; largest batch whose logits + loss fit {BUDGET_GIB} GiB "
        "(derived from the measured peak, which scales with B).",
        "",
        "| mode | dtype | variant | peak extra (L) | x loop | time (ms) | x loop | max batch |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['dtype']} | {row['variant']} | {row['peak_L']:.2f} | {row['memory_ratio']:.2f} "
            f"| {row['seconds'] * 1e3:.0f} | {row['time_ratio']:.2f} | {row['max_batch']} |"
        )
    return "\n".join(lines)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [f"{mode}\n{dtype}" for mode, dtype in MODES]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(VARIANTS)
    for index, variant in enumerate(VARIANTS):
        picked = [next(r for r in rows if (r["mode"], r["dtype"], r["variant"]) == (*m, variant)) for m in MODES]
        positions = [g + (index - (len(VARIANTS) - 1) / 2) * width for g in range(len(MODES))]
        axes[0].bar(positions, [r["peak_L"] for r in picked], width, label=variant)
        axes[1].bar(positions, [r["seconds"] * 1e3 for r in picked], width, label=variant)
    axes[0].set_ylabel("peak extra memory (x logits size)")
    axes[1].set_ylabel("time per step (ms, median)")
    for axis in axes:
        axis.set_xticks(range(len(MODES)), groups)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", nargs=4, type=int, metavar=("B", "S", "N", "V"), default=[4, 256, 4, 32000])
    parser.add_argument("--reps", type=int, default=5, help="measured runs per variant (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shape, 3 runs, print the table only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.worker:
        run_worker(*args.worker, args.shape, args.reps, args.device)
        return
    if args.quick:
        args.shape, args.reps = [2, 128, 4, 8000], 3

    rows = []
    for mode, dtype_name in MODES:
        for variant in VARIANTS:
            print(f"  {mode:7s} {dtype_name} {variant:15s}", end="", file=sys.stderr, flush=True)
            row = measure(variant, mode, dtype_name, args.shape, args.reps, args.device)
            print(f" peak {row['peak_L']:.2f} L, {row['seconds'] * 1e3:.0f} ms", file=sys.stderr)
            rows.append({"mode": mode, "dtype": dtype_name, "variant": variant, **row})
    for row in rows:
        loop = next(r for r in rows if (r["mode"], r["dtype"], r["variant"]) == (row["mode"], row["dtype"], "loop"))
        row["memory_ratio"] = row["peak_L"] / loop["peak_L"]
        row["time_ratio"] = row["seconds"] / loop["seconds"]
        row["max_batch"] = int(BUDGET_GIB * 2**30 / ((1 + row["peak_L"]) * row["logits_bytes"] / args.shape[0]))
        tolerance = 1e-4 if row["dtype"] == "fp32" else 2e-2
        if abs(row["loss"] - loop["loss"]) > tolerance * abs(loop["loss"]):
            raise SystemExit(f"{row['variant']} disagrees with the loop: {row['loss']} vs {loop['loss']}")

    text = table(rows, args.shape)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"loss_{args.device}.md").write_text(text + "\n")
        plot(rows, args.out / f"loss_{args.device}.png", f"MTP loss, B,S,n,V = {tuple(args.shape)} on {args.device}")
        print(f"\nwrote {args.out / f'loss_{args.device}.md'} and {args.out / f'loss_{args.device}.png'}")


if __name__ == "__main__":
    main()
