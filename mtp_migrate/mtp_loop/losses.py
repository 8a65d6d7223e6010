"""Every loss spelling the recognizer knows, declared once.

The byte prefilter (``runner.PREFILTER``), the head-loop finder (``find.py``), the
expression evaluator (``expressions.py``) and the dead-code cleanup
(``commands/remove_dead_code.py``) all read this table: adding a spelling is one entry
here and its fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Literal

import libcst as cst
import libcst.matchers as m


class Form(Enum):
    FUNCTION = "function"  # called in the loop with its options: F.cross_entropy(x, y, reduction="none")
    MODULE = "module"  # built before the loop with its options, called in it: criterion(x, y)
    WRITTEN_OUT = "written out"  # its formula in the loop: -log_softmax(x).gather(-1, y[..., None]).squeeze(-1)


@dataclass(frozen=True)
class LossSpelling:
    """One way to write the per-token cross-entropy.

    ``qualified`` are the names it resolves to; ``prefilter`` is a byte string every file
    using it contains. ``options`` are the keywords read (at the call for a function, at
    construction for a module); any other keyword, or a value the utility has no
    equivalent for, refuses the site. ``reads`` says what its input is: the logits, or
    log-probabilities that must be a ``log_softmax`` of them over the vocabulary.
    """

    qualified: frozenset[str]
    prefilter: bytes
    options: frozenset[str]
    reads: Literal["logits", "log_probs"]
    form: Form = Form.FUNCTION

    @property
    def suffix(self) -> str:
        """The last part of its names, as a call may be written before names are resolved."""
        return min(self.qualified).rsplit(".", 1)[-1]


_CROSS_ENTROPY_OPTIONS = frozenset({"reduction", "ignore_index", "label_smoothing", "weight"})

CROSS_ENTROPY = LossSpelling(frozenset({"torch.nn.functional.cross_entropy"}), b"cross_entropy",
                             _CROSS_ENTROPY_OPTIONS, "logits")
NLL_LOSS = LossSpelling(frozenset({"torch.nn.functional.nll_loss"}), b"nll_loss",
                        frozenset({"reduction", "ignore_index"}), "log_probs")
CROSS_ENTROPY_LOSS = LossSpelling(frozenset({"torch.nn.CrossEntropyLoss", "torch.nn.modules.loss.CrossEntropyLoss"}),
                                  b"CrossEntropyLoss", _CROSS_ENTROPY_OPTIONS, "logits", Form.MODULE)
NLL_LOSS_MODULE = LossSpelling(frozenset({"torch.nn.NLLLoss", "torch.nn.modules.loss.NLLLoss"}), b"NLLLoss",
                               NLL_LOSS.options, "log_probs", Form.MODULE)
# The input of a ``log_probs`` loss.
LOG_SOFTMAX = frozenset({"torch.nn.functional.log_softmax", "torch.log_softmax"})
# -log_softmax(x, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1): the target's negated log-probability.
LOG_SOFTMAX_GATHER = LossSpelling(LOG_SOFTMAX, b"log_softmax", frozenset(), "log_probs", Form.WRITTEN_OUT)
# logsumexp(x, -1) - x.gather(-1, y.unsqueeze(-1)).squeeze(-1): the same value, rounded otherwise.
LOGSUMEXP_GATHER = LossSpelling(frozenset({"torch.logsumexp"}), b"logsumexp", frozenset(), "logits",
                                Form.WRITTEN_OUT)
LOSSES: tuple[LossSpelling, ...] = (CROSS_ENTROPY, NLL_LOSS, CROSS_ENTROPY_LOSS, NLL_LOSS_MODULE,
                                    LOG_SOFTMAX_GATHER, LOGSUMEXP_GATHER)

# Every name above: what a star import may be taken to bind (``find.Analysis``).
REGISTERED_NAMES = frozenset().union(LOG_SOFTMAX, *(loss.qualified for loss in LOSSES))

# A file without any of these cannot hold a site.
PREFILTER: tuple[bytes, ...] = tuple(dict.fromkeys(loss.prefilter for loss in LOSSES))


@cache  # read per call node by the finder: the table is fixed
def suffixes(form: Form) -> tuple[str, ...]:
    """How the finder, before names are resolved, spots a loss call (or, for a module, its construction)."""
    return tuple(dict.fromkeys(loss.suffix for loss in LOSSES if loss.form is form))


def spelling(names: set[str], form: Form) -> LossSpelling | None:
    """The spelling of ``form`` that ``names`` (a callee's qualified names) resolve to, or ``None``."""
    for loss in LOSSES:
        if names and names <= loss.qualified and loss.form is form:
            return loss
    return None


def looks_like_loss(names: set[str], written: str) -> bool:
    """A callee named like a registered function loss without being one (a project's own)."""
    named = suffixes(Form.FUNCTION)
    return any(name.endswith(named) for name in names) or written.rsplit(".", 1)[-1] in named


def written_out(node: cst.CSTNode, dotted: str | None) -> bool:
    """A ``WRITTEN_OUT`` spelling as the finder spots it before names are resolved: ``-(... .gather(...) ...)``,
    or ``... logsumexp(...) - ...`` (``dotted`` is the name of the left side's callee, if it is a call)."""
    if m.matches(node, m.UnaryOperation(operator=m.Minus())):
        return bool(m.findall(node.expression, m.Attribute(attr=m.Name("gather"))))
    return m.matches(node, m.BinaryOperation(operator=m.Subtract())) and (dotted or "").endswith(
        LOGSUMEXP_GATHER.suffix)
