"""MTP cross-entropy from the heads' latents: the logits ``[B, S, n, V]`` never exist.

``compute_mtp_ce_loss_from_hidden(hidden, weight, labels, ...)`` equals
``compute_mtp_ce_loss(F.linear(hidden, weight, bias), labels, ...)``. One autograd Function
turns the latents into per-token cross-entropy, walking each head over row chunks: it
computes a chunk's logits, upcasts them (fp32, fp64 for fp64) and keeps the log-sum-exp.
A thin wrapper masks, weights, normalises and averages the ``[n, B, S]`` per-token losses
with ordinary tensor ops, so autograd gives the weights and a floating mask their gradients.

Gradients: as in Liger-Kernel, Cut Cross-Entropy and torch's ``F.linear_cross_entropy``, the
forward pass computes ``(softmax - onehot) * coef`` from the chunk it already holds, for every
output whose per-token coefficients ``coef`` are known then, and backward only scales them. The
softmax part meets the matmuls in the input dtype and the one-hot part is added after them,
exactly, except in rows where the target's probability is above 2/5: there it is subtracted first,
and the row is rounded as the logits path rounds it (a confident row's small ``p - 1`` would
otherwise keep the rounding error of ``p``). The bf16 unembedding's gradient is rounded once per
chunk (a CPU bf16 matmul writes bf16) before joining an fp32 sum, where the logits path's one
matmul rounds once: on batches where nearly every target has p >= 2/5, that costs it up to
1.12x the logits path's squared error (1.14x in fp16; docs/semantics.md).

- without ``weights``, all three outputs: the weighted and the unweighted loss then share their
  coefficients (mask over count) up to one factor, the per-head losses up to a factor ``f_k`` per
  head, and each head's rows of ``hidden`` are its own: they are scaled by ``f_k``. The
  unembedding's and the bias's gradients sum over heads, though: forward keeps their sum ``S``,
  and backward makes it ``base * S + sum_k (f_k - base) * A_k``, where ``base`` is the most
  common factor and head ``k``'s part ``A_k`` is recomputed (its logits and one matmul per chunk)
  only for the heads whose factor is not ``base``. A uniform weighting (``per_head.sum()``,
  DeepSeek-V3's ``lambda / n * sum_k L_k``) re-walks nothing, ``[1, l, l, l]`` one head, and n
  distinct factors n - 1 heads. For bf16 latents, rescaling their bf16 gradient would round it
  twice, so a head whose factor is not a power of two (or 0) has its rows recomputed too, with the
  same chunk's logits (a uniform factor of 1, 2, 4, ... costs nothing); fp16 rows for any factor but 1.
- with ``weights``, the weighted loss (the one pipelines train), scaled in backward by one factor for
  every head: bf16 latents' rows are recomputed, as above, when it is not a power of two (a loss times
  0.3 had a larger error than the logits path's when rescaled). A gradient that reaches the
  unweighted or the per-head losses of such a call recomputes every chunk in backward: their
  coefficients differ token by token, and precomputing both would cost every call one more
  unembedding-sized buffer and one more matmul per chunk (3 passes of matmuls would become 4).

Distinct per-head factors have a floor. Forward cannot know ``f``, and ``f -> sum_k f_k A_k`` has
rank n, so backward needs all n parts ``A_k``. Each part is either kept (``V * D`` fp32 numbers:
``D / (n * B * S)`` of L in fp32, twice that in bf16) or recomputed. Recomputing a part costs its
head's logits matmul plus the ``A_k`` matmul, 2 of the 3 matmul passes that head costs in
forward; keeping the softmax instead would cost L / n. Keeping ``m`` parts apart re-walks at
least ``n - m`` heads: time about ``T_forward * (1 + 2 (n - m) / (3 n))``, memory
``(m - 1) * V * D * 4`` more bytes. At B=4 S=1024 n=4 V=4096 D=512 in fp32, one part is 0.031 L.
The loss peaks at 0.19 L and half of native's peak is 0.26 L, so at most two more parts fit
(m = 3, 0.25 L). That still re-walks one head, about 1.17x the forward, and the forward alone
does the three matmul passes native's ``reduction="sum"`` does, in 0.86x to 0.92x its time
(interleaved runs): about 1.0x to 1.08x native, at the edge of the memory target and not under
the time one. So ``<= 1.0x`` native time at ``<= 0.5x`` its memory is out of reach there for
distinct factors. This module keeps one sum (m = 1): memory stays the same for every output,
and distinct factors cost n - 1 heads' re-walk (benchmarks/results/).

A second backward under ``retain_graph`` recomputes too. Measured against torch's own per head
(``benchmarks/bench_loss.py``, README): memory and time in the README's table.

Torch only, like ``loss_utils.py``, whose validation and helpers it reuses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .loss_utils import (
    MTPLoss,
    _aligned_weights,
    _as_read,
    _position_chunks,
    _safe_divide,
    _validate,
)

__all__ = ["compute_mtp_ce_loss_from_hidden"]

# A bf16 chunk holds its logits and their fp32 exponentials (3 bytes for each 1 of L): 1/128 of
# the logits per chunk keeps the loss's own memory near 0.03 L. Every chunk reads the whole
# unembedding and adds to its whole gradient, so fewer than 256 rows starve the matmuls (measured
# on CPU: 32-row chunks took 1.9x the time of 256-row ones); on small batches the floor wins.
_FUSED_CHUNK_FRACTION = 128
_FUSED_MIN_ROWS = 256
# A bf16 product joins the unembedding's fp32 gradient in this many blocks of the vocabulary.
_WEIGHT_BLOCKS = 8


def compute_mtp_ce_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    n_future: int | None = None,
    ignore_index: int = -100,
    weight_alignment: str = "target",
    mask_ignored_labels: bool = True,
    normalize: str = "mask",
    head_average: str = "all",
    chunk_size: int | None = None,
) -> MTPLoss:
    """``compute_mtp_ce_loss(F.linear(hidden, weight, bias), labels, ...)`` without the logits.

    Same options, semantics and return dict as ``compute_mtp_ce_loss`` (see
    ``docs/semantics.md``); ``overwrite_logits`` has no counterpart, as there are no logits.
    Peak extra memory is the gradients of ``hidden``, ``weight`` and ``bias`` (the last two
    summed in fp32: for bf16 the unembedding's costs 3x its bytes at the end of backward),
    plus about 0.03 L for the chunks (L: the bytes the logits would take).

    Args:
        hidden: ``[B, S, n_heads, D]`` per-head latents after the final norm; any strides.
        weight: ``[V, D]`` unembedding shared by the heads, ``hidden``'s dtype and device.
        bias: ``None`` or ``[V]``.
        chunk_size: rows (batch x positions) per chunk; ``None``: 1/128 of the logits, at
            least 256 rows.

    Under FSDP2, call it where the unembedding is unsharded (inside the forward of the
    module that owns it): outside, ``weight`` is a sharded DTensor.
    """
    _validate_unembedding(hidden, weight, bias)
    labels, weights = _as_read(labels, weights)
    batch, seq, n_heads, _ = hidden.shape
    # The logits' shape, device and dtype without their memory: _validate reads nothing else.
    logits_like = hidden.new_empty(()).expand(batch, seq, n_heads, weight.shape[0])
    n_future = _validate(
        logits_like, labels, attention_mask, weights,
        n_future=n_future, ignore_index=ignore_index, weight_alignment=weight_alignment,
        mask_ignored_labels=mask_ignored_labels, normalize=normalize,
        head_average=head_average, overwrite_logits=False, chunk_size=chunk_size,
    )
    compute_dtype = _compute_dtype(hidden)

    # [n, B, S] per-token state; head k uses columns :S-k, as in loss_utils.
    targets = labels.new_zeros((n_future, batch, seq))
    label_ok = torch.zeros((n_future, batch, seq), dtype=torch.bool, device=hidden.device)
    for k in range(1, min(n_future, seq - 1) + 1):
        target = labels[:, k:]
        label_ok[k - 1, :, :seq - k] = target != ignore_index
        targets[k - 1, :, :seq - k] = torch.where(label_ok[k - 1, :, :seq - k], target, 0)

    def per_head(values, select):  # [n, B, S], zero past each head's positions; one cast, one rounded gradient
        values = values.to(compute_dtype)
        return torch.stack([
            F.pad(select(values, k, seq - k), (0, k)) if k < seq else values.new_zeros((batch, seq))
            for k in range(1, n_future + 1)
        ])

    mask = per_head(attention_mask, lambda m, k, length: m[:, k:])
    if mask_ignored_labels:
        mask = mask * label_ok
    heads = (1, 2)
    mask_sum = mask.sum(dim=heads)
    if weights is None:
        weighted_mask = mask
    else:
        weighted_mask = per_head(weights, lambda w, k, length: _aligned_weights(w, k, length, weight_alignment)) * mask
    denominator = mask_sum if normalize == "mask" else weighted_mask.sum(dim=heads)
    if head_average == "all":
        heads_counted = n_future
    else:
        heads_counted = (denominator > 0).sum().to(compute_dtype).clamp_min(1)

    # Gradients are computed in the forward pass for the per-token coefficients known now (the module
    # docstring says which). The outputs that use them see the per-token losses detached and reach
    # the gradients through zeros, `carrier` and `head_carriers`; the weights and the mask get theirs
    # from the ordinary ops below.
    precompute = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (hidden, weight, bias)
    )
    shared = precompute and weights is None  # every output's coefficients are the unweighted loss's, scaled
    coefficients = None
    if precompute:
        with torch.no_grad():
            if shared:
                coefficients = _safe_divide(mask, mask_sum[:, None, None]) / n_future
            else:
                coefficients = _safe_divide(weighted_mask, denominator[:, None, None]) / heads_counted
    ce, carrier, head_carriers = _HiddenCrossEntropy.apply(hidden, weight, bias, targets, label_ok, coefficients,
                                                           chunk_size)
    fixed = ce.detach() if precompute else ce
    weighted = _safe_divide((fixed * weighted_mask).sum(dim=heads), denominator).sum() / heads_counted
    per_head_loss = _safe_divide(((fixed if shared else ce) * mask).sum(dim=heads), mask_sum)
    unweighted = per_head_loss.sum() / n_future
    if shared:  # d(unweighted)/d(ce) is the coefficients, d(weighted)/d(ce) n/heads_counted times them
        weighted = weighted + carrier * (n_future / heads_counted)
        unweighted = unweighted + carrier
        per_head_loss = per_head_loss + head_carriers * n_future
    elif precompute:
        weighted = weighted + carrier
    return {
        "weighted_ce_loss": weighted,
        "unweighted_ce_loss": unweighted,
        "per_head_ce_loss": per_head_loss,
        "heads_with_tokens": (mask_sum > 0).sum(),
        "heads_with_weight": (denominator > 0).sum(),
    }


def _validate_unembedding(hidden, weight, bias) -> None:
    for name, value in (("hidden", hidden), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if hidden.dim() != 4:
        raise ValueError(f"hidden must be [batch, seq, n_future, hidden_size], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be floating point, got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[3]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[3]}] (hidden's last dim), got {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape {tuple(weight.shape[:1])} to match weight, got {tuple(bias.shape)}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is None:
            continue
        if value.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {value.dtype}")
        if value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")


class _HiddenCrossEntropy(torch.autograd.Function):
    """Per-token ``CE(F.linear(hidden, weight, bias), target)`` as ``[n, B, S]``, 0 where not ``label_ok``,
    and two zeros that carry precomputed gradients: gradients ``g`` for ``carrier`` and ``h`` for
    ``head_carriers`` mean ``(g + h[k]) * coefficients[k]`` for head ``k``'s per-token losses.

    Given ``coefficients``, forward computes their gradients and backward scales them
    (``_per_head_backward``): per head for ``hidden`` (each head's rows are its own), by one factor for
    ``weight`` and ``bias``, which sum over heads, so a gradient for ``head_carriers`` that differs between
    heads re-walks some heads. A gradient that reaches the per-token losses, or a second backward,
    recomputes all three.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, label_ok, coefficients, chunk_size):
        ctx.set_materialize_grads(False)
        ce = hidden.new_zeros(targets.shape, dtype=_compute_dtype(hidden))
        ctx.positions = _positions_per_chunk(hidden, chunk_size)
        needs = ctx.needs_input_grad[:3]
        grads = None
        if coefficients is not None and any(needs):
            coefficients = coefficients * label_ok  # ce is a constant 0 at an ignored label
            grads = _zero_grads(hidden, weight, bias, needs)
        _chunk_pass(hidden, weight, bias, targets, ctx.positions, grads, coefficients, ce=ce)
        ce.masked_fill_(~label_ok, 0.0)  # exactly 0, as cross_entropy gives, even for NaN latents
        if any(needs):  # else (no_grad, frozen inputs) keep nothing for a backward
            ctx.save_for_backward(hidden, weight, bias, targets, label_ok, coefficients)
            ctx.precomputed = grads
        return ce, ce.new_zeros(()), ce.new_zeros(targets.shape[0])

    @staticmethod
    def backward(ctx, grad_ce, grad_carrier, grad_heads):
        # create_graph=True runs this with grad enabled; a second differentiation would be silently wrong.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "compute_mtp_ce_loss_from_hidden can be differentiated only once: double backward "
                "(create_graph=True, e.g. a gradient penalty through the loss) is not supported"
            )
        hidden, weight, bias, targets, label_ok, coefficients = ctx.saved_tensors
        grads, ctx.precomputed = ctx.precomputed, None  # the buffers become the gradients: use them once
        factor = None  # each head's factor of the coefficients
        for grad in (grad_carrier, grad_heads):
            if grad is not None and coefficients is not None:
                factor = grad.expand(targets.shape[0]) if factor is None else factor + grad
        needs = ctx.needs_input_grad[:3]
        if grad_ce is None and factor is None:  # no gradient reached any output
            return (None,) * 7
        if grads is not None and grad_ce is None:  # only carriers: scale what forward computed
            if grad_heads is None and hidden.dtype == _compute_dtype(hidden):
                # One factor, rescaled on the device: reading it (per head, the low-precision rules) would
                # cost every backward a host sync.
                for grad in grads:
                    if grad is not None:
                        grad.mul_(grad_carrier)
                return _returned(grads, weight, bias)
            return _returned(_per_head_backward(hidden, weight, bias, targets, ctx.positions, grads, coefficients,
                                                factor), weight, bias)
        # One pass for every output (adding to a precomputed bf16 gradient would round twice).
        grads = None  # freed before the new buffers exist
        pending = grad_ce * label_ok if grad_ce is not None else label_ok.new_zeros(
            label_ok.shape, dtype=_compute_dtype(hidden))
        if factor is not None:
            pending += coefficients * factor[:, None, None]
        grads = _zero_grads(hidden, weight, bias, needs)
        _chunk_pass(hidden, weight, bias, targets, ctx.positions, grads, pending)
        return _returned(grads, weight, bias)


def _per_head_backward(hidden, weight, bias, targets, positions, grads, coefficients, factor):
    """The precomputed gradients for head ``k``'s coefficients times ``factor[k]``, re-walking only the heads
    whose factor differs: the unembedding's and the bias's sums over heads ``S`` become ``base * S`` plus
    ``(factor[k] - base) * A_k`` for each head ``k`` whose factor is not ``base`` (the most common factor),
    ``A_k`` recomputed with forward's coefficients (so with forward's roundings, which then cancel: the head's
    part is rounded as if computed at ``factor[k]``) and scaled; ``hidden``'s rows are scaled per head, except
    a bf16 head whose factor is not a power of two (a second rounding): its rows are recomputed, with the same
    chunk's logits."""
    grad_hidden, grad_weight, grad_bias = grads
    live = max(0, min(targets.shape[0], hidden.shape[2], hidden.shape[1] - 1))  # heads with positions
    factors = factor.tolist()
    base = max(factors[:live], key=factors[:live].count) if live else 0.0  # the first of the most common
    walks = {}  # head -> (recompute hidden's rows, recompute its part of the unembedding's and bias's sums)
    for k in range(1, live + 1):
        value = factors[k - 1]
        rows = grad_hidden is not None and not _rescales_exactly(hidden.dtype, value)
        if grad_hidden is not None and not rows and value != 1:
            grad_hidden[:, :, k - 1].mul_(value)
        sums = value != base and (grad_weight is not None or grad_bias is not None)
        if rows or sums:
            walks[k] = (rows, sums)
    for grad in (grad_weight, grad_bias):
        if grad is not None and base != 1:
            grad.mul_(base)
    if walks:
        hidden_pending = coefficients * factor[:, None, None]
        plan = {k: (hidden_pending if rows else None, factors[k - 1] - base if sums else None)
                for k, (rows, sums) in walks.items()}
        _chunk_pass(hidden, weight, bias, targets, positions, grads, coefficients, heads=plan)
    return grads


def _rescales_exactly(dtype, value) -> bool:
    """Whether a gradient precomputed in ``dtype`` and scaled by ``value`` equals one computed at that scale:
    always in fp32/fp64, for powers of two (and 0) in bf16. fp16's narrow range had its small entries rounded
    to subnormals at the forward's scale, where a loss scaler's 1024 x would have kept them: only 1 and 0."""
    if dtype == torch.bfloat16:
        return math.frexp(value)[0] in (0.0, 0.5, -0.5)
    if dtype == torch.float16:
        return value in (0.0, 1.0)
    return True


def _returned(grads, weight, bias):
    """The gradients in the inputs' dtypes, then a ``None`` for each non-tensor input."""
    grad_hidden, grad_weight, grad_bias = grads
    return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


def _compute_dtype(hidden):
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunk_pass(hidden, weight, bias, targets, positions, grads, coefficients, ce=None, heads=None):
    """Walk every head's chunks: fill ``ce`` when given (forward) and, with ``grads``, add each chunk's
    ``(softmax - onehot) * coefficients`` to them. Both passes compute the softmax with the same ops, so
    a gradient recomputed in backward equals the one computed in forward bit for bit.

    ``heads``: walk only these heads, ``{k: (coefficients for hidden's rows, a factor for the unembedding's and
    the bias's sums at ``coefficients``)}``, either ``None`` (that gradient left as it is for head ``k``)."""
    batch = hidden.shape[0]
    compute_dtype = _compute_dtype(hidden)
    for k, t0, t1 in _chunks(hidden, targets.shape[0], positions):
        if heads is not None and k not in heads:
            continue
        rows = logits = exps = low = None  # the last chunk's buffers go before this one's exist (peak: one chunk)
        rows, logits = _chunk_logits(hidden, weight, bias, k, t0, t1)
        target = targets[k - 1, :, t0:t1].reshape(-1, 1)
        if ce is not None:
            target_logit = logits.gather(-1, target).squeeze(-1)  # before `exps` (maybe `logits`) changes
        exps = logits if logits.dtype == compute_dtype else logits.to(compute_dtype)
        peak = exps.amax(dim=-1, keepdim=True)
        exp_sum = exps.sub_(peak).exp_().sum(dim=-1, keepdim=True)
        if ce is not None:
            ce[k - 1, :, t0:t1] = (exp_sum.log().add_(peak).squeeze(-1) - target_logit).view(batch, t1 - t0)
        if grads is None:
            continue
        # The one-hot part is subtracted exactly after the matmuls, except in rows whose target has p > 2/5:
        # there it comes off first (exps becomes sum * (softmax - onehot)), as a small difference whose terms
        # are rounded to bf16 apart keeps the error of the whole term (confident predictions had 2 to 10 times
        # the logits path's error). Such a row is rounded as the logits path rounds it; another errs by p of
        # its target's term where the logits path errs by 1 - p. Not 1/2: the latents' gradient of a row whose
        # one-hot part comes off after is rounded twice (the product, then the sum), no better from about 0.4.
        folded = exps.gather(-1, target).mul_(5) > exp_sum * 2
        exps.scatter_add_(-1, target, torch.where(folded, -exp_sum, 0))
        low = exps if logits.dtype == compute_dtype else logits  # the input dtype's copy, made per part
        if heads is None:
            parts = [(grads, coefficients, 1.0)]
        else:  # hidden's rows at their own coefficients; the sums at forward's, scaled
            rows_coefficients, sums_scale = heads[k]
            parts = [((grads[0], None, None), rows_coefficients, 1.0), ((None, *grads[1:]), coefficients, sums_scale)]
            parts = [part for part in parts if part[1] is not None and part[2] is not None]
        for i, (part, part_coefficients, scale) in enumerate(parts):
            coef = part_coefficients[k - 1, :, t0:t1].reshape(-1, 1)
            spent = exps if low is exps or i == len(parts) - 1 else exps.clone()  # bf16 scales it in place
            _accumulate(part, weight, rows, spent, low, target, folded, coef, coef / exp_sum, scale, k, t0, t1)


def _chunk_logits(hidden, weight, bias, k, t0, t1):
    """Head ``k``'s rows ``[B * (t1 - t0), D]`` at positions ``t0:t1`` and their logits.

    One ``addmm`` on contiguous rows: ``F.linear`` on the strided 3-D view would round the
    product to bf16 before adding the bias, less accurate than the logits path.
    """
    rows = hidden[:, t0:t1, k - 1, :].reshape(-1, hidden.shape[-1])
    return rows, rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)


def _zero_grads(hidden, weight, bias, needs):
    """Gradient buffers of ``hidden``, ``weight`` and ``bias`` (``None`` where not needed).

    The unembedding's and the bias's sum over every chunk, so they accumulate in the compute
    dtype and are rounded once at the end.
    """
    return (
        torch.zeros_like(hidden) if needs[0] else None,
        torch.zeros_like(weight, dtype=_compute_dtype(hidden)) if needs[1] else None,
        torch.zeros_like(bias, dtype=_compute_dtype(hidden)) if needs[2] else None,
    )


def _accumulate(grads, weight, rows, exps, low, target, folded, coef, exp_coef, scale, k, t0, t1):
    """Add one chunk's ``(softmax - onehot) * coef`` to ``grads`` (times ``scale`` for the unembedding's and the
    bias's), as ``exps * exp_coef - onehot * coef``: ``exps`` (compute dtype) is ``exp(logits - max)``, never
    normalised, less the one-hot part times the row's sum in the ``folded`` rows, where it came off already,
    and ``exp_coef`` is the row's coefficient over that sum.

    ``exps`` meets the unembedding and the latents in matmuls of their dtype. In fp32/fp64 ``low`` is
    ``exps`` itself and the coefficients go on the narrow ``[rows, D]`` side. In bf16/fp16, ``low`` is the
    chunk's logits buffer (the fast kernels, on CPU several times fp32's speed), and the two kinds of row are
    rounded differently: a folded row's coefficient goes into ``exps`` before its rounding (``exps`` is
    scaled in place), so the row is rounded as the logits path rounds it and its latents stay exact; another
    row keeps ``exps`` as it is (its largest entry, 1, exact) with the coefficient on the latents' side, and
    the one-hot part exact. A power of two ``top``, exact to undo, keeps either in fp16's range. The sums
    over chunks are kept in the compute dtype and each gradient is rounded to the input dtype once.
    """
    grad_hidden, grad_weight, grad_bias = grads
    index = target.squeeze(-1)
    coef = coef.masked_fill(folded, 0)  # the one-hot part still to come off
    if grad_bias is not None:
        grad_bias.addmv_(exps.T, exp_coef.squeeze(-1), alpha=scale).index_add_(0, index, coef.squeeze(-1),
                                                                               alpha=-scale)
    if low is exps:
        rows_factor = rows_scale = exp_coef  # each row's factor on the latents' side, and for hidden's product
    else:  # |exps| < 1.5 (a folded row's sum is below 2.5 times its target's term) and |exp_coef| < top
        top = torch.ldexp(exp_coef.new_ones(()), torch.frexp(exp_coef.abs().amax()).exponent)
        scaled = exp_coef / top
        rows_factor = torch.where(folded, 1.0, scaled)
        low.copy_(exps.mul_(torch.where(folded, scaled, 1.0)))  # in place: into bf16 took 9x a cast's time
        rows_scale = rows_factor * top
    if grad_weight is not None:
        if low is exps:
            grad_weight.addmm_(low.T, rows * rows_factor, alpha=scale)
        else:
            latents = (rows * rows_factor).to(low.dtype)
            # A few blocks of the vocabulary: the bf16 product is cast to join the fp32 sum, and a whole
            # [V, D] one would cost two buffers that size (and a fresh allocation per chunk).
            block = -(-low.shape[1] // _WEIGHT_BLOCKS)
            for start in range(0, low.shape[1], block):
                grad_weight[start:start + block].addcmul_(low[:, start:start + block].T @ latents, top * scale)
        grad_weight.index_add_(0, index, rows.to(coef.dtype) * coef, alpha=-scale)
    if grad_hidden is not None:
        chunk_grad = (low @ weight).to(coef.dtype).mul_(rows_scale).sub_(weight[index] * coef)
        grad_hidden[:, t0:t1, k - 1, :] = chunk_grad.view(grad_hidden.shape[0], t1 - t0, -1)


def _positions_per_chunk(hidden, chunk_size) -> int:
    batch, seq, n_heads, _ = hidden.shape
    if chunk_size is None:
        chunk_size = max(batch * seq * n_heads // _FUSED_CHUNK_FRACTION, _FUSED_MIN_ROWS)
    return max(1, chunk_size // max(batch, 1))


def _chunks(hidden, n_future, positions_per_chunk):
    """``(k, t0, t1)`` for every head ``k`` (1-based) with positions and every chunk of them; none for no rows."""
    batch, seq = hidden.shape[:2]
    for k in range(1, min(n_future, seq - 1) + 1 if batch else 1):
        for t0, t1 in _position_chunks(seq - k, positions_per_chunk):
            yield k, t0, t1
