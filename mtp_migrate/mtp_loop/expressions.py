"""Evaluate the expressions of a head loop symbolically: positions, views, per-token products,
sums and their ratios, with the cross-entropy call at their root.

Which tensor is the logits, the mask or the weights is decided by data flow only (what
reaches ``cross_entropy``, what is multiplied with it), never by names. Elementwise casts
and comparisons ride along on the factor they apply to, so the call can receive the
tensor exactly as the loop saw it.

One class over 400 lines, by choice: it is a single recursive evaluator over every
expression form a loop may contain, and splitting it would scatter that recursion.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import libcst as cst
import libcst.matchers as m

from mtp_migrate.cst_utils import code, literal_int, literal_number, string_value
from mtp_migrate.flow.dataflow import reaching_definition
from mtp_migrate.flow.names import changed_in_place
from mtp_migrate.mtp_loop.dtypes import BOOL, FLOAT64, METHOD_DTYPES, OF_CROSS_ENTROPY, DType
from mtp_migrate.mtp_loop.facts import Facts
from mtp_migrate.mtp_loop.losses import (
    LOG_SOFTMAX,
    LOGSUMEXP_GATHER,
    Form,
    LossSpelling,
    looks_like_loss,
    spelling,
)
from mtp_migrate.mtp_loop.symbolic import (
    CrossEntropy,
    Dim,
    Free,
    HeadScale,
    K,
    Layout,
    Lin,
    Op,
    Outer,
    Ratio,
    Tokens,
    Total,
    View,
)
from mtp_migrate.refusals import Code, Refusal

TORCH_SUM = "torch.sum"
TORCH_WHERE = "torch.where"
_ARITHMETIC_METHODS = {"mul": cst.Multiply, "multiply": cst.Multiply, "div": cst.Divide, "divide": cst.Divide,
                       "true_divide": cst.Divide}
FLOAT_DTYPES = {f"torch.{name}" for name in ("float", "float32", "float64", "double", "float16", "half", "bfloat16")}
BOOL_DTYPE = "torch.bool"
_PRECISION_METHODS = {"float", "double", "half", "bfloat16", "cpu", "cuda"}
_VALUE_METHODS = {"long", "int", "short", "byte", "char"}
_COMPARE_METHODS = {"ne": "!=", "eq": "==", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_COMPARE_OPERATORS = {cst.NotEqual: "!=", cst.Equal: "==", cst.GreaterThan: ">", cst.GreaterThanEqual: ">=",
                      cst.LessThan: "<", cst.LessThanEqual: "<="}
_FLATTEN = ("reshape", "view")
_SCALE_OPERATORS = (cst.Add, cst.Subtract, cst.Multiply, cst.Divide, cst.Power)
_RELAYOUT = ("reshape", "view", "flatten", "view_as", "reshape_as", "transpose", "permute", "squeeze", "unsqueeze")


def _compare(operator: str, operand: str) -> Op:
    return Op("compare", "({} " + operator + " " + operand + ")", operator, operand, (DType.of(BOOL),))


def _decided(view: View, op: Op, node: cst.CSTNode) -> View:
    """``view`` with ``op``, unless ``op`` decides (a comparison, a cast to bool) on values a cast below fp64
    rounded first: the call receives the tensor without its precision casts, and rounding before a threshold
    is not an error of precision but another decision (fp16 token ids above 2048 collide, a soft mask near
    the threshold crosses it)."""
    rounded = zero_one = False  # 0/1 values (a comparison's) stay exact through any cast
    for prior in view.ops:
        zero_one = prior.boolean or (zero_one and prior.kind in ("precision", "value"))
        rounded = rounded or (prior.kind == "precision" and not zero_one and prior.dtypes is not None
                              and prior.dtypes != (DType.of(FLOAT64),))
    if op.kind in ("compare", "bool") and rounded:
        raise Refusal(Code.VALUE_CAST, f"`{code(node)}` compares values a cast rounded first: the call would "
                                       "compare them unrounded")
    return view.with_op(op)


class LogSoftmax(NamedTuple):
    """``log_softmax`` of a view of the logits over its vocabulary axis, laid out as the view is."""

    logits: View


class LogSumExp(NamedTuple):
    """``logsumexp`` of a view of the logits over its vocabulary axis: one value per token."""

    logits: View


class Gathered(NamedTuple):
    """``x.gather(-1, y.unsqueeze(-1))`` of log-probabilities (``log_probs``) or logits ``x`` at labels ``y``:
    one value per token once ``squeezed`` back to ``y``'s shape, ``negated`` by a unary minus."""

    logits: View
    labels: View
    log_probs: bool
    squeezed: bool = False
    negated: bool = False


# A gather's index may be smaller than its input: on [B, S-k, V] rows the loop reads the logits where the labels
# are (the call gets them cut so); on flattened rows, longer logits than labels would pair rows across the batch.
_GATHERED = {Layout.LOGITS_GRID: Layout.GRID}
_CALL_ROWS = {Layout.LOGITS_FLAT: Layout.FLAT, Layout.CLASS_FIRST: Layout.GRID}  # cross_entropy's input -> target


def _is_full(element: cst.SubscriptElement) -> bool:
    return m.matches(element.slice, m.Slice(lower=None, upper=None, step=None))


def _is_zero(node: cst.BaseExpression) -> bool:
    return literal_number(node) == 0


class ExpressionEvaluator:
    """The expression half of ``LoopEvaluator``, with all the state the expressions read and write.

    ``loop_name`` and ``head_offset`` come from the loop header, which ``LoopEvaluator`` reads.
    """

    loop_name: str  # `k` of `for k in range(...)`
    head_offset: int  # k = loop variable + head_offset

    def __init__(self, accumulators: set[str], facts: Facts):
        self.facts = facts
        self.qualified = facts.qualified
        self.index = facts.index
        self.accumulators = accumulators
        self.env: dict[str, object] = {}  # what the body bound so far: a Lin, a View, Tokens, a Total...
        self.outer_names: set[str] = set()  # names the outer expressions read
        self.cross_entropy: CrossEntropy | None = None  # the loop's one per-token loss, once seen
        self.dimension_names: dict[Dim, str] = {}  # Dim -> the name the loop read it through (seq_len)

    def position(self, node: cst.BaseExpression) -> Lin:
        value = literal_int(node)
        if value is not None:
            return Lin((), value)
        if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus | cst.Plus):
            inner = self.position(node.expression)
            return -inner if isinstance(node.operator, cst.Minus) else inner
        if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Add | cst.Subtract):
            left, right = self.position(node.left), self.position(node.right)
            return left + right if isinstance(node.operator, cst.Add) else left - right
        if isinstance(node, cst.NamedExpr):
            value = self.position(node.value)
            self.env[node.target.value] = value
            return value
        if isinstance(node, cst.Name):
            if node.value == self.loop_name:
                return Lin.of(K, 1, -self.head_offset)
            bound = self.env.get(node.value)
            if isinstance(bound, Lin):
                return bound
            if node.value in self.env or node.value in self.accumulators:
                raise Refusal(Code.POSITIONS, f"`{node.value}` is not a position")
            self.outer_names.add(node.value)
            fact = self.facts.integer(node.value)
            if fact is not None and len(fact.terms) == 1 and fact.terms[0][1] == 1 and not fact.const:
                self.dimension_names.setdefault(fact.terms[0][0], node.value)
            return Lin.of(Free(node.value)) if fact is None else fact
        if isinstance(node, cst.Call) and self.qualified(node.func) == {"builtins.int"} and len(node.args) == 1:
            return self.position(node.args[0].value)
        if self._head_dimension(node):  # `head_logits.size(-1)`: an integer no fact names
            return Lin.of(Free(code(node)))
        if not self._mentions_loop(node):
            dim = self.facts.dimension(node, self.facts.point)
            if dim is not None:
                self.outer_names |= self.index.reads(node)
                return Lin.of(dim)
        raise Refusal(Code.POSITIONS, f"cannot follow the index `{code(node)}`")

    def _head_dimension(self, node: cst.BaseExpression) -> bool:
        """``x.size(i)`` or ``x.shape[i]`` of a per-head view ``x`` of the loop."""
        if m.matches(node, m.Call(func=m.Attribute(value=m.Name(), attr=m.Name("size")), args=[m.Arg(keyword=None)])):
            tensor, axis = node.func.value, node.args[0].value
        elif m.matches(node, m.Subscript(value=m.Attribute(value=m.Name(), attr=m.Name("shape")),
                                         slice=[m.SubscriptElement(m.Index())])):
            tensor, axis = node.value.value, node.slice[0].slice.value
        else:
            return False
        return isinstance(self.env.get(tensor.value), View) and literal_int(axis) is not None

    def _mentions_loop(self, node: cst.CSTNode) -> bool:
        return bool(self.index.reads(node) & (set(self.env) | {self.loop_name} | self.accumulators))

    # -- tensors
    def value(self, node: cst.BaseExpression):
        if isinstance(node, cst.Name):
            if node.value in self.env:
                return self.env[node.value]
            if node.value in self.accumulators or node.value == self.loop_name:
                raise Refusal(Code.ACCUMULATOR if node.value in self.accumulators else Code.POSITIONS,
                              f"`{node.value}` is used inside the loop beyond its accumulation")
            return self._outer(node)
        if isinstance(node, cst.NamedExpr):
            value = self.value(node.value)
            self.env[node.target.value] = value
            return value
        if not self._mentions_loop(node):
            return self._outer(node)
        if isinstance(node, cst.Subscript):
            return self.subscript(node)
        if isinstance(node, cst.Call):
            return self.call(node)
        if isinstance(node, cst.BinaryOperation):
            return self.binary(node)
        if isinstance(node, cst.Comparison):
            return self.comparison(node)
        if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
            value = self.value(node.expression)
            if isinstance(value, Gathered) and value.log_probs and not value.negated:
                return self._written_out(value._replace(negated=True), node)
        raise Refusal(Code.STATEMENT, f"cannot follow `{code(node)}`")

    def _outer(self, node: cst.BaseExpression) -> Outer:
        if self._mentions_loop(node):
            raise Refusal(Code.PER_HEAD_VALUE_USED, f"`{code(node)}` reads a per-head value where the call needs "
                                                    "one from outside the loop")
        self.outer_names |= self.index.reads(node)
        return Outer(node, code(node))

    def subscript(self, node: cst.Subscript) -> View:
        base = self.value(node.value)
        elements = list(node.slice)
        if isinstance(base, Outer) and m.matches(elements[0].slice, m.Index(value=m.Ellipsis())):
            # logits[..., k - 1, :]: the head's [B, S, V] (the classifier admits it for the logits alone)
            if len(elements) != 3 or not isinstance(elements[1].slice, cst.Index) or not _is_full(elements[2]):
                raise Refusal(Code.HEAD_INDEXING, f"unsupported indexing `{code(node)}`")
            return View(base, Lin(), None, self.position(elements[1].slice.value), Layout.HEAD_SLICE, ellipsis=True)
        if isinstance(base, Outer):
            if len(elements) < 2 or not _is_full(elements[0]):
                raise Refusal(Code.HEAD_INDEXING, f"unsupported indexing `{code(node)}`")
            start, stop = self._positions(elements[1])
            head, rest = self._head(elements[2:], node)
            layout = Layout.LOGITS_GRID if rest else Layout.HEAD_SLICE if head is not None else Layout.GRID
            if any(not _is_full(e) for e in rest):
                raise Refusal(Code.HEAD_INDEXING, f"unsupported indexing `{code(node)}`")
            return View(base, start, stop, head, layout)
        if isinstance(base, View) and base.start == Lin() and base.stop is None and not base.ops:
            # logits[:, :, k - 1][:, :valid_len]: positions after the head
            if len(elements) >= 2 and _is_full(elements[0]) and all(_is_full(e) for e in elements[2:]):
                start, stop = self._positions(elements[1])
                return View(base.base, start, stop, base.head, base.layout, ellipsis=base.ellipsis)
        raise Refusal(Code.HEAD_INDEXING, f"unsupported indexing `{code(node)}`")

    def _positions(self, element: cst.SubscriptElement) -> tuple[Lin, Lin | None]:
        part = element.slice
        if isinstance(part, cst.Index) or part.step is not None:
            raise Refusal(Code.POSITIONS, f"unsupported position slice `{code(element)}`")
        start = Lin() if part.lower is None else self.position(part.lower)
        stop = None if part.upper is None else self.position(part.upper)
        return start, stop

    def _head(self, rest: list[cst.SubscriptElement], node) -> tuple[Lin | None, list]:
        if rest and not _is_full(rest[0]):
            if not isinstance(rest[0].slice, cst.Index):
                raise Refusal(Code.HEAD_INDEXING, f"unsupported indexing `{code(node)}`")
            return self.position(rest[0].slice.value), rest[1:]
        return None, rest

    def call(self, node: cst.Call):
        names = self.qualified(node.func)
        if names and names <= LOG_SOFTMAX and node.args and not node.args[0].keyword and not node.args[0].star:
            return self._over_vocabulary(self.value(node.args[0].value), node.args[1:], node)
        if spelling(names, Form.WRITTEN_OUT) is LOGSUMEXP_GATHER and node.args and not node.args[0].keyword:
            return self._logsumexp(self.value(node.args[0].value), node.args[1:], node)
        loss = spelling(names, Form.FUNCTION)
        if loss is not None:
            return self.loss_call(node, loss)
        module = self._loss_module(node)
        if module is not None:
            return self.loss_call(node, *module)
        if looks_like_loss(names, code(node.func)):
            found = ", ".join(sorted(names)) or code(node.func)
            raise Refusal(Code.NOT_TORCH_CROSS_ENTROPY,
                          f"`{code(node.func)}` is {found}, not a torch loss the utility computes")
        if names == {TORCH_WHERE}:
            return self._safe_denominator(node)
        if names == {TORCH_SUM}:
            if len(node.args) != 1 or node.args[0].keyword is not None:
                raise Refusal(Code.REDUCTION, f"a different reduction: `{code(node)}`")
            return Total(*self._total(self.value(node.args[0].value)))
        if not isinstance(node.func, cst.Attribute):
            raise Refusal(Code.STATEMENT, f"cannot follow the call `{code(node)}`")
        method, receiver = node.func.attr.value, self.value(node.func.value)
        if method == "gather" and isinstance(receiver, LogSoftmax | View):
            return self._gather(receiver, node)
        if isinstance(receiver, Gathered):
            return self._squeezed(receiver, node)
        if isinstance(receiver, LogSoftmax):
            return self._log_probs_method(node, method, receiver)
        if isinstance(receiver, Outer):
            raise Refusal(Code.STATEMENT, f"cannot follow the call `{code(node)}`")
        return self.method(node, method, receiver)

    def _log_probs_method(self, node: cst.Call, method: str, receiver: LogSoftmax) -> LogSoftmax:
        """A new layout of log-probabilities: the vocabulary axis moves with the logits'."""
        if method == "contiguous" and not node.args:
            return receiver
        if method not in _RELAYOUT:
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"`{code(node)}` on log-probabilities")
        logits = self._relayout(receiver.logits, method, list(node.args), node)
        if logits.layout not in (Layout.LOGITS_GRID, Layout.LOGITS_FLAT, Layout.CLASS_FIRST):
            raise Refusal(Code.LAYOUT, f"`{code(node)}` does not keep the vocabulary axis of the log-probabilities")
        return LogSoftmax(logits)

    def method(self, node: cst.Call, method: str, receiver):
        if method in ("to", "type"):  # `.to(dtype)` with `dtype = logits.dtype` bound in the loop: that outer value
            node = node.with_changes(args=[a.with_changes(value=self.env[a.value.value].node) if isinstance(
                a.value, cst.Name) and isinstance(self.env.get(a.value.value), Outer) else a for a in node.args])
        args = list(node.args)
        if method == "sum":
            if args:
                raise Refusal(Code.REDUCTION, f"a different reduction: `{code(node)}` (a sum over one axis)")
            return Total(*self._total(receiver))
        if method in ("mean", "nansum", "nanmean", "prod", "max", "min", "amax"):
            raise Refusal(Code.REDUCTION, f"a different reduction: `{code(node)}`")
        if method in ("clamp", "clamp_min", "clip") and isinstance(receiver, Total):
            raise Refusal(Code.GUARD, f"a clamped denominator `{code(node)}` differs from the utility's `> 0` "
                                      "guard on fractional masks")
        if method in _ARITHMETIC_METHODS and len(args) == 1 and args[0].keyword is None and not args[0].star:
            # `a.mul(b)` is `a * b` and `a.div(b)` is `a / b` (true division) for tensors
            return self.binary(cst.BinaryOperation(node.func.value, _ARITHMETIC_METHODS[method](), args[0].value))
        op = self._op(node, method, args)
        if op is not None:
            return self._apply(receiver, op, node)
        if method in ("contiguous",) and not args:
            return receiver
        if method in _RELAYOUT:
            return self._relayout(receiver, method, args, node)
        if method == "masked_fill":
            return self._masked_fill(receiver, args, node)
        if method == "log_softmax":
            return self._over_vocabulary(receiver, args, node)
        if method == LOGSUMEXP_GATHER.suffix:
            return self._logsumexp(receiver, args, node)
        raise Refusal(Code.STATEMENT, f"cannot follow the call `{code(node)}`")

    def _op(self, node: cst.Call, method: str, args) -> Op | None:
        """The elementwise operation a method call applies, or ``None`` if it is not one."""
        template = "{}" + code(node)[len(code(node.func.value)):]
        cast = (DType.of(METHOD_DTYPES[method]),) if method in METHOD_DTYPES else None
        if method in _PRECISION_METHODS and not args:
            return Op("precision", template, dtypes=cast)
        if method in _VALUE_METHODS and not args:
            return Op("value", template, dtypes=cast)
        if method == "bool" and not args:
            return Op("bool", template, dtypes=cast)
        if method == "detach" and not args:
            return Op("detach", template)
        if (method == "clamp_min" and len(args) == 1 and args[0].keyword is None) or (method == "clamp" and len(
                args) == 1 and (args[0].keyword is None or args[0].keyword.value == "min")):
            if _is_zero(args[0].value):  # `labels.clamp_min(0)`: ignored labels made safe to gather
                return Op("value", template)
        if method in _COMPARE_METHODS and len(args) == 1 and args[0].keyword is None:
            self._outer(args[0].value)
            return _compare(_COMPARE_METHODS[method], code(args[0].value))
        if method in ("to", "type") and args:
            kinds, dtypes = set(), None
            for arg in args:
                kind, given = self._conversion(arg)
                kinds.add(kind)
                dtypes = given if given is not None else dtypes
                if kinds != {"precision"} or not self._mentions_loop(arg.value):
                    self._outer(arg.value)
            kinds.discard("device")
            if "value" in kinds:
                return Op("value", template, dtypes=dtypes)
            return Op("bool" if "bool" in kinds else "precision", template, dtypes=dtypes)
        if method == "type_as" and len(args) == 1:
            self._outer(args[0].value)
            return Op("value", template, dtypes=(DType.of_tensor(Outer(args[0].value, code(args[0].value)).atom),))
        return None

    def _masked_fill(self, receiver, args: list[cst.Arg], node: cst.Call) -> View:
        """``x.masked_fill(condition, fill)`` of a per-token view ``x``, with a boolean ``condition`` sliced as ``x``
        is and a ``fill`` from outside the loop: an operation the call receives as written, on the whole tensors
        (a filled label is then ignored by the utility exactly as by the loss, whatever the logits there)."""
        if not isinstance(receiver, View) or receiver.layout not in (Layout.GRID, Layout.FLAT) or \
                receiver.nonnegative or len(args) != 2 or any(a.keyword or a.star for a in args):
            raise Refusal(Code.STATEMENT, f"cannot follow the call `{code(node)}`")
        condition, fill = self.value(args[0].value), args[1].value
        if not (isinstance(condition, View) and condition.boolean and condition.layout is receiver.layout and
                (condition.start, condition.stop, condition.head) == (receiver.start, receiver.stop, receiver.head)
                and not condition.ellipsis and condition.shape_checks == receiver.shape_checks):
            raise Refusal(Code.LAYOUT, f"`{code(node)}`: the condition is not a boolean sliced as the tensor is")
        if literal_int(fill) is None and not isinstance(fill, cst.Name | cst.Attribute):
            raise Refusal(Code.STATEMENT, f"`{code(node)}`: the fill is not an integer literal or a name")
        self._outer(fill)
        return receiver.with_op(Op("fill", "", "masked_fill", code(fill), condition=condition))

    def _conversion(self, arg: cst.Arg) -> tuple[str, tuple[DType, ...] | None]:
        """What one argument of ``.to(...)`` does: ``precision``, ``bool``, ``device`` or ``value`` (unknown),
        and the dtype it gives (``None``: the operand's)."""
        keyword = arg.keyword.value if arg.keyword is not None else None
        if m.matches(arg.value, m.Attribute(attr=m.Name("dtype"))) and self._mentions_loop(arg.value):
            of = self.value(arg.value.value)  # `.to(ce.dtype)`: the dtype of the cross-entropy, a float
            if isinstance(of, Tokens) and any(isinstance(f, CrossEntropy) for f in of.factors):
                return "precision", tuple(d for f in of.factors for d in (
                    (OF_CROSS_ENTROPY,) if isinstance(f, CrossEntropy) else f.dtypes))
        if keyword in ("non_blocking", "copy", "device"):
            return "device", None
        names = self.qualified(arg.value)
        if names and names <= FLOAT_DTYPES:
            return "precision", tuple(DType.of(name) for name in names)
        if names == {BOOL_DTYPE}:
            return "bool", (DType.of(BOOL),)
        if names == {"torch.device"} or string_value(arg.value) is not None or m.matches(
                arg.value, m.Attribute(attr=m.Name("device"))) or (
                isinstance(arg.value, cst.Call) and self.qualified(arg.value.func) == {"torch.device"}):
            return "device", None
        # A dtype the code reads at run time (`.to(model_dtype)`), as the verifier reads it too.
        return "value", (DType(Outer(arg.value, code(arg.value)).atom),)

    def _apply(self, receiver, op: Op, node):
        if isinstance(receiver, View):
            return _decided(receiver, op, node)
        if isinstance(receiver, Tokens):
            if op.kind == "precision":
                return receiver
            plain = [i for i, f in enumerate(receiver.factors) if not (isinstance(f, View) and f.boolean)]
            if op.kind == "detach" and not any(isinstance(f, CrossEntropy) for f in receiver.factors):
                factors = tuple(f.with_op(op) for f in receiver.factors)
                return Tokens(factors, receiver.layout, receiver.shape_checks)
            if op.kind in ("value", "bool") and len(plain) == 1 and isinstance(receiver.factors[plain[0]], View):
                factors = list(receiver.factors)  # cast(a * b) == cast(a) * b when b is 0/1
                factors[plain[0]] = factors[plain[0]].with_op(op)
                return Tokens(tuple(factors), receiver.layout, receiver.shape_checks)
            raise Refusal(Code.VALUE_CAST, f"`{code(node)}` casts a product the call cannot split")
        if isinstance(receiver, Total) and op.kind == "precision":
            return receiver
        raise Refusal(Code.VALUE_CAST, f"`{code(node)}` on a value that is not per token")

    def _relayout(self, receiver, method: str, args, node):
        if not isinstance(receiver, View | Tokens):
            raise Refusal(Code.LAYOUT, f"`{code(node)}` on a value that is not per token")
        new = self._new_layout(receiver.layout, method, args, node)
        if new is None:
            raise Refusal(Code.LAYOUT, f"`{code(node)}` does not keep one value per token")
        target, check = new
        if isinstance(receiver, View):
            return receiver.relayout(target, check)
        checks = (*receiver.shape_checks, check) if check else receiver.shape_checks
        return Tokens(receiver.factors, target, checks)

    def _new_layout(self, layout: Layout, method: str, args, node) -> tuple[Layout, tuple | None] | None:
        values = [a.value for a in args]
        if layout is Layout.HEAD_SLICE:  # logits[:, :L, k - 1] reshaped to rows of the vocabulary
            rows = len(values) == 2 or method in ("transpose", "permute")
            layout = Layout.LOGITS_GRID if rows else Layout.GRID
        if method == "flatten" and not values and layout in (Layout.GRID, Layout.FLAT):
            return Layout.FLAT, None
        if method == "flatten" and [literal_int(v) for v in values] == [0, 1]:
            if layout in (Layout.GRID, Layout.FLAT):
                return Layout.FLAT, None
            if layout in (Layout.LOGITS_GRID, Layout.LOGITS_FLAT):
                return Layout.LOGITS_FLAT, None
        if method in _FLATTEN and len(values) == 1 and literal_int(values[0]) == -1 and layout in (
                Layout.GRID, Layout.FLAT):
            return Layout.FLAT, None
        if method in _FLATTEN and len(values) == 2 and layout in (Layout.LOGITS_GRID, Layout.LOGITS_FLAT) and \
                literal_int(values[0]) == -1:
            try:  # any other vocabulary size makes cross_entropy raise
                self.position(values[1])
            except Refusal:
                self._outer(values[1])
            return Layout.LOGITS_FLAT, None
        if method in _FLATTEN and len(values) == 2 and layout in (Layout.FLAT, Layout.GRID):
            shape = tuple(None if literal_int(v) == -1 else self.position(v) for v in values)
            return Layout.GRID, ("grid", shape, code(node))
        if method in ("view_as", "reshape_as") and len(values) == 1:
            other = self.value(values[0])
            if isinstance(other, View | Tokens) and other.layout in (Layout.GRID, Layout.FLAT) and \
                    layout in (Layout.GRID, Layout.FLAT):
                return other.layout, None
            return None
        if method in ("transpose", "permute") and layout is Layout.LOGITS_GRID:
            axes = [literal_int(v) for v in values]
            if method == "transpose" and sorted(axes) in ([1, 2], [-2, -1], [1, -1], [-2, 2]):
                return Layout.CLASS_FIRST, None
            if method == "permute" and axes == [0, 2, 1]:
                return Layout.CLASS_FIRST, None
        return None

    # -- cross-entropy
    @staticmethod
    def _input_and_target(args) -> tuple[list[cst.BaseExpression], dict[str, cst.BaseExpression]]:
        """``([input, target], options)`` of a loss call, by position or by keyword, or ``([], {})``."""
        if any(a.star for a in args):
            return [], {}
        positional = [a.value for a in args if a.keyword is None]
        keywords = {a.keyword.value: a.value for a in args if a.keyword is not None}
        for name in ("input", "target")[len(positional):]:
            if name in keywords:
                positional.append(keywords.pop(name))
        return positional, keywords

    def _loss_module(self, node: cst.Call) -> tuple[LossSpelling, Sequence[cst.Arg]] | None:
        """``(spelling, constructor arguments)`` when ``node`` calls a name bound, once and before the loop,
        to a registered loss module that nothing changes or reads but its calls, else ``None``."""
        if not isinstance(node.func, cst.Name):
            return None
        name = node.func.value
        definition = reaching_definition(self.index, self.facts.point, name, changed_in_place)
        if definition.kind not in ("statement", "change") or not isinstance(definition.statement,
                                                                           cst.SimpleStatementLine):
            return None
        (small,) = definition.statement.body
        if definition.kind == "change":
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"`{name}` may be changed after it is built: "
                                                       f"`{code(small).strip()}`")
        if not m.matches(small, m.Assign(targets=[m.AssignTarget(m.Name(name))], value=m.Call())):
            return None
        loss = spelling(self.qualified(small.value.func), Form.MODULE)
        if loss is None:
            return None
        calls = {id(call.func) for call in m.findall(self.facts.point.scope, m.Call(func=m.Name(name)))}
        # Another read could alias the module (`c = criterion; c.ignore_index = 0`) or change it.
        other = {id(n) for n in m.findall(self.facts.point.scope, m.Name(name))} - calls - {id(small.targets[0].target)}
        other -= {id(a.attr) for a in m.findall(self.facts.point.scope, m.Attribute(attr=m.Name(name)))}
        other -= {id(a.keyword) for a in m.findall(self.facts.point.scope, m.Arg(keyword=m.Name(name)))}
        if other:
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"`{name}` is used other than called; its options may "
                                                       "change after it is built")
        for arg in small.value.args:
            if not self.facts.same_value(arg.value, definition.point):
                raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"`{code(arg.value)}`, read when `{name}` was built, "
                                                           "may have changed by the loop")
        return loss, small.value.args

    def loss_call(self, node: cst.Call, loss: LossSpelling, built: Sequence[cst.Arg] | None = None) -> Tokens | Total:
        """A registered loss called on ``node``'s input and target; its options are the call's keywords, or
        for a module the arguments it was ``built`` with."""
        positional, keywords = self._input_and_target(node.args)
        if len(positional) != 2:
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"`{code(node.func)}` must take its input and target (by "
                                                       "position or as input= and target=) and its options by "
                                                       "keyword")
        if built is not None:
            if keywords:
                raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"keyword `{sorted(keywords)[0]}` of a loss module call")
            if any(a.keyword is None for a in built):
                raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, "a loss module's options must be given by keyword")
            keywords = {a.keyword.value: a.value for a in built}
        reduction = self._check_keywords(keywords, loss.options)
        if not _is_zero(keywords.get("label_smoothing", cst.Integer("0"))):
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"{loss.suffix} keyword `label_smoothing` has no equivalent "
                                                       "in the utility")
        if "weight" in keywords and not m.matches(keywords["weight"], m.Name("None")):
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"{loss.suffix} keyword `weight` (class weights) has no "
                                                       "equivalent in the utility")
        logits = self._log_softmax(positional[0]) if loss.reads == "log_probs" else self.value(positional[0])
        tokens = self._per_token_loss(logits, self.value(positional[1]), keywords.get("ignore_index"), node)
        return Total(*self._total(tokens)) if reduction == "sum" else tokens  # "sum" is the per-token losses' sum

    def _log_softmax(self, node: cst.BaseExpression) -> View:
        """The logits whose log-probabilities ``node`` is (the input of a ``log_probs`` loss)."""
        value = self.value(node)
        if not isinstance(value, LogSoftmax):
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"nll_loss of `{code(node)}`, not of a log_softmax")
        return value.logits

    def _over_vocabulary(self, receiver, rest: Sequence[cst.Arg], node: cst.Call) -> LogSoftmax:
        """``log_softmax(receiver, *rest)``, which must be over the vocabulary of a view of the logits."""
        dims = [literal_int(a.value) for a in rest if a.keyword is None or a.keyword.value == "dim"]
        if isinstance(receiver, View) and receiver.layout is Layout.HEAD_SLICE:
            receiver = receiver.relayout(Layout.LOGITS_GRID)
        if len(rest) != 1 or len(dims) != 1 or not isinstance(receiver, View):
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"unsupported log_softmax `{code(node)}`")
        wanted = {Layout.LOGITS_FLAT: (-1, 1), Layout.LOGITS_GRID: (-1, 2), Layout.CLASS_FIRST: (1, -2)}
        if dims[0] not in wanted.get(receiver.layout, ()):
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"log_softmax `{code(node)}` is not over the vocabulary")
        return LogSoftmax(receiver)

    def _vocabulary_axis(self, receiver, rest: Sequence[cst.Arg], node: cst.Call, what: str) -> View:
        """The view of the logits ``receiver`` whose vocabulary axis ``rest`` (one ``dim``) names, or a refusal."""
        dims = [literal_int(a.value) for a in rest if a.keyword is None or a.keyword.value == "dim"]
        if isinstance(receiver, View) and receiver.layout is Layout.HEAD_SLICE:
            receiver = receiver.relayout(Layout.LOGITS_GRID)
        if len(rest) != 1 or len(dims) != 1 or not isinstance(receiver, View):
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"unsupported {what} `{code(node)}`")
        if receiver.layout is Layout.LOGITS_FLAT:
            raise Refusal(Code.LAYOUT, f"{what} `{code(node)}` on flattened rows: where the logits are longer than "
                                       "the labels, the loop pairs rows across the batch (gather takes a smaller "
                                       "index) and the call raises; gather on `[B, S-k, V]` to migrate")
        if receiver.layout is not Layout.LOGITS_GRID or dims[0] not in (-1, 2):
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"{what} `{code(node)}` is not over the vocabulary")
        return receiver

    def _logsumexp(self, receiver, rest: Sequence[cst.Arg], node: cst.Call) -> LogSumExp:
        return LogSumExp(self._vocabulary_axis(receiver, rest, node, "logsumexp"))

    def _gather(self, receiver: LogSoftmax | View, node: cst.Call) -> Gathered:
        """``receiver.gather(-1, y.unsqueeze(-1))`` (or ``y[..., None]``) over the vocabulary, ``y`` per token."""
        if len(node.args) != 2 or any(a.star or a.keyword is not None for a in node.args):
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"unsupported gather `{code(node)}`")
        logits = receiver.logits if isinstance(receiver, LogSoftmax) else receiver
        logits = self._vocabulary_axis(logits, node.args[:1], node, "gather")
        index = node.args[1].value
        if m.matches(index, m.Call(func=m.Attribute(attr=m.Name("unsqueeze")), args=[m.Arg(keyword=None)])):
            labels, axis = self.value(index.func.value), literal_int(index.args[0].value)
        elif m.matches(index, m.Subscript(slice=[m.SubscriptElement(m.Index(m.Ellipsis())),
                                                 m.SubscriptElement(m.Index(m.Name("None")))])):
            labels, axis = self.value(index.value), -1
        else:
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"gather `{code(node)}` at an index other than "
                                                       "`labels.unsqueeze(-1)`")
        if isinstance(labels, View) and labels.layout is Layout.HEAD_SLICE:
            labels = labels.relayout(Layout.GRID)
        if not isinstance(labels, View) or labels.layout is not Layout.GRID or axis not in (-1, 2):
            raise Refusal(Code.LAYOUT, f"gather `{code(node)}`: its index is not one label per row of the logits")
        return Gathered(logits, labels, isinstance(receiver, LogSoftmax))

    def _squeezed(self, receiver: Gathered, node: cst.Call) -> Gathered:
        """``gathered.squeeze(-1)``: one value per token, the labels' shape."""
        axes = [literal_int(a.value) for a in node.args if a.keyword is None or a.keyword.value == "dim"]
        if m.matches(node.func, m.Attribute(attr=m.Name("squeeze"))) and len(node.args) == 1 and \
                not receiver.squeezed and axes and axes[0] in (-1, 2):
            return self._written_out(receiver._replace(squeezed=True), node)
        raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"`{code(node)}` on a gathered value")

    def _written_out(self, gathered: Gathered, node: cst.CSTNode) -> Gathered | Tokens:
        """The cross-entropy once a gather of log-probabilities is squeezed and negated (as nll_loss is): on the
        labels the loop gathers at (``clamp_min(0)`` included), no one of which is ignore_index where it returns."""
        if gathered.log_probs and gathered.squeezed and gathered.negated:
            return self._per_token_loss(gathered.logits, gathered.labels, None, node, gathered=True)
        return gathered

    def _check_keywords(self, keywords: dict, allowed: set[str]) -> Literal["none", "sum"]:
        """The call's reduction, once its keywords are known to have an equivalent."""
        extra = sorted(set(keywords) - allowed)
        if extra:
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, f"keyword `{extra[0]}` has no equivalent in the utility")
        reduction = string_value(keywords.get("reduction", cst.SimpleString('""')))
        if reduction not in ("none", "sum"):
            raise Refusal(Code.REDUCTION, "a reduction other than the literal 'none' or 'sum'")
        return reduction

    def _per_token_loss(self, logits, labels, ignore, node, gathered=False) -> Tokens:
        """The cross-entropy of each row of ``logits`` at its label: as ``cross_entropy`` reads them, or, ``gathered``,
        as a gather of log-probabilities at the labels does."""
        rows = _GATHERED if gathered else _CALL_ROWS
        if not (isinstance(logits, View) and isinstance(labels, View)):
            raise Refusal(Code.HEAD_INDEXING, f"`{code(node)}` is not on a slice of the logits and of the labels")
        if logits.layout is Layout.HEAD_SLICE:
            logits = logits.relayout(Layout.LOGITS_GRID)
        layout = rows.get(logits.layout)
        layout = layout if layout is labels.layout else None
        if layout is None:
            raise Refusal(Code.LAYOUT, f"`{code(node)}`: the logits are {logits.layout.value} and the labels "
                                       f"{labels.layout.value}, not one row per token")
        if any(op.kind not in ("precision",) for op in logits.ops):
            raise Refusal(Code.VALUE_CAST, f"`{code(node)}` changes the logits' values")
        if ignore is not None:
            self._outer(ignore)
        found = CrossEntropy(logits, labels, ignore, "-100" if ignore is None else code(ignore), gathered)
        if self.cross_entropy not in (None, found):
            raise Refusal(Code.CROSS_ENTROPY_ARGUMENTS, "two different cross-entropies in one loop")
        self.cross_entropy = found
        return Tokens((found,), layout)

    # -- arithmetic
    def _tokens(self, value) -> Tokens:
        if isinstance(value, Tokens):
            return value
        if isinstance(value, View):
            if value.layout is Layout.HEAD_SLICE:  # a per-head slice of a [B, S, n] tensor
                value = value.relayout(Layout.GRID)
            if value.layout not in (Layout.GRID, Layout.FLAT):
                raise Refusal(Code.LAYOUT, f"`{value.base.text}` is used per token with layout {value.layout.value}")
            return Tokens((value.as_factor(),), value.layout, value.shape_checks)
        raise Refusal(Code.LAYOUT, "a per-token product of something that is not per token")

    def _total(self, value) -> tuple[tuple, tuple]:
        tokens = self._tokens(value)
        return tokens.factors, tokens.shape_checks

    def _is_head_scale(self, node: cst.BaseExpression) -> bool:
        """A number of the head alone: literals, the loop variable and outside names combined by arithmetic and
        ``[index]``, with no call (the rewrite evaluates it again, for every head)."""
        if self.index.reads(node) & (set(self.env) | self.accumulators):
            return False
        if isinstance(node, cst.Name | cst.Integer | cst.Float):
            return True
        if isinstance(node, cst.Attribute):
            return self._is_head_scale(node.value)
        if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus | cst.Plus):
            return self._is_head_scale(node.expression)
        if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, _SCALE_OPERATORS):
            return self._is_head_scale(node.left) and self._is_head_scale(node.right)
        if isinstance(node, cst.Subscript) and len(node.slice) == 1 and isinstance(node.slice[0].slice, cst.Index):
            return self._is_head_scale(node.value) and self._is_head_scale(node.slice[0].slice.value)
        return False

    def _scaled(self, node: cst.BinaryOperation) -> Ratio | None:
        """``scale * ratio`` or ``ratio * scale`` with a per-head number (see ``HeadScale``), or ``None``."""
        for scale, ratio, template in ((node.left, node.right, "{scale} * {{}}"),
                                       (node.right, node.left, "{{}} * {scale}")):
            if not self._is_head_scale(scale) or self._is_head_scale(ratio):
                continue
            value = self.value(ratio)
            if isinstance(value, Ratio) and value.scale is None:
                self._outer_names_of(scale)
                text = code(scale) if not isinstance(scale, cst.BinaryOperation) or scale.lpar else f"({code(scale)})"
                return Ratio(value.numerator, value.denominator, HeadScale(scale, template.format(scale=text)))
        return None

    def _where_arguments(self, node: cst.Call) -> tuple[Total, cst.BaseExpression, cst.BaseExpression]:
        """``(sum, chosen, other)`` of ``torch.where(sum > 0, chosen, other)``, or a refusal."""
        if len(node.args) != 3 or any(a.keyword is not None or a.star for a in node.args):
            raise Refusal(Code.GUARD, f"unsupported `{code(node)}`")
        condition, chosen, other = (a.value for a in node.args)
        total = self._guard_total(condition)
        if total is None:
            raise Refusal(Code.GUARD, f"`{code(node)}` selects on something other than a sum being > 0")
        return total, chosen, other

    def _safe_denominator(self, node: cst.Call) -> Total:
        """``torch.where(d > 0, d, 1)``: the sum ``d``, made safe to divide by where it is not > 0."""
        total, chosen, other = self._where_arguments(node)
        value = self.value(chosen)
        if not isinstance(value, Total) or value.factors != total.factors or literal_number(other) in (None, 0):
            raise Refusal(Code.GUARD, f"`{code(node)}` is not `torch.where(d > 0, d, 1)` of a sum d")
        return Total(value.factors, value.shape_checks, safe=True)

    def where_guarded(self, node: cst.BaseExpression) -> tuple[Ratio, Total] | None:
        """``(ratio, guard)`` of ``torch.where(d > 0, n / safe_d, 0)``, a refusal for the single-``where`` form
        (its unselected ``n / d`` gives NaN gradients where d is 0), ``None`` if not a ``torch.where``."""
        if not isinstance(node, cst.Call) or self.qualified(node.func) != {TORCH_WHERE}:
            return None
        total, chosen, other = self._where_arguments(node)
        ratio = self.value(chosen)
        if not isinstance(ratio, Ratio) or not _is_zero(other):
            raise Refusal(Code.GUARD, f"`{code(node)}` is not `torch.where(d > 0, ratio, 0)`")
        if not ratio.denominator.safe:
            raise Refusal(Code.GUARD, f"`{code(node)}` divides by the sum where it is 0 too: the unselected "
                                      "division's gradient is NaN (divide by `torch.where(d > 0, d, 1)`)")
        return ratio, total

    def _outer_names_of(self, node: cst.BaseExpression) -> None:
        """Record the outside names a head scale reads (the loop must not rebind them)."""
        self.outer_names |= self.index.reads(node) - {self.loop_name}

    def binary(self, node: cst.BinaryOperation):
        if isinstance(node.operator, cst.Multiply):
            scaled = self._scaled(node)
            if scaled is not None:
                return scaled
        left, right = self.value(node.left), self.value(node.right)
        if isinstance(node.operator, cst.Multiply | cst.BitAnd):
            a, b = self._tokens(left), self._tokens(right)
            if isinstance(node.operator, cst.BitAnd) and not all(
                    isinstance(f, View) and f.boolean for f in (*a.factors, *b.factors)):
                raise Refusal(Code.VALUE_CAST, f"`{code(node)}`: `&` of values that may not be 0/1")
            if a.layout is not b.layout:
                raise Refusal(Code.LAYOUT, f"`{code(node)}` multiplies a {a.layout.value} tensor with a "
                                           f"{b.layout.value} one")
            return Tokens(tuple(sorted((*a.factors, *b.factors), key=repr)), a.layout,
                          (*a.shape_checks, *b.shape_checks))
        if isinstance(node.operator, cst.Subtract) and isinstance(left, LogSumExp) and isinstance(right, Gathered) \
                and not right.log_probs and right.squeezed and right.logits == left.logits:
            return self._per_token_loss(left.logits, right.labels, None, node, gathered=True)
        if isinstance(node.operator, cst.Divide) and isinstance(left, Total):
            if isinstance(right, Total):
                return Ratio(left, right)
            raise Refusal(Code.GUARD, f"`{code(node)}` divides by something other than a sum over the tokens "
                                      "(an epsilon, a clamp or a count)")
        raise Refusal(Code.REDUCTION, f"unsupported arithmetic `{code(node)}`")

    def comparison(self, node: cst.Comparison):
        if len(node.comparisons) != 1:
            raise Refusal(Code.STATEMENT, f"unsupported comparison `{code(node)}`")
        target = node.comparisons[0]
        operator = _COMPARE_OPERATORS.get(type(target.operator))
        left_mentions = self._mentions_loop(node.left)
        tensor, other = (node.left, target.comparator) if left_mentions else (target.comparator, node.left)
        if operator is None or self._mentions_loop(other) or (not left_mentions and operator not in ("==", "!=")):
            raise Refusal(Code.STATEMENT, f"unsupported comparison `{code(node)}`")
        self._outer(other)
        value = self.value(tensor)
        op = _compare(operator, code(other))
        if isinstance(value, View):
            return _decided(value, op, node)
        raise Refusal(Code.STATEMENT, f"unsupported comparison `{code(node)}`")

    # -- statements
