"""Evaluate a head loop's body symbolically: loop body -> accumulations.

Every statement must be understood, or the site is refused with a reason: a call with
effects, a per-head value used elsewhere or another reduction would otherwise be
silently dropped by the rewrite. The expressions are ``ExpressionEvaluator``'s business.
"""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m

from mtp_migrate.cst_utils import code, literal_int
from mtp_migrate.mtp_loop.expressions import ExpressionEvaluator, _is_zero
from mtp_migrate.mtp_loop.facts import Facts
from mtp_migrate.mtp_loop.symbolic import (
    Accumulation,
    Head0Metric,
    K,
    Layout,
    Lin,
    Outer,
    Ratio,
    Total,
    View,
)
from mtp_migrate.refusals import Code, Refusal


class LoopEvaluator(ExpressionEvaluator):
    """Walks ``for k in range(...)`` once, symbolically, collecting what it accumulates."""

    def __init__(self, loop: cst.For, accumulators: set[str], facts: Facts, lists: set[str]):
        super().__init__(accumulators, facts)
        self.lists = lists  # accumulators that start as `[]`: appended to, and summed after the loop
        self.accumulations: list[Accumulation] = []
        self.head0: list[Head0Metric] = []
        self.top_level: list[str] = []  # tensors bound at the top level of the body, in order
        self.length_guards: list[Lin] = []  # each must be S - k once dimensions are resolved
        self.count_name: str | None = None  # `n` of `range(1, (n := ...) + 1)`
        self.zipped = False  # `zip(range(...), logits.unbind(2))`: as many heads as the shorter has
        self.loop_name, self.head_offset, self.head_count = self._range(loop)

    # -- the loop header
    def _range(self, loop: cst.For) -> tuple[str, int, cst.BaseExpression]:
        if loop.orelse is None and self._unbound_heads(loop):
            return self.loop_name, self.head_offset, self.head_count
        if not isinstance(loop.target, cst.Name) or loop.orelse is not None:
            raise Refusal(Code.LOOP_HEADER, "the head loop must be `for k in range(...)` without `else`")
        heads = self._range_name(loop.iter)
        # The same heads in a list, a tuple or the other order: only the sums' order can change.
        while m.matches(heads, m.Call(args=[m.Arg(keyword=None, star="")])) and self.qualified(heads.func) in (
                {"builtins.list"}, {"builtins.tuple"}, {"builtins.reversed"}):
            heads = heads.args[0].value
        if m.matches(heads, m.Call(func=m.Name("list") | m.Name("tuple") | m.Name("reversed") | m.Name("range"))) and \
                self.qualified(heads.func) != {f"builtins.{heads.func.value}"}:
            raise Refusal(Code.LOOP_HEADER, f"the head loop iterates over `{code(loop.iter)}`, and `{heads.func.value}`"
                                            " there is not the builtin")
        if not isinstance(heads, cst.Call) or self.qualified(heads.func) != {"builtins.range"} or any(
                a.keyword or a.star for a in heads.args):
            raise Refusal(Code.LOOP_HEADER, f"the head loop iterates over `{code(loop.iter)}`, not range(...)")
        self.loop_name = loop.target.value
        self.head_offset, count = self._heads(heads, loop)
        return self.loop_name, self.head_offset, self._count(count)

    @staticmethod
    def _heads(heads: cst.Call, loop: cst.For) -> tuple[int, cst.BaseExpression]:
        """``(offset, n)`` of ``range(1, n + 1)`` (offset 0: k runs 1..n) or ``range(n)`` and ``range(0, n)``
        (offset 1: k = var + 1); any other range refuses."""
        args = [a.value for a in heads.args]
        if len(args) == 3 and literal_int(args[2]) == 1:
            args = args[:2]  # an explicit step of 1
        if len(args) == 2 and literal_int(args[0]) == 1 and m.matches(
                args[1], m.BinaryOperation(operator=m.Add())) and literal_int(args[1].right) == 1:
            return 0, args[1].left
        if len(args) == 1 or (len(args) == 2 and literal_int(args[0]) == 0):
            return 1, args[-1]
        raise Refusal(Code.LOOP_HEADER, f"unsupported head range `{code(loop.iter)}`")

    def _range_name(self, heads: cst.BaseExpression) -> cst.BaseExpression:
        """``heads`` of ``heads = range(...)`` before the loop: that range, where what it reads is unchanged."""
        if not isinstance(heads, cst.Name):
            return heads
        definition = self.facts.definition(heads.value)
        if definition.kind != "statement" or not m.matches(definition.statement, m.SimpleStatementLine(
                body=[m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call())])):
            return heads
        value = definition.statement.body[0].value
        if self.qualified(value.func) != {"builtins.range"} or m.findall(value, m.NamedExpr()) or \
                not self.facts.same_value(value, definition.point):
            return heads
        return value

    def _unbound_heads(self, loop: cst.For) -> bool:
        """``for k, logits_k in enumerate(logits.unbind(2))``: the heads of the logits, ``k`` from 0 and
        ``logits_k`` the whole of head ``k + 1`` (``unbind(dim=2)`` too); or ``zip(range(...), logits.unbind(2))``
        with ``k`` as the range gives it (see ``_heads``). Binds the loop's state; False for another header, a
        ``Refusal`` (as ``_heads`` raises) for such a zip over a range it cannot read."""
        unbound = m.Arg(keyword=None, star="", value=m.Call(func=m.Attribute(attr=m.Name("unbind")),
                                                             args=[m.Arg(star="")]))
        enumerated = m.Call(func=m.Name("enumerate"), args=[unbound])
        zipped = m.Call(func=m.Name("zip"), args=[m.Arg(keyword=None, star="", value=m.Call(func=m.Name("range"))),
                                                  unbound])
        if not m.matches(loop.target, m.Tuple(elements=[m.Element(m.Name()), m.Element(m.Name())])) or \
                not m.matches(loop.iter, enumerated | zipped) or \
                self.qualified(loop.iter.func) != {f"builtins.{loop.iter.func.value}"}:
            return False
        heads = loop.iter.args[0].value if loop.iter.func.value == "zip" else None
        if heads is not None and (self.qualified(heads.func) != {"builtins.range"} or any(
                a.keyword or a.star for a in heads.args)):
            return False
        unbind = loop.iter.args[-1].value
        (axis,) = unbind.args
        if (axis.keyword is not None and axis.keyword.value != "dim") or literal_int(axis.value) != 2:
            return False
        number, tensor = (element.value.value for element in loop.target.elements)
        logits = unbind.func.value
        if number == tensor or self.index.reads(logits) & {number, tensor}:
            return False
        self.loop_name, self.head_offset = number, 1
        self.head_count = cst.Subscript(cst.Attribute(logits, cst.Name("shape")),
                                        [cst.SubscriptElement(cst.Index(cst.Integer("2")))])
        if heads is not None:  # zip stops at the shorter: the classifier checks the range covers the heads
            self.head_offset, count = self._heads(heads, loop)
            self.head_count = self._count(count)
            self.zipped = True
        self.env[tensor] = View(self._outer(logits), Lin(), None, Lin.of(K, 1, -1), Layout.HEAD_SLICE)
        return True

    def _count(self, node: cst.BaseExpression) -> cst.BaseExpression:
        if isinstance(node, cst.NamedExpr):
            self.env[node.target.value] = self.position(node.value)
            self.count_name = node.target.value
            return node.value
        self._outer(node)
        return node

    # -- integer positions
    def run(self, body, guard: Total | None = None, top: bool = True) -> None:
        body = list(body)
        for position, statement in enumerate(body):
            skipped = self._skip_guard(statement)
            if skipped is not None:  # `if mask_sum <= 0: continue`: the rest runs where the sum is > 0
                if guard is not None:
                    raise Refusal(Code.GUARD, "nested guards in the head loop")
                return self.run(body[position + 1:], skipped, top=False)
            if isinstance(statement, cst.SimpleStatementLine):
                for small in statement.body:
                    self.small_statement(small, guard, top)
            elif isinstance(statement, cst.If):
                self.if_statement(statement, guard)
            else:
                first = code(statement).strip().splitlines()[0]
                raise Refusal(Code.STATEMENT, f"unsupported statement in the head loop: `{first}`")

    def small_statement(self, small, guard, top) -> None:
        if isinstance(small, cst.Assign | cst.AnnAssign) and self._single_name(small) is not None:
            name = self._single_name(small)
            if small.value is None:
                return
            if name in self.accumulators:
                if name in self.lists:
                    raise Refusal(Code.ACCUMULATOR, f"the list `{name}` is rebound in the loop, not appended to")
                if not (isinstance(small, cst.Assign) and isinstance(small.value, cst.BinaryOperation)
                        and isinstance(small.value.operator, cst.Add)):
                    raise Refusal(Code.ACCUMULATOR, f"`{name}` is reassigned inside the loop")
                value = small.value
                if m.matches(value.left, m.Name(name)) and name not in self.index.reads(value.right):
                    return self.accumulate(name, value.right, guard, small)
                if m.matches(value.right, m.Name(name)) and name not in self.index.reads(value.left):
                    return self.accumulate(name, value.left, guard, small)
                raise Refusal(Code.ACCUMULATOR, f"`{name}` is reassigned inside the loop")
            if name == self.loop_name or name in self.outer_names:
                raise Refusal(Code.STATEMENT, f"the loop rebinds `{name}`, which it also reads from outside")
            try:
                value = self.position(small.value)
            except Refusal:
                value = self.value(small.value)
            self.env[name] = value
            if top and guard is None and not isinstance(value, Lin | Outer):
                self.top_level.append(name)
            return None
        if m.matches(small, m.Expr(m.Call(func=m.Attribute(value=m.Name(), attr=m.Name("append")),
                                          args=[m.Arg(keyword=None, star="")]))) and \
                small.value.func.value.value in self.accumulators:
            name = small.value.func.value.value
            if name not in self.lists or name in self.index.reads(small.value.args[0].value):
                raise Refusal(Code.ACCUMULATOR, f"`{code(small).strip()}` is not an append to a list that starts empty")
            try:
                appended = self.value(small.value.args[0].value)
            except Refusal:
                appended = None
            if not isinstance(appended, Ratio):  # a per-head tensor kept, not a loss summed
                return self._used_elsewhere(small)
            return self.accumulate(name, small.value.args[0].value, guard, small)
        if isinstance(small, cst.AugAssign) and isinstance(small.target, cst.Name) and \
                small.target.value in self.accumulators:
            if small.target.value in self.lists or not isinstance(small.operator, cst.AddAssign):
                raise Refusal(Code.ACCUMULATOR, f"`{code(small).strip()}` is not a sum over heads")
            if small.target.value in self.index.reads(small.value):
                raise Refusal(Code.ACCUMULATOR, f"`{code(small).strip()}` reads its own accumulator")
            return self.accumulate(small.target.value, small.value, guard, small)
        if isinstance(small, cst.Del | cst.Pass) or (isinstance(small, cst.Assert) and self._shape_only(small)):
            return None  # an assert on shapes checks what the utility checks; `python -O` drops it too
        return self._used_elsewhere(small)

    def _used_elsewhere(self, small) -> None:
        text = code(small).strip()
        used = sorted(self.index.reads(small) & set(self.env))
        if used:
            raise Refusal(Code.PER_HEAD_VALUE_USED, f"per-head value `{used[0]}` is used elsewhere: `{text}`")
        raise Refusal(Code.STATEMENT, f"statement with effects the rewrite would drop: `{text}`")

    def _shape_only(self, node: cst.Assert) -> bool:
        """An assertion on shapes: no call but ``size``, ``dim``, ``numel`` and ``len``, and every per-head
        value read only through its shape (``ce.shape``, ``ce.size(0)``, ``len(ce)``), never its values."""
        for call in m.findall(node, m.Call()):
            if not (m.matches(call.func, m.Attribute(attr=m.Name("size") | m.Name("dim") | m.Name("numel")))
                    or self.qualified(call.func) == {"builtins.len"}):
                return False
        if m.findall(node, m.Await() | m.Yield() | m.NamedExpr() | m.Lambda()):
            return False
        shape_of = m.Attribute(value=m.Name(), attr=m.Name("shape") | m.Name("ndim") | m.Name("size") | m.Name(
            "dim") | m.Name("numel"))
        through_shape = {id(a.value) for a in m.findall(node, shape_of)}
        through_shape |= {id(c.args[0].value) for c in m.findall(node, m.Call(func=m.Name("len"), args=[m.Arg(
            m.Name())]))}
        per_head = set(self.env) | self.accumulators | {self.loop_name}
        return all(id(name) in through_shape for name in m.findall(node, m.Name()) if name.value in per_head)

    @staticmethod
    def _single_name(small) -> str | None:
        if isinstance(small, cst.Assign) and len(small.targets) == 1 and isinstance(small.targets[0].target, cst.Name):
            return small.targets[0].target.value
        if isinstance(small, cst.AnnAssign) and isinstance(small.target, cst.Name):
            return small.target.value
        return None

    def accumulate(self, name: str, node, guard, small) -> None:
        where = self.where_guarded(node)
        if where is not None:
            if guard is not None:
                raise Refusal(Code.GUARD, "nested guards in the head loop")
            value, guard = where
            self.accumulations.append(Accumulation(name, value, guard, small, where=True))
            return
        if literal_int(node) == 1:
            value = 1
        else:
            value = self.value(node)
            if not isinstance(value, Ratio):
                raise Refusal(Code.REDUCTION, f"`{name}` accumulates `{code(node)}`, not a per-head ratio of sums "
                                              "(a token mean across heads?)")
        self.accumulations.append(Accumulation(name, value, guard, small))

    def if_statement(self, node: cst.If, guard, head0: bool = False) -> None:
        if node.orelse is not None:
            raise Refusal(Code.STATEMENT, "an `if` with `else` in the head loop")
        test = node.test
        if m.matches(node.body, m.IndentedBlock(body=[m.SimpleStatementLine(body=[m.Continue()])])) or m.matches(
                node.body, m.SimpleStatementSuite(body=[m.Continue()])):
            if not self._is_length_guard(test):
                raise Refusal(Code.STATEMENT, f"`continue` on `{code(test)}`, not on an empty head")
            return None
        body = node.body.body if isinstance(node.body, cst.IndentedBlock) else [cst.SimpleStatementLine(node.body.body)]
        total = self._guard_total(test)
        if total is not None:
            if guard is not None:
                raise Refusal(Code.GUARD, "nested guards in the head loop")
            if head0:
                return self.head0_block(body, total)
            return self.run(body, total, top=False)
        if self._is_first_head(test):
            return self.head0_block(body, guard)
        raise Refusal(Code.STATEMENT, f"unsupported condition in the head loop: `{code(test)}`")

    def _skip_guard(self, statement) -> Total | None:
        """The sum of ``if not total > 0: continue``, or of ``if total <= 0: continue`` where the total is of 0/1
        values (a NaN sum would pass ``<= 0`` and fail ``> 0``), else ``None``."""
        if not m.matches(statement, m.If(orelse=None, body=m.IndentedBlock(body=[m.SimpleStatementLine(
                body=[m.Continue()])]) | m.SimpleStatementSuite(body=[m.Continue()]))):
            return None
        test = statement.test
        if m.matches(test, m.UnaryOperation(operator=m.Not())):
            return self._guard_total(test.expression)
        if not m.matches(test, m.Comparison(comparisons=[m.ComparisonTarget(operator=m.LessThanEqual())])) or \
                not _is_zero(test.comparisons[0].comparator) or not self._mentions_loop(test.left):
            return None
        total = self._guard_total(test.with_changes(comparisons=[
            test.comparisons[0].with_changes(operator=cst.GreaterThan())]))
        if total is not None and not all(isinstance(f, View) and f.nonnegative for f in total.factors):
            raise Refusal(Code.GUARD, f"`{code(test)}`: skipping the head where a sum is not > 0 differs from "
                                      "`<= 0` where it is NaN, and its values are not provably 0 or 1")
        return total

    def _guard_total(self, test) -> Total | None:
        """The sum ``test`` requires to be positive: ``total > 0``, ``0 < total``, ``total.gt(0)``."""
        if m.matches(test, m.Call(func=m.Attribute(attr=m.Name("gt")), args=[m.Arg(keyword=None, star="")])) and \
                _is_zero(test.args[0].value):
            test = cst.Comparison(test.func.value, [cst.ComparisonTarget(cst.GreaterThan(), test.args[0].value)])
        if m.matches(test, m.Comparison(comparisons=[m.ComparisonTarget(operator=m.LessThan())])) and \
                _is_zero(test.left):
            test = cst.Comparison(test.comparisons[0].comparator, [cst.ComparisonTarget(cst.GreaterThan(), test.left)])
        if not m.matches(test, m.Comparison(comparisons=[m.ComparisonTarget(operator=m.GreaterThan())])):
            return None
        if not _is_zero(test.comparisons[0].comparator):
            return None
        left = test.left
        if m.matches(left, m.Call(func=m.Attribute(attr=m.Name("item")), args=[])):
            left = left.func.value
        try:
            total = self.value(left)
        except Refusal:
            return None
        return total if isinstance(total, Total) else None

    def _is_first_head(self, test) -> bool:
        if not m.matches(test, m.Comparison(comparisons=[m.ComparisonTarget(operator=m.Equal())])):
            return False
        try:
            return self.position(test.left) - self.position(test.comparisons[0].comparator) == Lin.of(K, 1, -1)
        except Refusal:
            return False

    def _is_length_guard(self, test) -> bool:
        """``S - k <= 0`` in any spelling: ``valid_len <= 0``, ``valid_len < 1``, ``k >= seq_len``."""
        if not isinstance(test, cst.Comparison) or len(test.comparisons) != 1:
            return False
        operator, bound = test.comparisons[0].operator, test.comparisons[0].comparator
        try:
            left, right = self.position(test.left), self.position(bound)
        except Refusal:
            return False
        normalized = {cst.LessThanEqual: left - right, cst.LessThan: left - right + Lin((), 1),
                      cst.GreaterThanEqual: right - left, cst.GreaterThan: right - left + Lin((), 1)}.get(
            type(operator))
        if normalized is None:
            return False
        self.length_guards.append(normalized)
        return True

    def head0_block(self, body, guard) -> None:
        for statement in body:
            if isinstance(statement, cst.If) and guard is None:
                self.if_statement(statement, guard, head0=True)
                continue
            if not m.matches(statement, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
                raise Refusal(Code.HEAD0_METRIC, "unsupported statement in the head-0 block")
            assign = statement.body[0]
            name = assign.targets[0].target.value
            value, item = assign.value, False
            if m.matches(value, m.Call(func=m.Attribute(attr=m.Name("item")), args=[])):
                value, item = value.func.value, True
            result = self.value(value)
            if isinstance(result, Ratio):
                if name in self.accumulators or name in self.env:
                    raise Refusal(Code.HEAD0_METRIC, f"the head-0 metric `{name}` is also a per-head value")
                self.head0.append(Head0Metric(name, result, item, guard))
            elif item or name in self.outer_names or name == self.loop_name or name in self.accumulators:
                raise Refusal(Code.HEAD0_METRIC, f"unsupported head-0 metric `{code(assign.value)}`")
            else:
                self.env[name] = result


def evaluate(loop: cst.For, accumulators: set[str], facts: Facts, lists: set[str]) -> LoopEvaluator:
    evaluator = LoopEvaluator(loop, accumulators, facts, lists)
    evaluator.run(list(loop.body.body))
    return evaluator

