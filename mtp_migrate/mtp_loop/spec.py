"""What a recognised site means, independent of how its source spelled it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, get_args

import libcst as cst

from mtp_migrate.config import Count, HeadAverage, Normalize, WeightAlignment
from mtp_migrate.mtp_loop.dtypes import Promotion
from mtp_migrate.refusals import Code, Refusal

# The keys of the utility's output (``MTPLoss`` in ``loss_utils.py``; a test checks they agree): the
# emitter reads what it writes from these.
LossKey = Literal["weighted_ce_loss", "unweighted_ce_loss", "per_head_ce_loss"]
OutputKey = Literal[LossKey, Count]
WEIGHTED_LOSS, UNWEIGHTED_LOSS, PER_HEAD_LOSS = get_args(LossKey)


class Action(str, Enum):
    REWRITTEN = "rewritten"
    DEL_INSERTED = "del_inserted"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Result:
    """What the loop binds to one output, beyond the call's value.

    ``dtype`` is the loop's dtype for it (``None``: a Python float, taken with ``.item()``);
    the rewrite casts the call's output to it where the two may differ. Where the loop's
    Python zero (``zero``, as the loop leaves it) is never replaced by a tensor, which is when
    the utility's ``count`` is 0, the rewrite keeps that number.
    """

    dtype: Promotion | None = None
    zero: str | None = None
    count: Count | None = None


@dataclass(frozen=True)
class ScaledOutput:
    """An accumulator of ``scale_k * unweighted_k`` (``head_weights[k - 1] * ce_mean``), averaged over the heads:
    the call's ``per_head_ce_loss`` scaled head by head and summed in the loop's order.

    ``template`` is the loop's product with ``{}`` for the per-head loss, in terms of ``variable``, which runs
    over the heads as the loop's did (from 1 when ``first`` is 1, from 0 when it is 0). ``dtype`` is the loop's
    dtype for the per-head loss: the call's is cast to it, so that the scale promotes with it as in the loop.
    ``divisor`` is the loop's head count as written, or ``None`` where it is better not evaluated again (the
    number of per-head losses then)."""

    output: str
    template: str
    variable: str
    first: int
    dtype: Promotion
    divisor: str | None


@dataclass(frozen=True)
class LoopSpec:
    """The loss a site computes, as ``compute_mtp_ce_loss`` arguments (see ``docs/semantics.md``).

    Tensor arguments are expressions in the site's own terms (``attention_mask.bool()``),
    evaluated where the loop was, so the call sees what the loop saw.
    """

    logits: str
    labels: str
    attention_mask: str
    weights: str | None
    n_future: str | None  # None: all heads of the logits (proved, not assumed)
    ignore_index: str | None  # None: the default, -100
    weight_alignment: WeightAlignment = "target"
    mask_ignored_labels: bool = True
    normalize: Normalize = "mask"
    head_average: HeadAverage = "all"
    weighted_output: str | None = None
    unweighted_output: str | None = None
    head0_output: str | None = None  # rho1's head-0 metric: per_head_ce_loss[0]
    head0_item: bool = False  # the metric was taken with .item()
    per_head_weights: bool = False  # 3-D weights [B, S, n], indexed per head
    call_dtype: Promotion | None = None  # the dtype of the call's losses
    weighted_result: Result = Result()
    unweighted_result: Result = Result()
    head0_result: Result = Result()
    scaled_outputs: tuple[ScaledOutput, ...] = ()


@dataclass(frozen=True)
class Divisor:
    """What an accumulator is divided by after the loop: the loop's head count (``"heads"``),
    ``max(counter, 1)`` for a counter of the heads with tokens (``"valid"``), or anything else
    (``"other"``, as written)."""

    kind: Literal["heads", "valid", "other"]
    text: str = ""  # for "other"
    counter: str | None = None  # for "valid"


@dataclass(frozen=True)
class Average:
    """How an accumulator is averaged over heads after the loop.

    ``inline`` is the statement that reads ``acc / divisor`` with ``acc / divisor`` replaced
    by ``acc`` (a ``return`` or an expression using the average), or ``None`` for
    ``acc /= n`` / ``out = acc / n``.
    """

    accumulator: str
    output: str
    divisor: Divisor
    index: int
    inline: cst.BaseStatement | None = None
    in_place: bool = False  # `acc /= n`: a tensor keeps its dtype (`acc / n` turns an integer one into a float)


@dataclass(frozen=True)
class SiteReport:
    """What happened to one site: reported by every command and printed by the CLI."""

    line: int
    action: Action
    refusal: Refusal | None = None
    verified: bool = False

    def as_dict(self) -> dict:
        return {"line": self.line, "action": self.action.value,
                "code": self.refusal.code.code if self.refusal else None,
                "reason": str(self.refusal) if self.refusal else None, "verified": self.verified}

    @staticmethod
    def from_dict(data: dict) -> SiteReport:
        code = next((c for c in Code if c.code == data["code"]), None)
        refusal = Refusal(code, data["reason"].split(": ", 1)[-1]) if code is not None else None
        return SiteReport(data["line"], Action(data["action"]), refusal, data["verified"])
