"""What a recognised site means, independent of how its source spelled it."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst


class Refusal(Exception):
    """The site is not provably equivalent to a utility call; ``str(self)`` says why."""


@dataclass(frozen=True)
class LoopSpec:
    """The loss a site computes, in the terms of ``compute_mtp_ce_loss`` (DESIGN §2).

    Expressions are the site's own CST nodes, so the emitted call evaluates exactly
    what the loop evaluated, at the same point.
    """

    logits: cst.BaseExpression
    labels: cst.BaseExpression
    attention_mask: cst.BaseExpression
    weights: cst.BaseExpression | None
    n_future: cst.BaseExpression | None  # None: all heads of the logits
    ignore_index: cst.BaseExpression | None  # None: the default, -100
    weight_alignment: str = "target"
    mask_ignored_labels: bool = True
    normalize: str = "mask"
    head_average: str = "all"
    weighted_output: str | None = None
    unweighted_output: str | None = None
    head0_output: str | None = None  # rho1's head-0 metric: per_head_ce_loss[0]
    head0_item: bool = False  # the metric was taken with .item()
    per_head_weights: bool = False  # 3-D weights [B, S, n], indexed per head


@dataclass
class Site:
    """One site in one statement block: ``body[start:stop]``, the head loop at ``loop_index``."""

    body: tuple[cst.BaseStatement, ...]
    start: int
    stop: int
    loop_index: int
    indent: str  # absolute indentation of the block, for multi-line emitted code
    line: int
    block_id: int = 0  # id() of the Module or IndentedBlock holding ``body``
    init_indices: tuple[int, ...] = ()  # the accumulator initialisations before the loop
    spec: LoopSpec | None = None
    refusal: str | None = None
    # Rho1-style (DESIGN §5): per-head weights, selected-sum normalisation, a valid-head
    # count or a head-0 metric. These get `del` by default instead of a rewrite.
    rho1_style: bool = False
    temporaries: tuple[str, ...] = ()  # tensors bound on every path through the body, dead after it
    facts: tuple = ()  # (enclosing function's, module's) bindings: shapes, constants, dtypes
    span: tuple[int, int] = (0, 0)  # first and last line of body[start:stop]

    @property
    def loop(self) -> cst.For:
        return self.body[self.loop_index]
