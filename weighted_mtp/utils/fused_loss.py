"""MTP cross-entropy from the heads' latents: the logits ``[B, S, n, V]`` never exist.

``compute_mtp_ce_loss_from_hidden(hidden, weight, labels, ...)`` equals
``compute_mtp_ce_loss(F.linear(hidden, weight, bias), labels, ...)``. One autograd Function
turns the latents into per-token cross-entropy, walking each head over row chunks: it
computes a chunk's logits, upcasts them (fp32, fp64 for fp64) and keeps the log-sum-exp.
A thin wrapper masks, weights, normalises and averages the ``[n, B, S]`` per-token losses
with ordinary tensor ops, so autograd gives the weights and a floating mask their gradients.

Gradients: the weighted loss's per-token coefficients are known before the chunk pass, so,
as in Liger-Kernel and Cut Cross-Entropy, the forward pass computes ``(softmax - onehot) *
coef`` from the chunk it already holds and accumulates the gradients of the latents, the
unembedding and its bias; backward only scales them. The other two outputs (and a second
backward under ``retain_graph``) recompute the chunks' logits in backward instead: holding
a precomputed unembedding gradient for each of them would cost ``n + 1`` gradients.
Measured on CPU, one thread, B=4 S=256 n=4 D=512 V=4096, against "linear +
compute_mtp_ce_loss": recomputing everything in backward took 1.31x (fp32) and 1.40x (bf16)
its time, precomputing 1.06x and 1.25x. Memory is the same by construction: the gradients
and one chunk either way.

Torch only, like ``loss_utils.py``, whose validation and helpers it reuses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss_utils import (
    MTPLoss,
    _aligned_weights,
    _as_read,
    _position_chunks,
    _safe_divide,
    _upcast_minus,
    _validate,
)

__all__ = ["compute_mtp_ce_loss_from_hidden"]

# A bf16 chunk holds its logits, their fp32 gradient and its bf16 copy (4 bytes for each 1 of
# L): 1/128 of the logits per chunk keeps the loss's own memory near 0.03 L. Every chunk reads
# the whole unembedding, so fewer than 256 rows starve the matmuls (measured on CPU: 32-row
# chunks took 1.9x the time of 256-row ones); on small batches the floor wins.
_FUSED_CHUNK_FRACTION = 128
_FUSED_MIN_ROWS = 256


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
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32

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

    # The weighted loss's per-token coefficients are known now, so its gradients are computed
    # in the same pass as the loss; it reaches them through `carrier` (a zero), and its own
    # graph sees the per-token losses detached (for the weights' and the mask's gradients).
    precompute = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (hidden, weight, bias)
    )
    coefficients = None
    if precompute:
        with torch.no_grad():
            coefficients = _safe_divide(weighted_mask, denominator[:, None, None]) / heads_counted
    ce, carrier = _HiddenCrossEntropy.apply(hidden, weight, bias, targets, label_ok, coefficients, chunk_size)
    per_head_weighted = _safe_divide(((ce.detach() if precompute else ce) * weighted_mask).sum(dim=heads), denominator)
    per_head_loss = _safe_divide((ce * mask).sum(dim=heads), mask_sum)
    return {
        "weighted_ce_loss": per_head_weighted.sum() / heads_counted + carrier,
        "unweighted_ce_loss": per_head_loss.sum() / n_future,
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
    and a zero whose gradient ``g`` means ``g * coefficients`` for the per-token losses.

    Given ``coefficients``, the forward pass also computes the gradients for them, and the
    backward pass only scales those (the weighted loss, the one that trains). A gradient that
    reaches the per-token losses, or a second backward, recomputes the chunks' logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, label_ok, coefficients, chunk_size):
        ctx.set_materialize_grads(False)
        batch, seq, _, _ = hidden.shape
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lse = hidden.new_zeros((targets.shape[0], batch, seq), dtype=compute_dtype)
        ce = torch.zeros_like(lse)
        ctx.positions = _positions_per_chunk(hidden, chunk_size)
        needs = ctx.needs_input_grad[:3]
        grads = None
        if coefficients is not None and any(needs):
            grads = _zero_grads(hidden, weight, bias, needs, compute_dtype)
        for k, t0, t1 in _chunks(targets.shape[0], seq, ctx.positions):
            rows, logits = _chunk_logits(hidden, weight, bias, k, t0, t1)
            target = targets[k - 1, :, t0:t1].reshape(-1, 1)
            peak = logits.amax(dim=-1, keepdim=True).to(compute_dtype)
            chunk_lse = _upcast_minus(logits, peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
            lse[k - 1, :, t0:t1] = chunk_lse.view(batch, t1 - t0)
            ce[k - 1, :, t0:t1] = (chunk_lse - logits.gather(-1, target).squeeze(-1)).view(batch, t1 - t0)
            if grads is not None:
                coef = (coefficients[k - 1, :, t0:t1] * label_ok[k - 1, :, t0:t1]).reshape(-1, 1)
                _accumulate(grads, weight, rows, logits, chunk_lse[:, None], target, coef, k, t0, t1)
        ce.masked_fill_(~label_ok, 0.0)  # exactly 0, as cross_entropy gives, even for NaN latents
        if any(needs):  # else (no_grad, frozen inputs) keep nothing for a backward
            ctx.save_for_backward(hidden, weight, bias, targets, label_ok, lse, coefficients)
            ctx.precomputed = grads
        return ce, lse.new_zeros(())

    @staticmethod
    def backward(ctx, grad_ce, grad_carrier):
        # create_graph=True runs this with grad enabled; a second differentiation would be silently wrong.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "compute_mtp_ce_loss_from_hidden can be differentiated only once: double backward "
                "(create_graph=True, e.g. a gradient penalty through the loss) is not supported"
            )
        hidden, weight, bias, targets, label_ok, lse, coefficients = ctx.saved_tensors
        grads, ctx.precomputed = ctx.precomputed, None  # the buffers become the gradients: use them once
        if grads is not None and grad_ce is None:  # only the weighted loss: scale what forward computed
            for grad in grads:
                if grad is not None:
                    grad.mul_(0 if grad_carrier is None else grad_carrier)
            pending = None
        else:  # one pass for every output (adding to the precomputed bf16 gradient would round twice)
            grads = None  # freed before the new buffers exist
            grads = _zero_grads(hidden, weight, bias, ctx.needs_input_grad[:3], lse.dtype)
            pending = torch.zeros_like(lse) if grad_ce is None else grad_ce.to(lse.dtype)
            if grad_carrier is not None and coefficients is not None:
                pending += coefficients * grad_carrier
        if pending is not None:
            pending.mul_(label_ok)
            for k, t0, t1 in _chunks(targets.shape[0], hidden.shape[1], ctx.positions):
                rows, logits = _chunk_logits(hidden, weight, bias, k, t0, t1)
                _accumulate(grads, weight, rows, logits, lse[k - 1, :, t0:t1].reshape(-1, 1),
                            targets[k - 1, :, t0:t1].reshape(-1, 1), pending[k - 1, :, t0:t1].reshape(-1, 1),
                            k, t0, t1)
        grad_hidden, grad_weight, grad_bias = grads
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


def _chunk_logits(hidden, weight, bias, k, t0, t1):
    """Head ``k``'s rows ``[B * (t1 - t0), D]`` at positions ``t0:t1`` and their logits.

    One ``addmm`` on contiguous rows: ``F.linear`` on the strided 3-D view would round the
    product to bf16 before adding the bias, less accurate than the logits path.
    """
    rows = hidden[:, t0:t1, k - 1, :].reshape(-1, hidden.shape[-1])
    return rows, rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)


def _zero_grads(hidden, weight, bias, needs, compute_dtype):
    """Gradient buffers of ``hidden``, ``weight`` and ``bias`` (``None`` where not needed).

    The unembedding's and the bias's sum over every chunk, so they accumulate in the compute
    dtype: bf16 sums of 64+ chunks lose to the logits path's single matmul.
    """
    return (
        torch.zeros_like(hidden) if needs[0] else None,
        torch.zeros_like(weight, dtype=compute_dtype) if needs[1] else None,
        torch.zeros_like(bias, dtype=compute_dtype) if needs[2] else None,
    )


def _accumulate(grads, weight, rows, logits, lse, target, coef, k, t0, t1):
    """Add one chunk's ``(softmax - onehot) * coef`` to the gradients; consumes ``logits``."""
    grad_hidden, grad_weight, grad_bias = grads
    grad = logits.sub_(lse) if logits.dtype == lse.dtype else _upcast_minus(logits, lse)
    grad.exp_().mul_(coef).scatter_add_(-1, target, -coef)
    if grad_bias is not None:
        grad_bias += grad.sum(dim=0)
    if grad_weight is not None:
        grad_weight.addmm_(grad.T, rows.to(grad.dtype))
    if grad_hidden is not None:
        batch = grad_hidden.shape[0]
        grad_hidden[:, t0:t1, k - 1, :] += (grad.to(weight.dtype) @ weight).view(batch, t1 - t0, weight.shape[1])


def _positions_per_chunk(hidden, chunk_size) -> int:
    batch, seq, n_heads, _ = hidden.shape
    if chunk_size is None:
        chunk_size = max(batch * seq * n_heads // _FUSED_CHUNK_FRACTION, _FUSED_MIN_ROWS)
    return max(1, chunk_size // max(batch, 1))


def _chunks(n_future, seq, positions_per_chunk):
    """``(k, t0, t1)`` for every head ``k`` (1-based) with positions and every chunk of them."""
    for k in range(1, min(n_future, seq - 1) + 1):
        for t0, t1 in _position_chunks(seq - k, positions_per_chunk):
            yield k, t0, t1
