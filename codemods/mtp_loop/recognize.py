"""Recognise MTP loss sites by data flow and describe them as a ``LoopSpec``.

The head loop is evaluated symbolically. Position indices are linear forms in the head
number ``k`` (1-based) and the sequence length ``S``; per-token tensors are products of
factors (the cross-entropy, a mask, weights, ``labels != ignore_index``); sums of them,
their ratios, guards on those sums and accumulations follow. Every statement of the site
must be understood: anything else (a call with effects, a per-head value used elsewhere,
another reduction) refuses the site with a reason, so a rewrite never drops behaviour.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import libcst as cst
import libcst.matchers as m
from libcst.metadata import PositionProvider

from codemods.mtp_loop.spec import LoopSpec, Refusal, Site

# Methods that change dtype, layout or autograd history but not the per-token values.
_TRANSPARENT_METHODS = {"float", "double", "half", "bfloat16", "to", "type_as", "reshape", "view", "flatten",
                        "contiguous", "view_as", "reshape_as"}
_CROSS_ENTROPY_NAMES = {"F.cross_entropy", "torch.nn.functional.cross_entropy", "nn.functional.cross_entropy",
                        "functional.cross_entropy", "cross_entropy"}


def code(node: cst.CSTNode) -> str:
    return cst.Module(body=[]).code_for_node(node)


def dotted(node: cst.BaseExpression) -> str | None:
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        inner = dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr.value}"
    return None


# ---------------------------------------------------------------- symbolic values


@dataclass(frozen=True)
class Lin:
    """``k*head + s*S + c``: a position index in terms of the head and sequence length."""

    k: int = 0
    s: int = 0
    c: int = 0

    def __add__(self, other: Lin) -> Lin:
        return Lin(self.k + other.k, self.s + other.s, self.c + other.c)

    def __neg__(self) -> Lin:
        return Lin(-self.k, -self.s, -self.c)

    def __sub__(self, other: Lin) -> Lin:
        return self + -other


LENGTH = Lin(k=-1, s=1)  # positions per head: S - k
SEQ = Lin(s=1)


@dataclass(frozen=True)
class Outer:
    """A tensor from outside the loop, referred to by its expression."""

    node: cst.BaseExpression


@dataclass(frozen=True)
class View:
    """``base[:, start:start+S-k]`` (``head`` is False) or ``base[:, ..., k-1]`` (``head`` True)."""

    base: str
    start: Lin
    head: bool
    detached: bool = False


@dataclass(frozen=True)
class Tokens:
    """A per-token product; ``factors`` is a sorted tuple of hashable factor tuples."""

    factors: tuple


@dataclass(frozen=True)
class Total:
    factors: tuple


@dataclass(frozen=True)
class Ratio:
    numerator: tuple
    denominator: tuple


@dataclass(frozen=True)
class Accumulation:
    value: Ratio | int  # a ratio, or 1 for a head counter
    guard: tuple | None  # the factors of the sum that must be > 0


# ---------------------------------------------------------------- the loop evaluator


class _Facts:
    """Function-wide bindings the loop relies on: shape unpacks and their dimensions."""

    def __init__(self, scope: cst.CSTNode):
        self.dims: dict[str, set[tuple[str, int]]] = {}
        self.constants: dict[str, int] = {}  # name = <int literal>
        self.dtypes: set[str] = set()  # name = next(m.parameters()).dtype / x.dtype
        self.bound: Counter[str] = Counter()
        scope.visit(_FactCollector(self, scope))

    def constant(self, name: str) -> int | None:
        return self.constants.get(name) if self.bound[name] == 1 else None

    def dim_of(self, name: str) -> tuple[str, int] | None:
        dims = self.dims.get(name, set())
        if len(dims) == 1 and self.bound[name] == 1:
            return next(iter(dims))
        return None


class _FactCollector(cst.CSTVisitor):
    def __init__(self, facts: _Facts, scope: cst.CSTNode):
        self.facts = facts
        self.scope = scope

    def visit_FunctionDef(self, node):
        return node is self.scope  # the scope itself, not the functions inside it

    def visit_Assign(self, node: cst.Assign):
        for target in node.targets:
            names = target.target.elements if isinstance(target.target, cst.Tuple) else [target.target]
            for index, element in enumerate(names):
                element = element.value if isinstance(element, cst.Element) else element
                if not isinstance(element, cst.Name):
                    continue
                self.facts.bound[element.value] += 1
                if not isinstance(target.target, cst.Tuple):
                    if m.matches(node.value, m.Integer() | m.UnaryOperation(m.Minus(), m.Integer())):
                        self.facts.constants[element.value] = int(code(node.value))
                    if m.matches(node.value, m.Attribute(attr=m.Name("dtype"))):
                        self.facts.dtypes.add(element.value)
                dim = _shape_dim(node.value, index if isinstance(target.target, cst.Tuple) else None)
                if dim:
                    self.facts.dims.setdefault(element.value, set()).add(dim)

    def visit_AugAssign(self, node):
        if isinstance(node.target, cst.Name):
            self.facts.bound[node.target.value] += 1

    def visit_For(self, node):
        for name in reads(node.target):
            self.facts.bound[name] += 1


def _shape_dim(value: cst.BaseExpression, index: int | None) -> tuple[str, int] | None:
    """``X.shape`` unpacked at ``index``, ``X.shape[i]`` or ``X.size(i)``: ``(code(X), i)``."""
    if index is not None:
        if m.matches(value, m.Attribute(attr=m.Name("shape"))):
            return code(value.value), index
        if m.matches(value, m.Call(func=m.Attribute(attr=m.Name("size")), args=[])):
            return code(value.func.value), index
        return None
    integer = m.Integer() | m.UnaryOperation(operator=m.Minus(), expression=m.Integer())
    if m.matches(value, m.Subscript(value=m.Attribute(attr=m.Name("shape")),
                                    slice=[m.SubscriptElement(slice=m.Index(value=integer))])):
        return code(value.value.value), int(code(value.slice[0].slice.value))
    if m.matches(value, m.Call(func=m.Attribute(attr=m.Name("size")), args=[m.Arg(value=integer)])):
        return code(value.func.value), int(code(value.args[0].value))
    return None


class _NameCollector(cst.CSTVisitor):
    """Names an expression or statement reads (attributes and keywords are not reads)."""

    def __init__(self):
        self.names: list[str] = []

    def visit_Name(self, node: cst.Name):
        self.names.append(node.value)

    def visit_Attribute(self, node: cst.Attribute):
        node.value.visit(self)
        return False

    def visit_Arg(self, node: cst.Arg):
        node.value.visit(self)
        return False

    def visit_AssignTarget(self, node: cst.AssignTarget):
        if not isinstance(node.target, cst.Name | cst.Tuple):
            node.target.visit(self)  # x[i] = ... reads x
        return False


# Memo of reads() while find_sites runs (it asks about the same statements many times);
# entries hold their node so that ids stay valid. None outside a run: nothing is kept.
_READS: dict[int, tuple[cst.CSTNode, frozenset[str]]] | None = None


def reads(node: cst.CSTNode) -> frozenset[str]:
    cached = None if _READS is None else _READS.get(id(node))
    if cached is None or cached[0] is not node:
        collector = _NameCollector()
        node.visit(collector)
        cached = (node, frozenset(collector.names))
        if _READS is not None:
            _READS[id(node)] = cached
    return cached[1]


def _binds(statement: cst.BaseStatement) -> set[str]:
    """Names a statement binds unconditionally, at its top level."""
    names = set()
    if isinstance(statement, cst.SimpleStatementLine):
        for small in statement.body:
            if isinstance(small, cst.Assign):
                for target in small.targets:
                    if isinstance(target.target, cst.Name):
                        names.add(target.target.value)
                    elif isinstance(target.target, cst.Tuple):
                        names.update(e.value.value for e in target.target.elements if isinstance(e.value, cst.Name))
    return names


class _LoopEvaluator:
    def __init__(self, loop: cst.For, facts: _Facts, accumulators: set[str]):
        self.facts = facts
        self.accumulators = accumulators
        self.env: dict[str, object] = {}
        self.nodes: dict[str, cst.BaseExpression] = {}  # code -> node of every outer tensor
        self.outer_names: set[str] = set()  # names those expressions read
        self.accumulations: dict[str, list[Accumulation]] = {}
        self.head0: list[tuple[str, Ratio, bool, tuple | None]] = []  # name, ratio, .item(), guard
        self.top_level_tensors: list[str] = []
        self.cross_entropy: tuple | None = None
        self.loop_name, self.head_offset, self.range_end = self._range(loop)

    # -- the loop header
    def _range(self, loop: cst.For):
        if not isinstance(loop.target, cst.Name) or loop.orelse is not None:
            raise Refusal("the head loop must be `for k in range(...)` without `else`")
        if not m.matches(loop.iter, m.Call(func=m.Name("range"))) or any(a.keyword for a in loop.iter.args):
            raise Refusal("the head loop must iterate over range(...)")
        args = [a.value for a in loop.iter.args]
        if len(args) == 2 and m.matches(args[0], m.Integer("1")) and m.matches(
                args[1], m.BinaryOperation(operator=m.Add(), right=m.Integer("1"))):
            return loop.target.value, 0, args[1].left  # k = var
        if len(args) == 1 or (len(args) == 2 and m.matches(args[0], m.Integer("0"))):
            return loop.target.value, 1, args[-1]  # k = var + 1
        raise Refusal(f"unsupported head range `{code(loop.iter)}`")

    # -- integer positions
    def position(self, node: cst.BaseExpression) -> Lin:
        if isinstance(node, cst.Integer):
            return Lin(c=int(node.value))
        if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
            return -self.position(node.expression)
        if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Add | cst.Subtract):
            left, right = self.position(node.left), self.position(node.right)
            return left + right if isinstance(node.operator, cst.Add) else left - right
        if isinstance(node, cst.Name):
            if node.value == self.loop_name:
                return Lin(k=1, c=-self.head_offset)
            value = self.env.get(node.value)
            if isinstance(value, Lin):
                return value
            if node.value not in self.env and (self.facts.dim_of(node.value) or ("", 0))[1] == 1:
                return SEQ
        dim = _shape_dim(node, None)
        if dim and dim[1] == 1:
            return SEQ
        raise Refusal(f"cannot follow the index `{code(node)}`")

    def _positions(self, element: cst.SubscriptElement) -> Lin:
        """The start of a slice that must cover exactly S-k positions."""
        part = element.slice
        if not isinstance(part, cst.Slice) or part.step is not None:
            raise Refusal(f"unsupported position slice `{code(element)}`")
        start = Lin() if part.lower is None else self.position(part.lower)
        stop = SEQ if part.upper is None else self.position(part.upper)
        if stop.s == 0 and stop.k <= 0 and stop.c <= 0 and stop != Lin():
            stop = stop + SEQ  # a negative index counts from the end
        if stop - start != LENGTH:
            raise Refusal(f"the slice `{code(element)}` does not cover the S-k positions of a head")
        return start

    def _is_full(self, element: cst.SubscriptElement) -> bool:
        return m.matches(element.slice, m.Slice(lower=None, upper=None, step=None))

    def subscript(self, node: cst.Subscript) -> View:
        base = self.value(node.value)
        if not isinstance(base, Outer):
            raise Refusal(f"unsupported indexing `{code(node)}`")
        elements = list(node.slice)
        if len(elements) < 2 or not self._is_full(elements[0]):
            raise Refusal(f"unsupported indexing `{code(node)}`")
        start = self._positions(elements[1])
        head = False
        rest = elements[2:]
        if rest and not self._is_full(rest[0]):
            if not isinstance(rest[0].slice, cst.Index) or self.position(rest[0].slice.value) != Lin(k=1, c=-1):
                raise Refusal(f"`{code(node)}` does not select head k-1")
            head = True
            rest = rest[1:]
        if not all(self._is_full(e) for e in rest):
            raise Refusal(f"unsupported indexing `{code(node)}`")
        return View(code(base.node), start, head)

    # -- tensors
    def value(self, node: cst.BaseExpression):
        if isinstance(node, cst.Name):
            if node.value in self.env:
                return self.env[node.value]
            if node.value in self.accumulators or node.value == self.loop_name:
                raise Refusal(f"`{node.value}` is used inside the loop beyond its accumulation")
            return self._outer(node)
        if isinstance(node, cst.Attribute | cst.Subscript) and not self._mentions_loop(node):
            return self._outer(node)
        if isinstance(node, cst.Subscript):
            return self.subscript(node)
        if isinstance(node, cst.Call):
            return self.call(node)
        if isinstance(node, cst.BinaryOperation):
            return self.binary(node)
        if isinstance(node, cst.Comparison):
            return self.comparison(node)
        raise Refusal(f"cannot follow `{code(node)}`")

    def _mentions_loop(self, node) -> bool:
        return bool(reads(node) & (set(self.env) | {self.loop_name}))

    def _outer(self, node) -> Outer:
        if self._mentions_loop(node):
            raise Refusal(f"cannot follow `{code(node)}`")
        self.nodes.setdefault(code(node), node)
        self.outer_names |= reads(node)
        return Outer(node)

    def call(self, node: cst.Call):
        name = dotted(node.func)
        if name in _CROSS_ENTROPY_NAMES:
            return self.cross_entropy_call(node)
        if name == "torch.sum" and len(node.args) == 1:
            return Total(self.tokens(self.value(node.args[0].value)))
        if isinstance(node.func, cst.Attribute):
            method = node.func.attr.value
            inner = node.func.value
            if method in _TRANSPARENT_METHODS:
                return self.value(inner)
            if method == "detach" and not node.args:
                value = self.value(inner)
                if isinstance(value, View):
                    return replace(value, detached=True)
                raise Refusal(f"`.detach()` on a derived value: `{code(node)}`")
            if method == "sum" and not node.args:
                return Total(self.tokens(self.value(inner)))
            if method in {"sum", "mean"}:
                raise Refusal(f"a different reduction: `{code(node)}`")
        raise Refusal(f"cannot follow the call `{code(node)}`")

    def cross_entropy_call(self, node: cst.Call):
        positional = [a for a in node.args if a.keyword is None]
        keywords = {a.keyword.value: a.value for a in node.args if a.keyword is not None}
        if len(positional) != 2 or any(a.star for a in node.args):
            raise Refusal("cross_entropy must take logits and labels positionally")
        extra = sorted(set(keywords) - {"reduction", "ignore_index"})
        if extra:
            raise Refusal(f"cross_entropy keyword `{extra[0]}` has no equivalent in the utility")
        if not m.matches(keywords.get("reduction"), m.SimpleString()) or \
                keywords["reduction"].evaluated_value != "none":
            raise Refusal("cross_entropy reduction other than 'none'")
        logits, labels = (self.value(a.value) for a in positional)
        if not (isinstance(logits, View) and logits.head and logits.start == Lin()):
            raise Refusal(f"cross_entropy's input is not head k-1 of the logits: `{code(positional[0])}`")
        if not (isinstance(labels, View) and not labels.head and labels.start == Lin(k=1)):
            raise Refusal(f"cross_entropy's target is not the labels shifted by k: `{code(positional[1])}`")
        ignore = keywords.get("ignore_index")
        ignore_code = "-100" if ignore is None else code(ignore)
        factor = ("ce", logits.base, labels.base, ignore_code)
        if self.cross_entropy not in (None, factor):
            raise Refusal("two different cross-entropies in one loop")
        self.cross_entropy = factor
        self.ignore_node = ignore
        return Tokens((factor,))

    def tokens(self, value) -> tuple:
        if isinstance(value, Tokens):
            return value.factors
        if isinstance(value, View):
            if value.head and value.start != Lin():
                raise Refusal("per-head weights must start at position 0 (weight_alignment='input')")
            if value.head:
                return (("head", value.base, value.detached),)
            alignment = {Lin(k=1): "target", Lin(k=1, c=-1): "previous", Lin(): "input"}.get(value.start)
            if alignment is None:
                raise Refusal(f"unsupported alignment of `{value.base}`")
            return (("seq", value.base, alignment, value.detached),)
        raise Refusal("a per-token product of something that is not per-token")

    def binary(self, node: cst.BinaryOperation):
        left, right = self.value(node.left), self.value(node.right)
        if isinstance(node.operator, cst.Multiply):
            return Tokens(tuple(sorted(self.tokens(left) + self.tokens(right))))
        if isinstance(node.operator, cst.Divide) and isinstance(left, Total) and isinstance(right, Total):
            return Ratio(left.factors, right.factors)
        raise Refusal(f"unsupported arithmetic `{code(node)}`")

    def comparison(self, node: cst.Comparison):
        if len(node.comparisons) != 1 or not isinstance(node.comparisons[0].operator, cst.NotEqual):
            raise Refusal(f"unsupported comparison `{code(node)}`")
        labels = self.value(node.left)
        if not (isinstance(labels, View) and not labels.head and labels.start == Lin(k=1)):
            raise Refusal(f"unsupported comparison `{code(node)}`")
        return Tokens((("valid", labels.base, code(node.comparisons[0].comparator)),))

    # -- statements
    def run(self, body: list[cst.BaseStatement], guard: tuple | None = None, top: bool = True):
        for statement in body:
            if isinstance(statement, cst.SimpleStatementLine):
                for small in statement.body:
                    self.small_statement(small, guard, top)
            elif isinstance(statement, cst.If):
                self.if_statement(statement, guard)
            else:
                raise Refusal(f"unsupported statement in the head loop: `{code(statement).strip().splitlines()[0]}`")

    def small_statement(self, small, guard, top):
        if isinstance(small, cst.Assign) and len(small.targets) == 1 and isinstance(small.targets[0].target, cst.Name):
            name = small.targets[0].target.value
            if name in self.accumulators:
                if not (isinstance(small.value, cst.BinaryOperation) and isinstance(small.value.operator, cst.Add)
                        and m.matches(small.value.left, m.Name(name))):
                    raise Refusal(f"`{name}` is reassigned inside the loop")
                return self.accumulate(name, small.value.right, guard)
            if name == self.loop_name or name in self.outer_names:
                raise Refusal(f"the loop rebinds `{name}`")
            try:
                value = self.position(small.value)
            except Refusal:
                value = self.value(small.value)
            self.env[name] = value
            if top and guard is None and not isinstance(value, Lin | Outer):
                self.top_level_tensors.append(name)
            return None
        if isinstance(small, cst.AugAssign) and isinstance(small.operator, cst.AddAssign) \
                and isinstance(small.target, cst.Name) and small.target.value in self.accumulators:
            return self.accumulate(small.target.value, small.value, guard)
        if isinstance(small, cst.Del | cst.Pass):
            return None
        text = code(small).strip()
        used = reads(small) & set(self.env)
        if used:
            raise Refusal(f"per-head value `{sorted(used)[0]}` is used elsewhere: `{text}`")
        raise Refusal(f"statement with effects the rewrite would drop: `{text}`")

    def accumulate(self, name, node, guard):
        if m.matches(node, m.Integer("1")):
            value = 1
        else:
            value = self.value(node)
            if not isinstance(value, Ratio):
                raise Refusal(f"`{name}` accumulates `{code(node)}`, not a per-head ratio (a token mean across heads?)")
        self.accumulations.setdefault(name, []).append(Accumulation(value, guard))

    def if_statement(self, node: cst.If, guard, head0=False):
        if node.orelse is not None:
            raise Refusal("an `if` with `else` in the head loop")
        test = node.test
        if m.matches(node.body, m.IndentedBlock(body=[m.SimpleStatementLine(body=[m.Continue()])])):
            if self._is_length_guard(test):
                return
            raise Refusal(f"unsupported `continue` condition `{code(test)}`")
        if m.matches(test, m.Comparison(comparisons=[m.ComparisonTarget(operator=m.GreaterThan(),
                                                                        comparator=m.Integer("0"))])):
            total = self.value(test.left)
            if m.matches(test.left, m.Call(func=m.Attribute(attr=m.Name("item")), args=[])):
                total = self.value(test.left.func.value)
            if isinstance(total, Total):
                if guard is not None:
                    raise Refusal("nested guards in the head loop")
                if head0:
                    return self.head0_block(node.body.body, total.factors)
                return self.run(node.body.body, total.factors, top=False)
        if m.matches(test, m.Comparison(comparisons=[m.ComparisonTarget(operator=m.Equal())])) and \
                self.position(test.left) - self.position(test.comparisons[0].comparator) == Lin(k=1, c=-1):
            return self.head0_block(node.body.body, guard)
        raise Refusal(f"unsupported condition in the head loop: `{code(test)}`")

    def _is_length_guard(self, test) -> bool:
        if not isinstance(test, cst.Comparison) or len(test.comparisons) != 1:
            return False
        op, bound = test.comparisons[0].operator, test.comparisons[0].comparator
        try:
            length = self.position(test.left)
        except Refusal:
            return False
        return length == LENGTH and (
            (isinstance(op, cst.LessThanEqual) and m.matches(bound, m.Integer("0")))
            or (isinstance(op, cst.LessThan) and m.matches(bound, m.Integer("1"))))

    def head0_block(self, body, guard):
        for statement in body:
            if isinstance(statement, cst.If) and guard is None:
                self.if_statement(statement, guard, head0=True)
                continue
            if not m.matches(statement, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
                raise Refusal("unsupported statement in the head-0 block")
            assign = statement.body[0]
            name = assign.targets[0].target.value
            value, item = assign.value, False
            if m.matches(value, m.Call(func=m.Attribute(attr=m.Name("item")), args=[])):
                value, item = value.func.value, True
            result = self.value(value)
            if isinstance(result, Ratio):
                self.head0.append((name, result, item, guard))
            elif item or name in self.outer_names or name == self.loop_name:
                raise Refusal(f"unsupported head-0 metric `{code(assign.value)}`")
            else:
                self.env[name] = result


# ---------------------------------------------------------------- from facts to a spec


def _is_default_heads(node: cst.BaseExpression, logits: str, facts: _Facts) -> bool:
    dim = _shape_dim(node, None) or (facts.dim_of(node.value) if isinstance(node, cst.Name) else None)
    return dim == (logits, 2)


def build_spec(ev: _LoopEvaluator, averages: dict[str, tuple[str, str]], counters: set[str]) -> LoopSpec:
    """Classify the accumulated ratios into the utility's options, or refuse."""
    if ev.cross_entropy is None:
        raise Refusal("no cross_entropy in the loop")
    ce = ev.cross_entropy
    _, logits, labels, ignore = ce
    valid = ("valid", labels, ignore)

    def split(factors):
        rest = list(factors)
        if ce in rest:
            rest.remove(ce)
        foreign = [f for f in rest if f[0] == "valid" and f != valid]
        if foreign:
            raise Refusal("the label mask compares other labels or another ignore_index than cross_entropy's")
        return rest

    ratios = {}
    for name, accumulations in ev.accumulations.items():
        if name in counters:
            continue
        if len(accumulations) != 1:
            raise Refusal(f"`{name}` is accumulated more than once per head")
        (acc,) = accumulations
        numerator, denominator = split(acc.value.numerator), split(acc.value.denominator)
        if ce not in acc.value.numerator or ce in acc.value.denominator:
            raise Refusal(f"`{name}` is not a cross-entropy over a mask sum")
        if acc.guard is None or sorted(acc.guard) != sorted(acc.value.denominator):
            raise Refusal(f"`{name}` divides by a sum that is not guarded by `> 0` (the loop would give NaN)")
        ratios[name] = (numerator, denominator)

    if not ratios:
        raise Refusal("the loop accumulates no per-head loss")
    mask_ignored = {valid in den for _, den in ratios.values()}
    if len(mask_ignored) != 1:
        raise Refusal("the ratios disagree on masking ignored labels")
    (mask_ignored_labels,) = mask_ignored

    def without_valid(factors):
        return sorted(f for f in factors if f != valid)

    # sum(ce*m)/sum(m) with one mask factor; sum(ce*w*m)/sum(w*m) is weighted.
    unweighted = [n for n, (num, den) in ratios.items()
                  if without_valid(num) == without_valid(den) and len(without_valid(den)) == 1]
    weighted = [n for n in ratios if n not in unweighted]
    if len(unweighted) > 1 or len(weighted) > 1:
        raise Refusal("more than one weighted or unweighted accumulator")

    # The mask: the unweighted denominator, else what a weighted ratio implies.
    weight_factor, normalize = None, "mask"
    if unweighted:
        mask = without_valid(ratios[unweighted[0]][1])
    if weighted:
        num, den = (without_valid(x) for x in ratios[weighted[0]])
        if not unweighted and Counter(den) != Counter(num):
            mask = den
        elif not unweighted:  # sum(ce*w*m)/sum(w*m): tell per-position weights from the mask
            weight_like = [f for f in den if f[0] == "head" or (f[0] == "seq" and f[2] != "target")]
            if len(weight_like) != 1:
                raise Refusal("cannot tell the weights from the mask in `sum(ce*w*m)/sum(w*m)`")
            mask = [f for f in den if f != weight_like[0]]
        if Counter(mask) - Counter(num):
            raise Refusal("the weighted numerator does not use the mask")
        weights = list((Counter(num) - Counter(mask)).elements())
        if Counter(den) == Counter(mask):
            normalize = "mask"
        elif Counter(den) == Counter(num):
            normalize = "weights"
        else:
            raise Refusal("the weighted ratio is not sum(ce*w*m)/sum(m) or sum(ce*w*m)/sum(w*m)")
        if len(weights) != 1:
            raise Refusal("the weighted ratio does not have exactly one weight factor")
        weight_factor = weights[0]
    if len(mask) != 1 or mask[0][0] != "seq" or mask[0][2] != "target" or mask[0][3]:
        raise Refusal("the mask is not one attention mask aligned with the targets")

    weights_node, alignment = None, "target"
    if weight_factor is not None:
        if weight_factor[0] == "head":
            alignment = "input"
        elif weight_factor[0] == "seq":
            alignment = weight_factor[2]
        else:
            raise Refusal("unsupported weight factor")
        detached = weight_factor[-1]
        weights_node = ev.nodes[weight_factor[1]]
        if detached:
            weights_node = cst.Call(func=cst.Attribute(value=weights_node, attr=cst.Name("detach")))

    # Head averages: "all" divides by the range's head count, "valid" by a guarded counter.
    head_average = "all"
    outputs = {}
    n_future_code = code(ev.range_end)
    for name, (output, divisor) in averages.items():
        if name not in ratios:
            continue
        if divisor == n_future_code:
            pass
        elif name in weighted and divisor.startswith("valid:"):
            counter = divisor.removeprefix("valid:")
            (count,) = ev.accumulations[counter]
            if count.guard is None or sorted(count.guard) != sorted(ev.accumulations[name][0].value.denominator):
                raise Refusal(f"`{counter}` does not count the heads that `{name}` includes")
            head_average = "valid"
        else:
            raise Refusal(f"`{name}` is averaged over `{divisor}`, not the heads")
        outputs[name] = output
    missing = sorted(set(ratios) - set(outputs))
    if missing:
        raise Refusal(f"`{missing[0]}` has no head average after the loop")

    head0_output, head0_item = None, False
    for metric, ratio, item, guard in ev.head0:
        num, den = split(ratio.numerator), split(ratio.denominator)
        if without_valid(num) != without_valid(den) or without_valid(den) != mask or \
                (valid in den) != mask_ignored_labels or head0_output is not None:
            raise Refusal(f"the head-0 metric `{metric}` is not per_head_ce_loss[0]")
        if guard is None or sorted(guard) != sorted(ratio.denominator):
            raise Refusal(f"the head-0 metric `{metric}` divides by an unguarded mask sum (NaN where ours gives 0)")
        head0_output, head0_item = metric, item

    n_future = None if _is_default_heads(ev.range_end, logits, ev.facts) else ev.range_end
    return LoopSpec(
        logits=ev.nodes[logits], labels=ev.nodes[labels], attention_mask=ev.nodes[mask[0][1]],
        weights=weights_node, n_future=n_future, ignore_index=None if ignore == "-100" else ev.ignore_node,
        weight_alignment=alignment, mask_ignored_labels=mask_ignored_labels, normalize=normalize,
        head_average=head_average, weighted_output=outputs.get(weighted[0]) if weighted else None,
        unweighted_output=outputs.get(unweighted[0]) if unweighted else None,
        head0_output=head0_output, head0_item=head0_item,
        per_head_weights=weight_factor is not None and weight_factor[0] == "head",
    )


# ---------------------------------------------------------------- finding sites


def accumulator_init(statement: cst.BaseStatement) -> str | None:
    """``name = 0 | 0.0 | torch.tensor(0.0, ...) | torch.zeros(())``: the name."""
    if not m.matches(statement, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
        return None
    assign = statement.body[0]
    value = assign.value
    zero = m.Integer("0") | m.Float("0.0") | m.Float("0.")
    if m.matches(value, zero) or m.matches(value, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("tensor")),
                                                         args=[m.Arg(value=zero, keyword=None), m.ZeroOrMore()])) \
            or m.matches(value, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("zeros")),
                                       args=[m.Arg(value=m.Tuple(elements=[]) | m.List(elements=[]), keyword=None),
                                             m.ZeroOrMore()])):
        return assign.targets[0].target.value
    return None


def _head_average(statement, accumulators) -> tuple[str, str, str] | None:
    """``acc /= D``, ``acc = acc / D`` or ``out = acc / D``: (acc, out, divisor code)."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None
    small = statement.body[0]
    if isinstance(small, cst.AugAssign) and isinstance(small.operator, cst.DivideAssign) \
            and isinstance(small.target, cst.Name) and small.target.value in accumulators:
        return small.target.value, small.target.value, _divisor(small.value)
    if m.matches(small, m.Assign(targets=[m.AssignTarget(m.Name())],
                                 value=m.BinaryOperation(operator=m.Divide(), left=m.Name()))) \
            and small.value.left.value in accumulators:
        return small.value.left.value, small.targets[0].target.value, _divisor(small.value.right)
    return None


def _divisor(node) -> str:
    if m.matches(node, m.Call(func=m.Name("max"), args=[m.Arg(value=m.Name()), m.Arg(value=m.Integer("1"))])):
        return "valid:" + node.args[0].value.value
    return code(node)


class _HeadLoopFinder(cst.CSTVisitor):
    """Head loops: the innermost ``for`` around each cross_entropy call (not outer batch loops)."""

    def __init__(self):
        self.loops: list[cst.For] = []
        self.found: dict[int, cst.For] = {}
        self.any_call = False

    def visit_For(self, node):
        self.loops.append(node)

    def leave_For(self, node):
        self.loops.pop()

    def visit_Call(self, node):
        if (dotted(node.func) or "").endswith("cross_entropy"):
            self.any_call = True
            if self.loops:
                self.found[id(self.loops[-1])] = self.loops[-1]


def analyze(body, loop_index, facts, chain, own_is_loop, indent, line, refuse_all=None) -> Site:
    """Describe the site around ``body[loop_index]``; ``chain`` lists the enclosing blocks."""
    loop = body[loop_index]
    site = Site(body=tuple(body), start=loop_index, stop=loop_index + 1, loop_index=loop_index,
                indent=indent, line=line)
    try:
        if refuse_all:
            raise Refusal(refuse_all)
        loop_writes = {n for s in _all_statements(loop.body.body) for n in _augmented(s)}
        if not loop_writes:
            raise Refusal("the loop accumulates into no local variable (`name += ...`)")
        inits = {}
        for index in range(loop_index - 1, -1, -1):
            name = accumulator_init(body[index])
            if name in loop_writes and name not in inits:
                inits[name] = index
            elif reads(body[index]) & loop_writes - set(inits):
                break
        missing = loop_writes - set(inits)
        if missing:
            raise Refusal(f"`{sorted(missing)[0]}` is accumulated without a zero initialisation before the loop")
        for index in range(min(inits.values()), loop_index):
            used = reads(body[index]) & set(inits)
            if index not in inits.values() and used:
                raise Refusal(f"`{sorted(used)[0]}` is used between its initialisation and the loop")
        ev = _LoopEvaluator(loop, facts, set(inits))
        ev.run(list(loop.body.body))
        for metric, *_ in ev.head0:  # its zero default before the loop belongs to the site
            index = next((i for i in range(loop_index - 1, -1, -1) if accumulator_init(body[i]) == metric), None)
            if index is None:
                raise Refusal(f"the head-0 metric `{metric}` has no zero default before the loop")
            inits[metric] = index
        site.start = min(inits.values())
        site.init_indices = tuple(sorted(inits.values()))
        rebound = sorted(set(ev.env) & ev.outer_names)
        if rebound:
            raise Refusal(f"the loop rebinds `{rebound[0]}`, which it also reads from outside")
        counters = {n for n, accs in ev.accumulations.items() if all(a.value == 1 for a in accs)}
        site.rho1_style = bool(counters or ev.head0 or any(
            f[0] == "head" for accs in ev.accumulations.values() for a in accs if a.value != 1
            for f in a.value.numerator))
        site.temporaries = _temporaries(loop, ev, [(body, loop_index + 1, loop_index if own_is_loop else 0), *chain])

        averages = {}
        index = loop_index + 1
        while index < len(body):
            average = _head_average(body[index], set(inits) - counters)
            if average is None or average[0] in averages:
                break
            averages[average[0]] = (average[1], average[2])
            index += 1
        site.stop = index
        spec = build_spec(ev, averages, counters)
        bound_before = set(ev.env) | {ev.loop_name} | set(inits) | {out for out, _ in averages.values()}
        bound_after = {spec.weighted_output, spec.unweighted_output, spec.head0_output}
        later = _later_reads([(body, site.stop, site.start if own_is_loop else 0), *chain])
        leaked = sorted((bound_before - bound_after) & later)
        if leaked:
            raise Refusal(f"`{leaked[0]}`, bound by the loop, is read after it")
        site.spec = spec
        site.rho1_style |= spec.normalize == "weights" or spec.head_average == "valid"
    except Refusal as refusal:
        site.refusal = str(refusal)
    return site


def _all_statements(body):
    for statement in body:
        yield statement
        if isinstance(statement, cst.If):
            yield from _all_statements(statement.body.body)


def _augmented(statement) -> set[str]:
    names = set()
    if isinstance(statement, cst.SimpleStatementLine):
        for small in statement.body:
            if isinstance(small, cst.AugAssign) and isinstance(small.target, cst.Name):
                names.add(small.target.value)
            elif m.matches(small, m.Assign(targets=[m.AssignTarget(m.Name())],
                                           value=m.BinaryOperation(operator=m.Add(), left=m.Name()))) \
                    and small.value.left.value == small.targets[0].target.value:
                names.add(small.targets[0].target.value)
    return names


def _later_reads(levels) -> set[str]:
    """Names read after a point before being rebound, up to the enclosing function.

    ``levels`` holds ``(block, after, loop_prefix)`` from the innermost block out: the
    statements ``block[after:]`` run next, and in a loop body ``block[:loop_prefix]``
    runs again in the next iteration.
    """
    found: set[str] = set()
    killed: set[str] = set()
    for block, after, loop_prefix in levels:
        found |= _exposed_reads(block[after:], killed)
        found |= _exposed_reads(block[:loop_prefix], set(killed))
    return found


def _exposed_reads(statements, killed: set[str]) -> set[str]:
    """Names the statements read before binding them; ``killed`` grows with top-level bindings."""
    found: set[str] = set()
    for statement in statements:
        if isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                found |= reads(small) - killed
                killed |= _binds(cst.SimpleStatementLine(body=[small]))
            continue
        inner = set(killed)
        for child in statement.children:
            if isinstance(child, cst.BaseSuite):
                found |= _exposed_reads(getattr(child, "body", ()), inner)
            elif isinstance(child, cst.BaseStatement | cst.Else | cst.ExceptHandler | cst.Finally):
                found |= _exposed_reads([child] if isinstance(child, cst.BaseStatement) else child.body.body, inner)
            elif isinstance(child, cst.CSTNode) and not isinstance(child, cst.EmptyLine):
                if isinstance(statement, cst.For) and child is statement.target:
                    inner |= reads(child)
                else:
                    found |= reads(child) - killed
    return found


def _temporaries(loop, ev, levels) -> tuple[str, ...]:
    """Tensor names the loop body binds on every path, not deleted yet, and dead after the body."""
    statements = list(loop.body.body)
    deleted = set()
    for statement in statements:
        if isinstance(statement, cst.SimpleStatementLine):
            for small in statement.body:
                if isinstance(small, cst.Del):
                    deleted |= reads(small.target)
    later = _later_reads(levels)
    result = []
    for name in dict.fromkeys(ev.top_level_tensors):
        if name in deleted or name in later:
            continue
        first = next(i for i, s in enumerate(statements) if name in _binds(s))
        if any(name in reads(s) for s in statements[:first]) or name in reads(statements[first]):
            continue  # read before it is bound in the body: the previous iteration's value
        result.append(name)
    return tuple(result)


class SiteFinder(cst.CSTVisitor):
    """Collects every head loop as a ``Site``, with what it needs of the enclosing blocks."""

    METADATA_DEPENDENCIES = (PositionProvider,)

    def __init__(self, module: cst.Module, head_loops: dict[int, cst.For], refuse_all: str | None = None):
        self.module = module
        self.head_loops = head_loops
        self.refuse_all = refuse_all
        self.sites: list[Site] = []
        self._blocks: list[tuple] = []  # (body, indent, block node, is a loop body)
        self._statements: list[cst.CSTNode] = []  # compound statements being visited
        self._scopes: list[list] = [[module, None]]  # [scope node, its _Facts once needed]

    def on_visit(self, node) -> bool:
        if isinstance(node, cst.BaseCompoundStatement):
            self._statements.append(node)
        if isinstance(node, cst.FunctionDef):
            self._scopes.append([node, None])
        return super().on_visit(node)

    def on_leave(self, original_node) -> None:
        super().on_leave(original_node)
        if isinstance(original_node, cst.BaseCompoundStatement):
            self._statements.pop()
        if isinstance(original_node, cst.FunctionDef):
            self._scopes.pop()

    def visit_Module(self, node):
        self._visit_block(node.body, "", node, False)

    def visit_IndentedBlock(self, node):
        holder = self._statements[-1]
        indent = self._blocks[-1][1] + (self.module.default_indent if node.indent is None else node.indent)
        self._visit_block(node.body, indent, node, isinstance(holder, cst.For | cst.While) and holder.body is node)

    def leave_IndentedBlock(self, node):
        self._blocks.pop()

    def _module_facts(self) -> _Facts:
        if self._scopes[0][1] is None:
            self._scopes[0][1] = _Facts(self.module)
        return self._scopes[0][1]

    def _facts(self) -> _Facts:
        scope = self._scopes[-1]
        if scope[1] is None:
            scope[1] = _Facts(scope[0])
        return scope[1]

    def _visit_block(self, body, indent, node, is_loop):
        self._blocks.append((tuple(body), indent, node, is_loop))
        for index, statement in enumerate(body):
            if id(statement) in self.head_loops:
                line = self.get_metadata(PositionProvider, statement).start.line
                site = analyze(body, index, self._facts(), self._chain(), is_loop, indent, line, self.refuse_all)
                site.block_id = id(node)
                site.facts = (self._facts(), self._module_facts())
                site.span = (self.get_metadata(PositionProvider, body[site.start]).start.line,
                             self.get_metadata(PositionProvider, body[site.stop - 1]).end.line)
                self.sites.append(site)

    def _chain(self):
        """``_later_reads`` levels for the blocks enclosing the innermost one, up to its function."""
        levels = []
        for depth in range(len(self._blocks) - 2, -1, -1):
            body, _, _, is_loop = self._blocks[depth]
            positions = {id(statement): i for i, statement in enumerate(body)}
            holder = next(s for s in reversed(self._statements) if id(s) in positions)
            if isinstance(holder, cst.FunctionDef | cst.ClassDef):
                break
            index = positions[id(holder)]
            levels.append((body, index + 1, index if is_loop else 0))
        return levels


def find_sites(module: cst.Module, refuse_all: str | None = None) -> list[Site]:
    loops = _HeadLoopFinder()
    module.visit(loops)
    if not loops.found:
        return []
    global _READS
    wrapper = cst.MetadataWrapper(module, unsafe_skip_copy=True)
    finder = SiteFinder(module, loops.found, refuse_all)
    _READS = {}
    try:
        wrapper.visit(finder)
    finally:
        _READS = None
    return finder.sites
