"""Memory-efficient multi-token-prediction (MTP) cross-entropy.

Logits are ``[batch, seq, n_future, vocab]``; head ``k-1`` at position ``t`` predicts
the token at ``t+k``. This module replaces the per-head loop that pipelines inline::

    for k in range(1, n_future + 1):
        ce = F.cross_entropy(logits[:, :S-k, k-1].reshape(-1, V), labels[:, k:].reshape(-1), reduction="none")
        ...  # mask, weight, normalise per head, average over heads

with one ``torch.autograd.Function`` that never copies a head's logits. The forward
walks each head over row chunks of the strided view and keeps only the per-token
log-sum-exp; the backward rebuilds ``(softmax - onehot) * coef`` chunk by chunk
straight into the gradient buffer. Peak extra memory is the gradient itself (1.0x the
logits), or about zero with ``overwrite_logits=True``.

This file depends on torch alone so that ``mtp-migrate`` can vendor it verbatim; that is
also why it is one module of a little over 400 lines rather than several.
"""

from __future__ import annotations

from typing import TypedDict

import torch

__all__ = ["MTPLoss", "compute_mtp_ce_loss", "compute_mtp_ce_loss_unweighted"]

_WEIGHT_ALIGNMENTS = ("target", "previous", "input")
_NORMALIZE = ("mask", "weights")
_HEAD_AVERAGE = ("all", "valid")
# The automatic chunk keeps its one upcast buffer under 16 MiB in fp32 and under 1/32
# of the logits, so the loss costs the gradient plus a few percent of L.
_AUTO_CHUNK_ELEMENTS = 1 << 22
_AUTO_CHUNK_FRACTION = 32


class MTPLoss(TypedDict):
    """What ``compute_mtp_ce_loss`` returns."""

    weighted_ce_loss: torch.Tensor  # 0-d
    unweighted_ce_loss: torch.Tensor  # 0-d
    per_head_ce_loss: torch.Tensor  # [n_future]
    heads_with_tokens: torch.Tensor  # 0-d int64: heads with sum(m) > 0 (a loop's `if mask_sum > 0` fired)
    heads_with_weight: torch.Tensor  # 0-d int64: heads with D_k > 0


def compute_mtp_ce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    n_future: int | None = None,
    ignore_index: int = -100,
    weight_alignment: str = "target",
    mask_ignored_labels: bool = True,
    normalize: str = "mask",
    head_average: str = "all",
    overwrite_logits: bool = False,
    chunk_size: int | None = None,
) -> MTPLoss:
    """Weighted and unweighted MTP cross-entropy, exactly as the per-head loop computes it.

    For head ``k = 1..n`` and positions ``t = 0..S-k-1``:

    - ``ce[t] = CE(logits[:, t, k-1], labels[:, t+k])``, 0 where the label is ``ignore_index``;
    - ``m[t] = attention_mask[:, t+k]``, times ``labels[:, t+k] != ignore_index`` when
      ``mask_ignored_labels``;
    - ``w[t]`` is ``weights[:, t+k]`` (``weight_alignment="target"``), ``weights[:, t+k-1]``
      (``"previous"``) or ``weights[:, t]`` (``"input"``); 3-D weights ``[B, S, n]`` give
      ``weights[:, t, k-1]`` and require ``"input"``; ``[B, S, 1]`` weights are ``[B, S]``
      ones; no weights give 1;
    - ``weighted_k = sum(ce*w*m) / D_k`` with ``D_k = sum(m)`` (``normalize="mask"``) or
      ``sum(w*m)`` (``"weights"``), and 0 when ``D_k == 0``;
    - ``unweighted_k = sum(ce*m) / sum(m)``, 0 when ``sum(m) == 0``.

    ``weighted_ce_loss`` averages ``weighted_k`` over all ``n`` heads (``head_average="all"``)
    or over the heads with ``D_k > 0`` (``"valid"``). ``unweighted_ce_loss`` averages
    ``unweighted_k`` over all heads and ``per_head_ce_loss`` holds them. The losses are
    0-d tensors, fp64 for fp64 logits and fp32 otherwise, and all three outputs are
    differentiable with respect to ``logits`` and, when they require grad, ``weights`` and a
    floating ``attention_mask`` (the loop multiplies by the mask values, so they carry a
    gradient; the ``D_k > 0`` tests are piecewise constant and carry none).

    Args:
        logits: ``[B, S, n_heads, V]`` floating tensor; any strides.
        labels: ``[B, S]`` integer tensor.
        attention_mask: ``[B, S]`` mask of any dtype. Its values are used as they are
            (0/1, bool, soft or segment ids), not binarised.
        weights: ``None``, ``[B, S]`` or ``[B, S, n]`` per-token weights of any real dtype
            (bool, integer or floating); their values are used as they are. ``[B, S, 1]``
            (a reward head's output) is read as ``[B, S]``. With ``"input"`` or ``"previous"``
            alignment, ``S - 1`` positions suffice (the last one is never read).
        n_future: number of heads to use (the first ``n_future``); default all. Above
            ``n_heads`` only when the heads past it have no position (``k >= S``): they count
            as empty heads, as the loop counts them.
        chunk_size: rows (batch x positions) per chunk; ``None`` picks a size that keeps
            the chunk's fp32 buffers near 16 MiB.
        overwrite_logits: **the contents of ``logits`` are undefined after backward.**
            The gradient is written into the logits' own storage, so the loss costs
            almost no memory beyond its inputs. Use it only when nothing else reads the
            logits after the loss (and never with ``retain_graph=True``: a second
            backward raises).

    Raises:
        ValueError / TypeError: wrong ranks or shapes, non-integer labels, complex weights,
            an unknown option value, 3-D weights with an alignment other than ``"input"``,
            or (on CPU) a label outside ``[0, V)`` other than ``ignore_index``. Under
            ``torch.compile`` that last check is an assert op in the graph (``fullgraph=True``
            works) and raises ``RuntimeError`` with the same message.
    """
    labels, weights = _as_read(labels, weights)
    n_future = _validate(
        logits, labels, attention_mask, weights,
        n_future=n_future, ignore_index=ignore_index, weight_alignment=weight_alignment,
        mask_ignored_labels=mask_ignored_labels, normalize=normalize,
        head_average=head_average, overwrite_logits=overwrite_logits, chunk_size=chunk_size,
    )
    weighted, unweighted, per_head, with_tokens, with_weight = _MTPCrossEntropy.apply(
        logits, weights, attention_mask, labels, n_future, ignore_index, weight_alignment,
        mask_ignored_labels, normalize, head_average, overwrite_logits, chunk_size,
    )
    return {
        "weighted_ce_loss": weighted,
        "unweighted_ce_loss": unweighted,
        "per_head_ce_loss": per_head,
        "heads_with_tokens": with_tokens,
        "heads_with_weight": with_weight,
    }


def compute_mtp_ce_loss_unweighted(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    n_future: int | None = None,
    ignore_index: int = -100,
    mask_ignored_labels: bool = True,
    overwrite_logits: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``compute_mtp_ce_loss(...)["unweighted_ce_loss"]`` with no weights; same options."""
    return compute_mtp_ce_loss(
        logits, labels, attention_mask, None,
        n_future=n_future, ignore_index=ignore_index,
        mask_ignored_labels=mask_ignored_labels, overwrite_logits=overwrite_logits,
        chunk_size=chunk_size,
    )["unweighted_ce_loss"]


def _as_read(labels, weights):
    """Labels and weights as the loop reads them: narrow integer labels widened (as cross_entropy
    does: -100 and the vocabulary fit) and ``[B, S, 1]`` weights as ``[B, S]`` (a view: same gradient)."""
    if isinstance(labels, torch.Tensor) and labels.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        labels = labels.long()
    if isinstance(weights, torch.Tensor) and weights.dim() == 3 and weights.shape[2] == 1:
        weights = weights[..., 0]
    return labels, weights


def _validate(logits, labels, attention_mask, weights, *, n_future, ignore_index,
              weight_alignment, mask_ignored_labels, normalize, head_average,
              overwrite_logits, chunk_size) -> int:
    """Check every argument; return the resolved ``n_future``."""
    for name, value in (("logits", logits), ("labels", labels), ("attention_mask", attention_mask)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"logits must be [batch, seq, n_future, vocab], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    batch, seq, n_heads, vocab = logits.shape
    if labels.shape != (batch, seq):
        raise ValueError(f"labels must have shape {(batch, seq)} to match logits, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if attention_mask.shape != (batch, seq):
        raise ValueError(
            f"attention_mask must have shape {(batch, seq)} to match logits, got {tuple(attention_mask.shape)}"
        )
    if n_future is None:
        n_future = n_heads
    if isinstance(n_future, bool) or not isinstance(n_future, int) or n_future < 1 or \
            min(n_future, seq - 1) > n_heads:  # a head with no position (k >= seq) is never read, as in the loop
        raise ValueError(f"n_future must be an int in [1, {n_heads}] (logits.shape[2]), or above only for heads "
                         f"with no position (k >= seq = {seq}), got {n_future!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    _check_choice("weight_alignment", weight_alignment, _WEIGHT_ALIGNMENTS)
    _check_choice("normalize", normalize, _NORMALIZE)
    _check_choice("head_average", head_average, _HEAD_AVERAGE)
    for name, value in (("mask_ignored_labels", mask_ignored_labels), ("overwrite_logits", overwrite_logits)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"weights must be a torch.Tensor or None, got {type(weights).__name__}")
        if weights.is_complex():  # the loop promotes bool and integer weights, so only complex is foreign
            raise TypeError(f"weights must be a real (bool, integer or floating point) tensor, got {weights.dtype}")
        # Input- and previous-aligned weights never read position S-1.
        lengths = (seq, seq - 1) if weight_alignment != "target" else (seq,)
        shown = " or ".join(map(str, lengths))
        if weights.dim() == 2:
            if weights.shape[0] != batch or weights.shape[1] not in lengths:
                raise ValueError(f"2-D weights must have shape ({batch}, {shown}), got {tuple(weights.shape)}")
        elif weights.dim() == 3:
            if weights.shape[0] != batch or weights.shape[1] not in lengths or \
                    weights.shape[2] < min(n_future, n_heads):
                raise ValueError(
                    f"3-D weights must have shape ({batch}, {shown}, >={min(n_future, n_heads)}), got "
                    f"{tuple(weights.shape)}"
                )
            if weight_alignment != "input":
                raise ValueError(
                    f"3-D (per-head) weights require weight_alignment='input', got {weight_alignment!r}"
                )
        else:
            raise ValueError(f"weights must be 2-D [batch, seq] or 3-D [batch, seq, n_future], got {weights.dim()}-D")
    for name, value in (("labels", labels), ("attention_mask", attention_mask), ("weights", weights)):
        if value is not None and value.device != logits.device:
            raise ValueError(f"{name} is on {value.device} but logits are on {logits.device}")
    if labels.device.type == "cpu" and seq > 1:
        # Only positions 1.. are ever targets. On CUDA this check would force a host sync.
        targets = labels[:, 1:]
        bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
        message = f"labels must be in [0, {vocab}) or ignore_index={ignore_index}"
        if torch.compiler.is_compiling():
            # A traced graph cannot branch on data (fullgraph=True would fail): an assert op instead,
            # which raises RuntimeError with the same message when the compiled code runs.
            torch._assert_async(~bad.any(), message)
        elif bool(bad.any()):
            raise ValueError(f"{message}, found {int(targets[bad][0])}")
    return n_future


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _aligned_weights(weights: torch.Tensor, k: int, length: int, alignment: str) -> torch.Tensor:
    """The weights that head ``k`` (1-based) applies to positions ``t = 0..length-1``."""
    if weights.dim() == 3:
        return weights[:, :length, k - 1]
    start = {"target": k, "previous": k - 1, "input": 0}[alignment]
    return weights[:, start:start + length]


def _position_chunks(length: int, positions_per_chunk: int):
    for start in range(0, length, positions_per_chunk):
        yield start, min(start + positions_per_chunk, length)


def _upcast_minus(chunk: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``chunk - shift`` in ``shift``'s dtype with one buffer (CPU promotion would copy twice)."""
    if chunk.dtype == shift.dtype:
        return chunk - shift
    return chunk.to(shift.dtype).sub_(shift)


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` where ``denominator > 0``, else 0 (no host sync)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1), 0)


class _MTPCrossEntropy(torch.autograd.Function):
    """Outputs ``(weighted, unweighted, per_head)``; see ``compute_mtp_ce_loss``.

    Per-token state lives in ``[n, B, S]`` buffers (head ``k`` uses columns ``:S-k``), so
    everything but the logits' own passes is vectorised over heads and costs 1/V of L.
    """

    @staticmethod
    def forward(ctx, logits, weights, attention_mask, labels, n_future, ignore_index,
                weight_alignment, mask_ignored_labels, normalize, head_average,
                overwrite_logits, chunk_size):
        ctx.set_materialize_grads(False)
        batch, seq, _, vocab = logits.shape
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        if chunk_size is None:
            chunk_size = min(_AUTO_CHUNK_ELEMENTS, logits.numel() // _AUTO_CHUNK_FRACTION) // vocab
        positions_per_chunk = max(1, chunk_size // max(batch, 1))

        state = logits.new_zeros((5, n_future, batch, seq), dtype=compute_dtype)
        lse, ce, mask, label_ok, head_weights = state
        targets = torch.zeros((n_future, batch, seq), dtype=torch.long, device=logits.device)
        for k in range(1, n_future + 1):
            length = seq - k
            if length <= 0:
                continue
            target = labels[:, k:]
            ok = target != ignore_index
            targets[k - 1, :, :length] = torch.where(ok, target, 0)
            label_ok[k - 1, :, :length] = ok
            mask[k - 1, :, :length] = attention_mask[:, k:]
            if weights is not None:
                head_weights[k - 1, :, :length] = _aligned_weights(weights.detach(), k, length, weight_alignment)
            for t0, t1 in _position_chunks(length, positions_per_chunk):
                chunk = logits[:, t0:t1, k - 1, :]
                peak = chunk.amax(dim=-1, keepdim=True).to(compute_dtype)
                chunk_lse = _upcast_minus(chunk, peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
                target_logit = chunk.gather(-1, targets[k - 1, :, t0:t1, None]).squeeze(-1)
                lse[k - 1, :, t0:t1] = chunk_lse
                ce[k - 1, :, t0:t1] = chunk_lse - target_logit
        ce.masked_fill_(label_ok == 0, 0.0)  # exactly 0, as cross_entropy gives, even for NaN logits
        if mask_ignored_labels:
            mask.mul_(label_ok)
        if weights is None:
            head_weights.fill_(1.0)

        heads = (1, 2)
        mask_sum = mask.sum(dim=heads)
        weighted_mask = head_weights * mask
        denominator = mask_sum if normalize == "mask" else weighted_mask.sum(dim=heads)
        per_head_weighted = _safe_divide((ce * weighted_mask).sum(dim=heads), denominator)
        per_head = _safe_divide((ce * mask).sum(dim=heads), mask_sum)
        if head_average == "all":
            heads_counted = torch.full((), n_future, dtype=compute_dtype, device=logits.device)
        else:
            heads_counted = (denominator > 0).sum().to(compute_dtype).clamp_min(1)
        weighted = per_head_weighted.sum() / heads_counted
        unweighted = per_head.sum() / n_future
        with_tokens, with_weight = (mask_sum > 0).sum(), (denominator > 0).sum()
        ctx.mark_non_differentiable(with_tokens, with_weight)

        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(logits, weights)
            ctx.state = (lse, ce, mask, label_ok, head_weights, targets, mask_sum, denominator,
                         per_head_weighted, per_head, heads_counted)
            ctx.options = (n_future, weight_alignment, mask_ignored_labels, normalize, overwrite_logits,
                           positions_per_chunk, attention_mask.dtype)
        return weighted, unweighted, per_head, with_tokens, with_weight

    @staticmethod
    def backward(ctx, grad_weighted, grad_unweighted, grad_per_head, _tokens, _weight):
        # create_graph=True runs this with grad enabled. A second differentiation would be silently
        # wrong (a gradient penalty's term dropped, when the engine prunes any guard node), so refuse now.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "compute_mtp_ce_loss can be differentiated only once: double backward "
                "(create_graph=True, e.g. a gradient penalty through the loss) is not supported"
            )
        return *_backward(ctx, grad_weighted, grad_unweighted, grad_per_head), *([None] * 9)


def _backward(ctx, grad_weighted, grad_unweighted, grad_per_head):
    """Gradients of logits, weights and mask; ``None`` for an input that needs none."""
    logits, weights = ctx.saved_tensors
    (lse, ce, mask, label_ok, head_weights, targets, mask_sum, denominator,
     per_head_weighted, per_head, heads_counted) = ctx.state
    (n_future, weight_alignment, mask_ignored_labels, normalize, overwrite_logits,
     positions_per_chunk, mask_dtype) = ctx.options
    compute_dtype = lse.dtype
    seq = logits.shape[1]

    # d(loss)/d(unweighted_k) per head, and d(loss)/d(weighted_k) for every head.
    per_head_grad = torch.zeros(n_future, dtype=compute_dtype, device=lse.device)
    if grad_unweighted is not None:
        per_head_grad += grad_unweighted.to(compute_dtype) / n_future
    if grad_per_head is not None:
        per_head_grad += grad_per_head.to(compute_dtype)
    weighted_scale = None
    if grad_weighted is not None:
        weighted_scale = grad_weighted.to(compute_dtype) / heads_counted

    grad_logits = None
    if ctx.needs_input_grad[0]:
        ce_grad = _safe_divide(mask, mask_sum[:, None, None]) * per_head_grad[:, None, None]
        if weighted_scale is not None:
            ce_grad += _safe_divide(head_weights * mask, denominator[:, None, None]) * weighted_scale
        ce_grad.mul_(label_ok)
        grad_logits = _logits_grad(logits, lse, targets, ce_grad, overwrite_logits, positions_per_chunk)

    grad_weights = None
    if ctx.needs_input_grad[1] and weighted_scale is not None:
        if normalize == "mask":
            token_grad = ce
        else:  # d(sum(c*w*m)/sum(w*m))/dw = m * (c - weighted_k) / D_k
            token_grad = ce - per_head_weighted[:, None, None]
        token_grad = _safe_divide(token_grad * mask, denominator[:, None, None]) * weighted_scale
        grad_weights = torch.zeros_like(weights, dtype=compute_dtype)
        for k in range(1, min(n_future, seq - 1) + 1):
            length = seq - k
            _aligned_weights(grad_weights, k, length, weight_alignment).add_(token_grad[k - 1, :, :length])
        grad_weights = grad_weights.to(weights.dtype)
    elif ctx.needs_input_grad[1]:
        grad_weights = torch.zeros_like(weights)

    grad_mask = None
    if ctx.needs_input_grad[2]:
        # d(sum(c*m)/sum(m))/dm = (c - unweighted_k) / M_k
        token_grad = _safe_divide(ce - per_head[:, None, None], mask_sum[:, None, None])
        token_grad.mul_(per_head_grad[:, None, None])
        if weighted_scale is not None:
            if normalize == "mask":  # d(sum(c*w*m)/sum(m))/dm = (c*w - weighted_k) / M_k
                weighted_grad = ce * head_weights - per_head_weighted[:, None, None]
            else:  # d(sum(c*w*m)/sum(w*m))/dm = w * (c - weighted_k) / D_k
                weighted_grad = (ce - per_head_weighted[:, None, None]).mul_(head_weights)
            token_grad += _safe_divide(weighted_grad, denominator[:, None, None]) * weighted_scale
        if mask_ignored_labels:  # m = attention_mask * label_ok
            token_grad.mul_(label_ok)
        grad_mask = lse.new_zeros(lse.shape[1:])
        for k in range(1, min(n_future, seq - 1) + 1):  # head k's position t is the mask's column t+k
            length = seq - k
            grad_mask[:, k:].add_(token_grad[k - 1, :, :length])
        grad_mask = grad_mask.to(mask_dtype)

    return grad_logits, grad_weights, grad_mask


def _logits_grad(logits, lse, targets, ce_grad, overwrite_logits, positions_per_chunk):
    """``(softmax - onehot) * ce_grad`` per head, chunk by chunk, into one buffer.

    With ``overwrite_logits`` the buffer is the logits' own storage: each chunk is read
    once and then overwritten by its gradient.
    """
    seq, n_heads = logits.shape[1:3]
    n_future = min(lse.shape[0], n_heads)  # heads past the logits' have no position
    compute_dtype = lse.dtype
    grad = logits.detach() if overwrite_logits else torch.empty_like(logits)
    grad[:, :, n_future:, :].zero_()
    for k in range(1, n_future + 1):
        length = max(seq - k, 0)
        grad[:, length:, k - 1, :].zero_()
        for t0, t1 in _position_chunks(length, positions_per_chunk):
            chunk = logits[:, t0:t1, k - 1, :]
            out = grad[:, t0:t1, k - 1, :]
            coef = ce_grad[k - 1, :, t0:t1, None]
            shifted = lse[k - 1, :, t0:t1, None]
            if out.dtype == compute_dtype:  # write in place, no chunk buffer (Dynamo refuses a strided out=)
                buffer = out.copy_(chunk).sub_(shifted)
            else:
                buffer = _upcast_minus(chunk, shifted)
            buffer.exp_().mul_(coef)
            buffer.scatter_add_(-1, targets[k - 1, :, t0:t1, None], -coef)
            if buffer is not out:
                out.copy_(buffer)
    return grad
