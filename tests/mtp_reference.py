"""The per-head loop as pipelines inline it, generalised over every option of docs/semantics.md.

Deliberately naive: one ``F.cross_entropy`` per head on a reshaped copy, Python
``if`` on the denominators. Tests compare ``compute_mtp_ce_loss`` against it.
"""

import torch
import torch.nn.functional as F


def reference_mtp_ce_loss(logits, labels, attention_mask, weights=None, *, n_future=None, ignore_index=-100,
                          weight_alignment="target", mask_ignored_labels=True, normalize="mask",
                          head_average="all"):
    batch_size, seq_len, n_heads, vocab_size = logits.shape
    n_future = n_future or n_heads
    zero = logits.new_zeros(())
    weighted_ce_loss = zero
    per_head = []
    valid_heads = 0
    heads_with_tokens = 0
    for k in range(1, n_future + 1):
        valid_len = seq_len - k
        if valid_len <= 0:
            per_head.append(zero)
            continue
        logits_k = logits[:, :valid_len, k - 1, :]
        labels_k = labels[:, k:k + valid_len]
        ce_k = F.cross_entropy(
            logits_k.reshape(-1, vocab_size), labels_k.reshape(-1).long(), reduction="none",
            ignore_index=ignore_index,
        ).view(batch_size, valid_len)
        mask_k = attention_mask[:, k:k + valid_len].to(ce_k.dtype)
        if mask_ignored_labels:
            mask_k = mask_k * (labels_k != ignore_index).to(ce_k.dtype)
        if weights is None:
            weights_k = torch.ones_like(mask_k)
        elif weights.dim() == 3:
            weights_k = weights[:, :valid_len, k - 1]
        else:
            start = {"target": k, "previous": k - 1, "input": 0}[weight_alignment]
            weights_k = weights[:, start:start + valid_len]
        mask_sum = mask_k.sum()
        denominator = mask_sum if normalize == "mask" else (weights_k * mask_k).sum()
        if denominator > 0:
            weighted_ce_loss = weighted_ce_loss + (ce_k * weights_k * mask_k).sum() / denominator
            valid_heads += 1
        heads_with_tokens += bool(mask_sum > 0)
        per_head.append((ce_k * mask_k).sum() / mask_sum if mask_sum > 0 else zero)
    heads = n_future if head_average == "all" else max(valid_heads, 1)
    per_head_ce_loss = torch.stack(per_head)
    return {
        "weighted_ce_loss": weighted_ce_loss / heads,
        "unweighted_ce_loss": per_head_ce_loss.sum() / n_future,
        "per_head_ce_loss": per_head_ce_loss,
        "heads_with_tokens": torch.tensor(heads_with_tokens),
        "heads_with_weight": torch.tensor(valid_heads),
    }
