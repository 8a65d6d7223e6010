"""The symbolic values a head loop computes, in terms of the head number ``k``.

Integers are linear forms (``Lin``) over ``k`` and tensor dimensions (``Dim``); which
tensor's dimension is the sequence length, the batch or the heads is only decided once
the cross-entropy call has said which tensors are the logits and the labels (see
``classify``). Tensors are views of tensors from outside the loop (``View``), per-token
products of factors (``Tokens``), their sums (``Total``) and ratios of sums (``Ratio``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Literal

import libcst as cst

from mtp_migrate.mtp_loop.dtypes import DType


@dataclass(frozen=True, order=True)
class Dim:
    """``base.shape[axis]`` for an outer tensor written ``base``."""

    base: str
    axis: int


@dataclass(frozen=True, order=True)
class Free:
    """An integer the loop reads that no fact ties to a tensor dimension (a parameter, ``input_ids.shape[1]``)."""

    text: str


K = "k"  # the 1-based head number
S, B, H, V = "S", "B", "H", "V"  # resolved dimensions: sequence, batch, heads, vocabulary


@dataclass(frozen=True)
class Lin:
    """``sum(coefficient * atom) + const`` with atoms ``K``, ``Dim``s or resolved dimensions."""

    terms: tuple = ()  # sorted ((atom, coefficient), ...), no zero coefficients
    const: int = 0

    @staticmethod
    def of(atom, coefficient: int = 1, const: int = 0) -> Lin:
        return Lin(((atom, coefficient),), const) if coefficient else Lin((), const)

    def _combine(self, other: Lin, sign: int) -> Lin:
        merged = dict(self.terms)
        for atom, coefficient in other.terms:
            merged[atom] = merged.get(atom, 0) + sign * coefficient
        terms = tuple(sorted(((a, c) for a, c in merged.items() if c), key=lambda item: repr(item[0])))
        return Lin(terms, self.const + sign * other.const)

    def __add__(self, other: Lin) -> Lin:
        return self._combine(other, 1)

    def __sub__(self, other: Lin) -> Lin:
        return self._combine(other, -1)

    def __neg__(self) -> Lin:
        return Lin(tuple((a, -c) for a, c in self.terms), -self.const)

    def atoms(self) -> set:
        return {atom for atom, _ in self.terms}

    def substitute(self, mapping: dict) -> Lin:
        result = Lin((), self.const)
        for atom, coefficient in self.terms:
            result = result + Lin.of(mapping.get(atom, atom), coefficient)
        return result


LENGTH = Lin.of(S) - Lin.of(K)  # the positions of head k: S - k


class Layout(Enum):
    """How a per-token tensor of head k is laid out."""

    GRID = "[B, S-k]"
    HEAD_SLICE = "[B, S-k, ...] at head k-1"  # [B, S-k] of 3-D weights or [B, S-k, V] of the logits
    FLAT = "[B*(S-k)]"
    LOGITS_GRID = "[B, S-k, V]"
    LOGITS_FLAT = "[B*(S-k), V]"
    CLASS_FIRST = "[B, V, S-k]"


OpKind = Literal["precision", "value", "compare", "bool", "detach", "fill"]


@dataclass(frozen=True)
class Op:
    """An elementwise operation on a per-token tensor: a cast, a comparison, ``detach``, a fill.

    ``kind`` is ``"precision"`` (float to float: leaves values), ``"value"`` (a cast that
    can change values, e.g. ``.long()``), ``"compare"`` (yields booleans), ``"bool"``
    (a cast to bool), ``"detach"`` or ``"fill"`` (``.masked_fill(condition, operand)``, with
    ``condition`` a view aligned with the tensor's: the classifier writes it whole).
    ``template`` rebuilds the others on another expression: ``template.format(x)``.
    """

    kind: OpKind
    template: str
    operator: str = ""  # for comparisons: "!=", "==", ...
    operand: str = ""  # for comparisons: the other side, as written
    dtypes: tuple[DType, ...] | None = None  # it gives their promotion; None: its operand's dtype
    condition: View | None = None  # for a fill: where it fills

    @property
    def boolean(self) -> bool:
        return self.kind in ("compare", "bool")

    def apply(self, text: str) -> str:
        return self.template.format(text)


@dataclass(frozen=True)
class Outer:
    """A tensor from outside the loop, as written there."""

    node: cst.BaseExpression = field(compare=False)
    text: str = ""

    @property
    def atom(self) -> str:
        """The text, parenthesised where a subscript or an attribute after it would bind to a part."""
        node = self.node
        atomic = node is None or isinstance(node, cst.Name | cst.Attribute | cst.Subscript | cst.Call) or node.lpar
        return self.text if atomic else f"({self.text})"


@dataclass(frozen=True)
class View:
    """``base[:, start:stop]`` (``stop`` None: to the end), with ``head`` indexing axis 2 if not None."""

    base: Outer
    start: Lin
    stop: Lin | None
    head: Lin | None
    layout: Layout
    ops: tuple[Op, ...] = ()
    shape_checks: tuple = ()  # (args of a .view/.reshape as Lin | None for -1, ...) to check once resolved
    ellipsis: bool = False  # written `[..., h, :]`: ``head`` is on axis 2 only of a 4-D tensor (the logits)

    def with_op(self, op: Op) -> View:
        return replace(self, ops=(*self.ops, op))

    def relayout(self, layout: Layout, check: tuple | None = None) -> View:
        checks = self.shape_checks if check is None else (*self.shape_checks, check)
        return replace(self, layout=layout, shape_checks=checks)

    @property
    def boolean(self) -> bool:
        return bool(self.ops) and self.ops[-1].boolean

    @property
    def nonnegative(self) -> bool:
        """Provably 0 or 1: a comparison or a cast to bool, whatever casts follow."""
        return any(op.boolean for op in self.ops)

    @property
    def dtypes(self) -> tuple[DType, ...]:
        """The dtype of the view's values (the promotion of these): its last cast's, else its tensor's."""
        casts = [op.dtypes for op in self.ops if op.dtypes is not None]
        return casts[-1] if casts else (DType.of_tensor(self.base.atom),)

    def as_factor(self) -> View:
        """The view as a per-token factor: its layout belongs to the product, not to the factor."""
        return View(self.base, self.start, self.stop, self.head, Layout.GRID, self.ops, ellipsis=self.ellipsis)


@dataclass(frozen=True)
class CrossEntropy:
    """The per-token cross-entropy of a logits view against a labels view."""

    logits: View
    labels: View
    ignore_index: cst.BaseExpression | None = field(compare=False)  # None: -100
    ignore_text: str = "-100"
    gathered: bool = False  # written out with gather, which reads the logits only where the labels are


@dataclass(frozen=True)
class Tokens:
    """A per-token product of factors (``CrossEntropy`` or ``View``) in one layout."""

    factors: tuple
    layout: Layout
    shape_checks: tuple = ()


@dataclass(frozen=True)
class Total:
    """``Tokens(...).sum()``; ``safe``: replaced where it is not > 0 (``torch.where(d > 0, d, 1)``), so a
    division by it has finite gradients on a head without tokens."""

    factors: tuple
    shape_checks: tuple = ()
    safe: bool = False


@dataclass(frozen=True)
class HeadScale:
    """A per-head number the ratio is multiplied by (``head_weights[k - 1] * ratio``, ``lam ** (k - 1)``), as
    written: it reads only the loop variable and names from outside the loop. ``template`` is the product with
    ``{}`` for the ratio, in the order written."""

    node: cst.BaseExpression = field(compare=False)
    template: str = "{}"


@dataclass(frozen=True)
class Ratio:
    numerator: Total
    denominator: Total
    scale: HeadScale | None = None  # None: the ratio itself


@dataclass(frozen=True)
class Accumulation:
    """One ``acc += value`` inside the loop; ``guard`` is the ``Total`` that must be > 0 (or None)."""

    name: str
    value: Ratio | int  # a ratio, or 1 for a head counter
    guard: Total | None
    node: cst.CSTNode = field(compare=False, default=None)
    where: bool = False  # guarded by `torch.where(guard > 0, ratio, 0)`: a tensor is added on every head


@dataclass(frozen=True)
class Head0Metric:
    """``name = ratio`` (``.item()`` if ``item``) under ``if k == 1:``, guarded by ``guard``."""

    name: str
    ratio: Ratio
    item: bool
    guard: Total | None
