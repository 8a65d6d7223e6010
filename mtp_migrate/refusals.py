"""Every reason a site is left alone, with a stable code (documented in ``docs/refusals.md``).

``MTP1xx``: the loop is not provably the utility's computation (recognition).
``MTP2xx``: the numerical verifier did not confirm the rewrite.
``MTP3xx``: the utility the rewrite would import is not ours to use or write.
``MTP4xx``: a deliberate choice (``--rho1``), not a defect of the loop.
"""

from __future__ import annotations

from enum import Enum


class Code(Enum):
    LOOP_HEADER = ("MTP101", "the head loop is not `for k in range(...)`")
    STATEMENT = ("MTP102", "a statement in the head loop has effects the call would drop")
    NOT_TORCH_CROSS_ENTROPY = ("MTP103", "cross_entropy is not torch.nn.functional.cross_entropy")
    CROSS_ENTROPY_ARGUMENTS = ("MTP104", "cross_entropy arguments the utility cannot express")
    HEAD_INDEXING = ("MTP105", "the logits, labels or another tensor is not indexed per head")
    POSITIONS = ("MTP106", "a slice does not cover the S-k positions of head k")
    LAYOUT = ("MTP107", "a reshape or product that is not per token")
    REDUCTION = ("MTP108", "a reduction other than a per-head masked mean")
    GUARD = ("MTP109", "a division whose zero case differs from the utility's")
    PER_HEAD_VALUE_USED = ("MTP110", "a per-head value is used beyond the loss")
    ACCUMULATOR = ("MTP111", "the accumulators are not zero-initialised and summed once per head")
    MASK_AND_WEIGHTS = ("MTP112", "masks and weights that the utility's arguments cannot express")
    HEAD_AVERAGE = ("MTP113", "the average over heads is not over the loop's heads")
    LIVE_AFTER = ("MTP114", "a name the site binds is read later and the call would not bind it")
    SEQUENCE_LENGTH = ("MTP115", "two different sequence lengths that no tensor the call receives ties together")
    HEAD0_METRIC = ("MTP116", "a head-0 metric that is not per_head_ce_loss[0]")
    VALUE_CAST = ("MTP117", "a value-changing cast the call cannot reproduce")
    UTILITY_ITSELF = ("MTP118", "a loop inside the loss utility itself")
    NAME_COLLISION = ("MTP119", "the utility's name is bound in a way an import cannot safely coexist with")
    TORCHSCRIPT = ("MTP120", "a loop inside a TorchScript-compiled function")
    NOT_EQUIVALENT = ("MTP201", "the rewrite computes different values or gradients")
    REWRITE_RAISES = ("MTP202", "the rewrite raises where the loop returns")
    NOT_EXERCISED = ("MTP203", "too few inputs on which the loop runs")
    NOT_RUNNABLE = ("MTP204", "the verifier cannot run the site's code")
    VERIFIER_FAILED = ("MTP205", "verification timed out or crashed")
    OPAQUE_CALL = ("MTP206", "the site's own code calls something the verifier may not run")
    CONTEXT = ("MTP207", "what wraps the site (a decorator, a `with`, an `except`) cannot be modelled")
    DYNAMIC_NAMES = ("MTP208", "names the site reads may be rebound or read at run time beyond what the code says")
    CONTINUATION = ("MTP209", "later code may change in place what the call keeps for backward")
    FOREIGN_UTILITY = ("MTP301", "the target has its own, different loss utility")
    UTILITY_UNAVAILABLE = ("MTP302", "the --utility-module cannot be written or found")
    RHO1_SKIPPED = ("MTP401", "a rho1-style loop, skipped under --rho1 skip")
    RHO1_NOTHING_TO_DELETE = ("MTP402", "a rho1-style loop with no temporaries left to delete")

    @property
    def code(self) -> str:
        return self.value[0]

    @property
    def summary(self) -> str:
        return self.value[1]


class Refusal(Exception):
    """A site the tool will not change; ``str()`` is ``"MTPnnn: why"``."""

    def __init__(self, code: Code, message: str):
        super().__init__(f"{code.code}: {message}")
        self.code = code
        self.message = message
