"""Peak memory and time of the MTP loss: the inline loop, compute_mtp_ce_loss, the fused loss and torch's own.

Peak memory is measured with every variant in its own process, so that one variant's allocator
state cannot colour another's; times come from one process per case that runs the variants in
turn, round after round, so that a shared machine whose speed drifts over minutes slows them
alike. All of them run in this one invocation, side by side.

    python benchmarks/bench_loss.py                 # B=4 S=1024 n=4 V=4096 D=512, tables + PNG
    python benchmarks/bench_loss.py --shape 2 512 4 32000 --width 1024   # V/D = 32
    python benchmarks/bench_loss.py --width 0       # B=4 S=256 n=4 V=32000, logits given (no unembedding)
    python benchmarks/bench_loss.py --quick         # a small shape, table only (make demo)
    python benchmarks/bench_loss.py --device cuda   # on a GPU: torch.cuda.max_memory_allocated

With ``--width D`` (the default, V/8) every variant starts from the latents ``[B, S, n, D]``
and a ``[V, D]`` unembedding: the logits variants include ``F.linear``, and training keeps
the gradients of both inputs. "native" is torch's chunked ``F.linear_cross_entropy`` (torch
2.13, ``options=nn.LinearCrossEntropyOptions()``), one call per head, which never builds the
logits either. Training is measured once per output that receives the gradient: the weighted
loss (weights given), the unweighted loss and a weighted sum of the per-head losses (no weights,
as the baseline pipelines call it), with distinct coefficients per head ("per_head") and with one
for every head ("per_head_uniform"). With ``--width 0`` the logits are the input, and only the
weighted loss is trained.

Peak extra memory is measured on top of the inputs and reported in units of L, the bytes
of the logits; it includes the gradients that training keeps. On CPU it is the process's
peak RSS (VmHWM, reset through /proc/self/clear_refs) with glibc's mmap threshold pinned so
freed buffers really leave; the time comes from a second process without that setting.

The largest batch at the target shape is derived: bf16 training of the weighted loss runs
again at 2B, the difference gives the per-sample peak (in L) and the rest is the fixed cost of
the unembedding's gradient (in units of the weight's bytes); both are scaled to S=2048 n=4
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
    "native": "F.linear_cross_entropy per head (torch's chunked op, no logits)",
}
# The output that training differentiates; "per_head" is sum(c_k * per_head_ce_loss[k]) with distinct c_k,
# "per_head_uniform" the same sum with one c for every head (DeepSeek-V3's MTP loss, lambda / n * sum_k L_k).
OUTPUTS = ("weighted", "unweighted", "per_head", "per_head_uniform")
DTYPES = ("fp32", "bf16")
BUDGET_GIB = 80  # the "largest batch" column: one 80 GiB accelerator's worth of logits + loss
TARGET = {"seq": 2048, "heads": 4, "vocab": 32000, "width": 4096}  # the shape the batch is derived for, bf16


def head_coefficients(heads, output="per_head"):
    """The per-head output's weighted sum: coefficients a pipeline learns or schedules, unknown to the loss.

    Distinct ones make the fused loss re-walk every head but one in backward (the unembedding's gradient
    sums over heads); one coefficient for all (0.3 / n: not a power of two, so bf16 latents' rows are
    recomputed, rounded once) re-walks none in fp32."""
    import torch

    return torch.full((heads,), 0.3 / heads) if output == "per_head_uniform" else torch.linspace(0.5, 1.5, heads)


def inline_loop(logits, labels, attention_mask, weights, delete_temporaries):
    """The loop pasted into the pipelines, verbatim but for the optional `del` and the per-head list."""
    import torch.nn.functional as F

    batch_size, seq_len, n_future, vocab_size = logits.shape  # noqa: RUF059 (verbatim pipeline code)
    weighted_ce_loss = 0.0
    unweighted_ce_loss = 0.0
    per_head_ce_loss = []
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
            per_head_ce_loss.append((ce_loss_k * combined_mask.reshape(-1)).sum() / mask_sum)
        if delete_temporaries:
            del logits_k, labels_k, weights_k, mask_k, ce_loss_k, combined_mask, weighted_ce_k
    return weighted_ce_loss / n_future, unweighted_ce_loss / n_future, per_head_ce_loss


def native_heads(hidden, weight, labels, attention_mask, weights, output):
    """One ``F.linear_cross_entropy`` per head: what a user writes instead of the fused loss.

    With a 0/1 mask, a masked position as ``ignore_index`` makes ``reduction="sum"`` over a head,
    divided by the head's count, its unweighted loss; the weighted one is ``reduction="none"``
    times the weights. Sums are taken in fp32, as the losses compared with are fp32.
    Returns ``(weighted_ce_loss, [unweighted_k])``; only the requested output is computed.
    """
    import torch
    import torch.nn.functional as F

    options = torch.nn.LinearCrossEntropyOptions()
    _, seq, heads, width = hidden.shape
    weighted, per_head = 0.0, []
    for k in range(1, heads + 1):
        rows = hidden[:, :seq - k, k - 1].reshape(-1, width)
        target = labels[:, k:]
        mask = attention_mask[:, k:] * (target != -100)
        target = torch.where(mask > 0, target, -100).reshape(-1)
        count = mask.sum().clamp_min(1)
        if output == "weighted":
            ce = F.linear_cross_entropy(rows, weight, target, reduction="none", options=options)
            weighted = weighted + (ce.float() * (weights[:, k:].float() * mask).reshape(-1)).sum() / count
        else:
            per_head.append(F.linear_cross_entropy(rows, weight, target, reduction="sum", options=options).float()
                            / count)
    return weighted / heads, per_head


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


def run_worker(variants, mode, dtype_name, output, shape, width, reps, device_name, threads):
    """The variants in this process, interleaved: a warm-up of each, then `reps` rounds that run each once,
    so a machine whose speed drifts (a shared VM) slows every variant alike. Prints JSON per variant."""
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
    coefficients = head_coefficients(heads, output).to(device)
    # The unweighted and per-head outputs are trained as the baseline pipelines call the loss: no weights.
    given = weights if output == "weighted" or not training else None

    def pick(out):
        if output.startswith("per_head"):
            return (coefficients * out["per_head_ce_loss"]).sum()
        return out[f"{output}_ce_loss"]

    def once(variant, inputs):
        with torch.set_grad_enabled(training):
            if variant == "fused":
                loss = pick(compute_mtp_ce_loss_from_hidden(*inputs, labels, attention_mask, given))
            elif variant == "native":
                weighted, per_head = native_heads(*inputs, labels, attention_mask, weights, output)
                loss = pick({"weighted_ce_loss": weighted, "unweighted_ce_loss": sum(per_head) / heads,
                             "per_head_ce_loss": torch.stack(per_head) if per_head else None})
            else:
                logits = F.linear(*inputs) if width else inputs[0]
                if variant.startswith("loop"):
                    weighted, unweighted, per_head = inline_loop(logits, labels, attention_mask, weights,
                                                                 variant == "loop+del")
                    loss = pick({"weighted_ce_loss": weighted, "unweighted_ce_loss": unweighted,
                                 "per_head_ce_loss": torch.stack(per_head)})
                else:
                    loss = pick(compute_mtp_ce_loss(logits, labels, attention_mask, given,
                                                    overwrite_logits=variant == "ours+overwrite"))
                del logits
            if training:
                loss.backward()
        return float(loss.detach())

    meter = _Meter(device)
    runs = {variant: {"peaks": [], "seconds": [], "cpu_seconds": []} for variant in variants}
    values = {}
    for rep in range(reps + 1):
        for variant in variants:
            if width:  # fresh leaves on the same storage: each run's gradients are its own
                inputs = [template.detach().requires_grad_(training), unembedding.detach().requires_grad_(training)]
            else:  # overwrite_logits destroys its input
                inputs = [template.clone().requires_grad_(training)]
            gc.collect()
            meter.start()
            began, cpu_began = time.perf_counter(), time.process_time()
            values[variant] = once(variant, inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed, cpu_elapsed = time.perf_counter() - began, time.process_time() - cpu_began
            peak = meter.peak()
            del inputs
            if rep:  # the first round warms up allocators and thread pools
                for key, value in (("peaks", peak), ("seconds", elapsed), ("cpu_seconds", cpu_elapsed)):
                    runs[variant][key].append(value)
    logits_bytes = batch * seq * heads * vocab * template.element_size()
    print(json.dumps({variant: {"peak_L": statistics.median(run["peaks"]) / logits_bytes,
                                "seconds": statistics.median(run["seconds"]),
                                "cpu_seconds": statistics.median(run["cpu_seconds"]), "loss": values[variant],
                                "logits_bytes": logits_bytes, "peak_bytes": statistics.median(run["peaks"])}
                      for variant, run in runs.items()}))


def _worker(variants, mode, dtype_name, output, shape, width, reps, device, threads, env):
    root = str(Path(__file__).resolve().parents[1])
    command = [sys.executable, __file__, "--worker", ",".join(variants), mode, dtype_name, output,
               "--shape", *map(str, shape), "--width", str(width), "--reps", str(reps), "--device", device,
               "--threads", str(threads)]
    done = subprocess.run(command, env=dict(os.environ, **env, PYTHONPATH=root), capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise SystemExit(f"{','.join(variants)} {mode} {dtype_name} {output} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(variants, mode, dtype_name, output, shape, width, reps, device, threads, timed=True):
    """Peak memory from one process per variant, times from one process that interleaves them all: the mmap
    threshold that makes freed buffers leave (so peak RSS is honest) also makes every chunk's allocation
    fault its pages in again, which in this VM took 2 to 6 times the compute. Peak memory repeats to the
    page: one run."""
    rows = {variant: _worker([variant], mode, dtype_name, output, shape, width, 1, device, threads,
                             {"MALLOC_MMAP_THRESHOLD_": "65536"})[variant] for variant in variants}
    if timed:
        times = _worker(variants, mode, dtype_name, output, shape, width, reps, device, threads, {})
        for variant, row in rows.items():
            row.update({key: times[variant][key] for key in ("seconds", "cpu_seconds", "loss")})
    return rows


def cases(width):
    """(mode, dtype, output) in table order: the logits-given table trains the weighted loss only."""
    outputs = OUTPUTS if width else OUTPUTS[:1]
    return ([("train", dtype, output) for dtype in DTYPES for output in outputs]
            + [("no_grad", dtype, "weighted") for dtype in DTYPES])


def ratio(row, other, key):
    return "-" if other is None or not other[key] else f"{row[key] / other[key]:.2f}"


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
        "median of runs. `output` is what training differentiates (per_head: a weighted sum of the per-head losses). "
        "CPU is the process's CPU time (one thread), steadier than the wall clock on a shared machine; "
        "the ratios after it are CPU-time ratios.",
        "",
        "| mode | output | dtype | variant | peak extra (L) | x loop | x native | time (ms) | CPU (ms) | x loop "
        "| x ours | x native |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        same = row["same"]
        output = row["output"] if row["mode"] == "train" else "all"
        lines.append(
            f"| {row['mode']} | {output} | {row['dtype']} | {row['variant']} | {row['peak_L']:.2f} "
            f"| {ratio(row, same.get('loop'), 'peak_L')} | {ratio(row, same.get('native'), 'peak_L')} "
            f"| {row['seconds'] * 1e3:.0f} | {row['cpu_seconds'] * 1e3:.0f} "
            f"| {ratio(row, same.get('loop'), 'cpu_seconds')} | {ratio(row, same.get('ours'), 'cpu_seconds')} "
            f"| {ratio(row, same.get('native'), 'cpu_seconds')} |"
        )
    fused = [r for r in rows if r["variant"] == "fused" and r["mode"] == "train"]
    if fused:
        lines += [
            "",
            "The fused loss against the others, training: ratios of peak extra memory and of CPU time "
            "(wall-clock ratio against native too).",
            "",
            "| output | dtype | fused peak (L) | x native | x loop | x ours | fused CPU (ms) | x native | x loop "
            "| x ours | wall x native |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in fused:
            same = row["same"]
            lines.append(
                f"| {row['output']} | {row['dtype']} | {row['peak_L']:.2f} "
                f"| {ratio(row, same.get('native'), 'peak_L')} | {ratio(row, same.get('loop'), 'peak_L')} "
                f"| {ratio(row, same.get('ours'), 'peak_L')} | {row['cpu_seconds'] * 1e3:.0f} "
                f"| {ratio(row, same.get('native'), 'cpu_seconds')} | {ratio(row, same.get('loop'), 'cpu_seconds')} "
                f"| {ratio(row, same.get('ours'), 'cpu_seconds')} | {ratio(row, same.get('native'), 'seconds')} |"
            )
    derived = [r for r in rows if "per_sample_L" in r]
    if derived:
        target = TARGET
        lines += [
            "",
            f"Largest batch in {BUDGET_GIB} GiB at S={target['seq']} n={target['heads']} V={target['vocab']} "
            f"D={target['width']}, bf16 training of the weighted loss, **derived**: the per-sample peak is the measured "
            f"difference between B={batch} and B={2 * batch} (in L of one sample), the rest is fixed (in units of the "
            "unembedding's bytes); the latents themselves count too.",
            "",
            "| variant | per-sample peak (L) | fixed (x weight) | max batch (derived) | x ours |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in derived:
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


def plot(rows, path, title, variants, width):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = cases(width)
    labels = [f"{mode}\n{output if mode == 'train' and width else ''}\n{dtype}".replace("\n\n", "\n")
              for mode, dtype, output in groups]
    derived = [r for r in rows if "per_sample_L" in r]
    fig, axes = plt.subplots(1, 3 if derived else 2, figsize=(22 if derived else 12, 4.8),
                             gridspec_kw={"width_ratios": [3, 3, 1] if derived else [1, 1]})
    bar = 0.8 / len(variants)
    for index, variant in enumerate(variants):
        picked = [next(r for r in rows if (r["mode"], r["dtype"], r["output"], r["variant"]) == (*case, variant))
                  for case in groups]
        positions = [g + (index - (len(variants) - 1) / 2) * bar for g in range(len(groups))]
        axes[0].bar(positions, [r["peak_L"] for r in picked], bar, label=variant)
        axes[1].bar(positions, [r["cpu_seconds" if width else "seconds"] * 1e3 for r in picked], bar, label=variant)
    axes[0].set_ylabel("peak extra memory (x logits size)")
    axes[1].set_ylabel("CPU time per step (ms, median)" if width else "time per step (ms, median)")
    for axis in axes[:2]:
        axis.set_xticks(range(len(groups)), labels, fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend()
    if derived:
        t = TARGET
        axes[2].bar(range(len(derived)), [r["max_batch"] for r in derived], color=[f"C{i}" for i in range(len(derived))])
        axes[2].set_xticks(range(len(derived)), [r["variant"] for r in derived], rotation=30)
        axes[2].set_ylabel(f"largest batch in {BUDGET_GIB} GiB (derived)")
        axes[2].set_title(f"bf16, weighted, S={t['seq']} n={t['heads']}\nV={t['vocab']} D={t['width']}", fontsize=9)
        axes[2].grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("VARIANTS", "MODE", "DTYPE", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", nargs=4, type=int, metavar=("B", "S", "N", "V"), default=None,
                        help="default 4 1024 4 4096, or 4 256 4 32000 with --width 0")
    parser.add_argument("--width", type=int, default=None, help="D of the latents (default V/8); 0: logits given")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="default: loop, ours, ours+overwrite, fused, native (loop+del instead of the last two "
                             "with --width 0)")
    parser.add_argument("--reps", type=int, default=5,
                        help="measured rounds, each running every variant once (after one warm-up round)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker (0: torch's default); 1 keeps a shared machine's load from "
                             "stalling every small op's thread barrier")
    parser.add_argument("--quick", action="store_true", help="small shape, 3 runs, print the tables only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    default_shape = [2, 128, 4, 8000] if args.quick else [4, 256, 4, 32000] if args.width == 0 else [4, 1024, 4, 4096]
    stem_suffix = "" if args.shape in (None, default_shape) else "_" + "_".join(
        f"{name}{value}" for name, value in zip("BSnV", args.shape, strict=True))
    args.shape = args.shape or default_shape
    if args.width is None:
        args.width = args.shape[3] // 8
    if args.worker:
        variant_list, *case = args.worker
        run_worker(variant_list.split(","), *case, args.shape, args.width, args.reps, args.device, args.threads)
        return
    if args.quick:
        args.reps = 3
    variants = args.variants or (["loop", "ours", "ours+overwrite", "fused", "native"] if args.width
                                 else ["loop", "loop+del", "ours", "ours+overwrite"])

    def run(run_variants, mode, dtype_name, output, shape, timed=True):
        measured = measure(run_variants, mode, dtype_name, output, shape, args.width, args.reps, args.device,
                           args.threads, timed)
        for variant, row in measured.items():
            print(f"  {mode:7s} {dtype_name} {output:16s} {variant:15s} B={shape[0]:<3d} peak {row['peak_L']:.2f} L, "
                  f"{row['seconds'] * 1e3:.0f} ms, CPU {row['cpu_seconds'] * 1e3:.0f} ms", file=sys.stderr)
        return [{"mode": mode, "dtype": dtype_name, "output": output, "variant": variant, **row}
                for variant, row in measured.items()]

    rows = [row for case in cases(args.width) for row in run(variants, *case, args.shape)]
    for row in rows:
        row["same"] = same = {r["variant"]: r for r in rows
                              if (r["mode"], r["dtype"], r["output"]) == (row["mode"], row["dtype"], row["output"])}
        # the loop, else ours, else (a --variants subset without either) the first variant measured
        reference = same.get("loop") or same.get("ours") or next(iter(same.values()))
        row["memory_ratio"] = row["peak_L"] / reference["peak_L"]
        row["time_ratio"] = row["seconds"] / reference["seconds"]
        row["max_batch"] = int(BUDGET_GIB * 2**30 / ((1 + row["peak_L"]) * row["logits_bytes"] / args.shape[0]))
        tolerance = 1e-4 if row["dtype"] == "fp32" else 2e-2
        if abs(row["loss"] - reference["loss"]) > tolerance * abs(reference["loss"]):
            raise SystemExit(f"{row['variant']} {row['output']} disagrees: {row['loss']} vs {reference['loss']}")
    if args.width:
        doubled = [args.shape[0] * 2, *args.shape[1:]]
        derived = [r for r in rows if (r["mode"], r["dtype"], r["output"]) == ("train", "bf16", "weighted")]
        for row in derived:
            derive_batch(row, run([row["variant"]], "train", "bf16", "weighted", doubled, timed=False)[0],
                         args.shape, args.width)
        for row in derived:
            ours = next((r for r in derived if r["variant"] == "ours"), derived[0])
            row["batch_ratio"] = row["max_batch"] / ours["max_batch"]

    text = table(rows, args.shape, args.width)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = (f"loss_fused_{args.device}" if args.width else f"loss_{args.device}") + stem_suffix
        (args.out / f"{stem}.md").write_text(text + "\n")
        shape = f"B,S,n,V = {tuple(args.shape)}" + (f", D = {args.width}" if args.width else "")
        plot(rows, args.out / f"{stem}.png", f"MTP loss, {shape} on {args.device}", variants, args.width)
        print(f"\nwrote {args.out / f'{stem}.md'} and {args.out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
