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
from mtp_migrate.mtp_loop.symbolic import Accumulation, Head0Metric, K, Lin, Outer, Ratio, Total
from mtp_migrate.refusals import Code, Refusal


class LoopEvaluator(ExpressionEvaluator):
    """Walks ``for k in range(...)`` once, symbolically, collecting what it accumulates."""

    def __init__(self, loop: cst.For, accumulators: set[str], facts: Facts):
        super().__init__(accumulators, facts)
        self.accumulations: list[Accumulation] = []
        self.head0: list[Head0Metric] = []
        self.top_level: list[str] = []  # tensors bound at the top level of the body, in order
        self.length_guards: list[Lin] = []  # each must be S - k once dimensions are resolved
        self.count_name: str | None = None  # `n` of `range(1, (n := ...) + 1)`
        self.loop_name, self.head_offset, self.head_count = self._range(loop)

    # -- the loop header
    def _range(self, loop: cst.For) -> tuple[str, int, cst.BaseExpression]:
        if not isinstance(loop.target, cst.Name) or loop.orelse is not None:
            raise Refusal(Code.LOOP_HEADER, "the head loop must be `for k in range(...)` without `else`")
        heads = loop.iter
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
        args = [a.value for a in heads.args]
        if len(args) == 3 and literal_int(args[2]) == 1:
            args = args[:2]  # an explicit step of 1
        self.loop_name = loop.target.value
        if len(args) == 2 and literal_int(args[0]) == 1 and m.matches(
                args[1], m.BinaryOperation(operator=m.Add())) and literal_int(args[1].right) == 1:
            self.head_offset = 0  # k runs 1..n
            return loop.target.value, 0, self._count(args[1].left)
        if len(args) == 1 or (len(args) == 2 and literal_int(args[0]) == 0):
            self.head_offset = 1  # k = var + 1
            return loop.target.value, 1, self._count(args[-1])
        raise Refusal(Code.LOOP_HEADER, f"unsupported head range `{code(loop.iter)}`")

    def _count(self, node: cst.BaseExpression) -> cst.BaseExpression:
        if isinstance(node, cst.NamedExpr):
            self.env[node.target.value] = self.position(node.value)
            self.count_name = node.target.value
            return node.value
        self._outer(node)
        return node

    # -- integer positions
    def run(self, body, guard: Total | None = None, top: bool = True) -> None:
        for statement in body:
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
        if isinstance(small, cst.AugAssign) and isinstance(small.target, cst.Name) and \
                small.target.value in self.accumulators:
            if not isinstance(small.operator, cst.AddAssign):
                raise Refusal(Code.ACCUMULATOR, f"`{code(small).strip()}` is not a sum over heads")
            if small.target.value in self.index.reads(small.value):
                raise Refusal(Code.ACCUMULATOR, f"`{code(small).strip()}` reads its own accumulator")
            return self.accumulate(small.target.value, small.value, guard, small)
        if isinstance(small, cst.Del | cst.Pass):
            return None
        text = code(small).strip()
        used = sorted(self.index.reads(small) & set(self.env))
        if used:
            raise Refusal(Code.PER_HEAD_VALUE_USED, f"per-head value `{used[0]}` is used elsewhere: `{text}`")
        raise Refusal(Code.STATEMENT, f"statement with effects the rewrite would drop: `{text}`")

    @staticmethod
    def _single_name(small) -> str | None:
        if isinstance(small, cst.Assign) and len(small.targets) == 1 and isinstance(small.targets[0].target, cst.Name):
            return small.targets[0].target.value
        if isinstance(small, cst.AnnAssign) and isinstance(small.target, cst.Name):
            return small.target.value
        return None

    def accumulate(self, name: str, node, guard, small) -> None:
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

    def _guard_total(self, test) -> Total | None:
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


def evaluate(loop: cst.For, accumulators: set[str], facts: Facts) -> LoopEvaluator:
    evaluator = LoopEvaluator(loop, accumulators, facts)
    evaluator.run(list(loop.body.body))
    return evaluator

