"""What a statement reads and binds, by name: the vocabulary of ``dataflow``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Literal

import libcst as cst

from mtp_migrate.cst_utils import code


class _Reads(cst.CSTVisitor):
    """Names an expression or statement reads; stores, attribute names and keywords are not reads."""

    def __init__(self):
        self.names: set[str] = set()

    def visit_Name(self, node: cst.Name) -> None:
        self.names.add(node.value)

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        node.value.visit(self)
        return False

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)
        return False

    def _target(self, target: cst.BaseExpression) -> None:
        if isinstance(target, cst.Name):
            return
        if isinstance(target, cst.Tuple | cst.List):
            for element in target.elements:
                self._target(element.value)
        elif isinstance(target, cst.StarredElement):
            self._target(target.value)
        else:
            target.visit(self)  # x[i] = ... and x.a = ... read x (and i)

    def visit_AssignTarget(self, node: cst.AssignTarget) -> bool:
        self._target(node.target)
        return False

    def visit_AnnAssign(self, node: cst.AnnAssign) -> bool:
        self._target(node.target)
        if node.value is not None:
            node.value.visit(self)
        return False

    def visit_AugAssign(self, node: cst.AugAssign) -> bool:
        node.target.visit(self)  # x += 1 reads x
        node.value.visit(self)
        return False

    def visit_For(self, node: cst.For) -> bool:
        self._target(node.target)
        node.iter.visit(self)
        node.body.visit(self)
        if node.orelse is not None:
            node.orelse.visit(self)
        return False

    def visit_CompFor(self, node: cst.CompFor) -> bool:
        self._target(node.target)
        node.iter.visit(self)
        for condition in node.ifs:
            condition.visit(self)
        if node.inner_for_in is not None:
            node.inner_for_in.visit(self)
        return False

    def _comprehension(self, node, elements: tuple) -> bool:
        """A comprehension's own variables are its scope's: only its first iterable and what its
        element and conditions read from outside count."""
        inner = _Reads()
        for element in elements:
            element.visit(inner)
        node.for_in.visit(inner)
        node.for_in.iter.visit(self)
        self.names |= inner.names - _Binds.comprehension_targets(node.for_in)
        return False

    def visit_GeneratorExp(self, node: cst.GeneratorExp) -> bool:
        return self._comprehension(node, (node.elt,))

    def visit_ListComp(self, node: cst.ListComp) -> bool:
        return self._comprehension(node, (node.elt,))

    def visit_SetComp(self, node: cst.SetComp) -> bool:
        return self._comprehension(node, (node.elt,))

    def visit_DictComp(self, node: cst.DictComp) -> bool:
        return self._comprehension(node, (node.key, node.value))

    def visit_AsName(self, node: cst.AsName) -> bool:
        self._target(node.name)
        return False

    def visit_NamedExpr(self, node: cst.NamedExpr) -> bool:
        node.value.visit(self)
        return False

    def visit_Import(self, node) -> bool:
        return False

    def visit_ImportFrom(self, node) -> bool:
        return False

    def visit_Global(self, node) -> bool:
        return False

    def visit_Nonlocal(self, node) -> bool:
        return False

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        for decorator in node.decorators:
            decorator.visit(self)
        for param in (*node.params.params, *node.params.kwonly_params, *node.params.posonly_params):
            if param.default is not None:
                param.default.visit(self)
        node.body.visit(self)  # a closure's reads count as reads
        return False

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        for part in (*node.decorators, *node.bases, *node.keywords):
            part.visit(self)
        node.body.visit(self)
        return False

    def visit_Param(self, node: cst.Param) -> bool:
        if node.default is not None:
            node.default.visit(self)
        return False


class _Binds(cst.CSTVisitor):
    """Names a statement binds anywhere (not inside nested function or class bodies)."""

    def __init__(self):
        self.names: set[str] = set()

    def _target(self, target) -> None:
        if isinstance(target, cst.Name):
            self.names.add(target.value)
        elif isinstance(target, cst.Tuple | cst.List):
            for element in target.elements:
                self._target(element.value)
        elif isinstance(target, cst.StarredElement):
            self._target(target.value)

    def visit_AssignTarget(self, node):
        self._target(node.target)

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self._target(node.target)

    def visit_AugAssign(self, node):
        self._target(node.target)

    def visit_For(self, node):
        self._target(node.target)

    def visit_AsName(self, node):
        self._target(node.name)

    def visit_NamedExpr(self, node):
        self._target(node.target)

    def visit_Del(self, node):
        self._target(node.target)

    def visit_ImportAlias(self, node: cst.ImportAlias):
        self.names.add(bound_name(node))
        return False

    def visit_CompFor(self, node) -> bool:
        return False  # comprehension variables are their own scope

    @staticmethod
    def comprehension_targets(node: cst.CompFor) -> set[str]:
        """The variables every ``for`` of a comprehension binds."""
        names = set()
        while node is not None:
            names |= target_names(node.target)
            node = node.inner_for_in
        return names

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        self.names.add(node.name.value)
        return False

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        self.names.add(node.name.value)
        return False

    def visit_Lambda(self, node) -> bool:
        return False


def bound_name(alias: cst.ImportAlias) -> str:
    """The name an import alias binds: ``import a.b`` binds ``a``; ``import a.b as c`` binds ``c``."""
    if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
        return alias.asname.name.value
    name = code(alias.name)
    return name.split(".")[0]


@lru_cache(maxsize=1 << 14)
def binds(node: cst.CSTNode) -> frozenset[str]:
    """Names ``node`` binds in its own scope. Memoised: nodes are immutable and hash by identity, and
    the analysis asks again for the same statements (a walk per question was a sixth of its time)."""
    collector = _Binds()
    node.visit(collector)
    return frozenset(collector.names)


def target_names(target: cst.BaseExpression) -> set[str]:
    """Names an assignment or loop target binds (``a, (b, *c)`` binds a, b and c)."""
    collector = _Binds()
    collector._target(target)
    return collector.names


def header_binds(statement: cst.BaseCompoundStatement) -> set[str]:
    """Names a compound statement binds in its own header: loop targets, ``as`` names, walruses in tests."""
    names = target_names(statement.target) if isinstance(statement, cst.For) else set()
    for header in headers(statement):
        if not (isinstance(statement, cst.For) and header is statement.target):
            names |= binds(header)
    return names


def straight_line_binds(small: cst.BaseSmallStatement) -> tuple[set[str], set[str]]:
    """``(bound, unbound)`` by one small statement, unconditionally."""
    if isinstance(small, cst.Del):
        collector = _Binds()
        collector._target(small.target)
        return set(), collector.names
    if isinstance(small, cst.Assign | cst.AnnAssign | cst.AugAssign | cst.Import | cst.ImportFrom):
        return binds(small), set()
    return set(), set()  # a walrus inside an expression may sit in a branch: not a definite binding


def definitely_binds(statement: cst.BaseStatement) -> set[str]:
    """Names a statement binds on every path through it (and not unbound again)."""
    if isinstance(statement, cst.SimpleStatementLine):
        bound: set[str] = set()
        for small in statement.body:
            added, removed = straight_line_binds(small)
            bound = (bound | added) - removed
        return bound
    if isinstance(statement, cst.FunctionDef | cst.ClassDef):
        return {statement.name.value}
    if isinstance(statement, cst.With):
        bound = {n for item in statement.items if item.asname for n in binds(item.asname)}
        for inner in statement.body.body:
            bound |= definitely_binds(inner)
        return bound
    return set()


def suites(statement: cst.BaseCompoundStatement) -> Iterable[Sequence[cst.BaseStatement]]:
    """The statement blocks inside a compound statement, in the order they can run."""
    for child in statement.children:
        if isinstance(child, cst.IndentedBlock):
            yield child.body
        elif isinstance(child, cst.SimpleStatementSuite):
            yield [cst.SimpleStatementLine(body=child.body)]
        elif isinstance(child, cst.Else | cst.Finally | cst.ExceptHandler | cst.ExceptStarHandler):
            yield from suites(child)
        elif isinstance(child, cst.If):  # elif
            yield from suites(child)
        elif isinstance(child, cst.MatchCase):
            yield from suites(child)


def headers(statement: cst.BaseCompoundStatement) -> list[cst.CSTNode]:
    """The expressions a compound statement evaluates itself (tests, iterables, context managers)."""
    parts = []
    for child in statement.children:
        if isinstance(child, cst.BaseSuite | cst.Else | cst.Finally | cst.EmptyLine | cst.Decorator):
            continue
        if isinstance(child, cst.If):
            parts.extend(headers(child))
        elif isinstance(child, cst.ExceptHandler | cst.ExceptStarHandler):
            if child.type is not None:
                parts.append(child.type)
        elif isinstance(child, cst.CSTNode):
            parts.append(child)
    return parts


def target_reads(target: cst.BaseExpression) -> set[str]:
    """Names an assignment or loop target reads: ``x[i]`` as a target reads ``x`` and ``i``."""
    reader = _Reads()
    reader._target(target)
    return reader.names


def reads(node: cst.CSTNode) -> set[str]:
    """Names a node reads (stores, attribute names and keywords are not reads)."""
    reader = _Reads()
    node.visit(reader)
    return reader.names


# Tensor methods by what they do to their tensor (the common ones; an unknown method is neither).
TENSOR_READ_ONLY = frozenset({
    "float", "double", "half", "bfloat16", "long", "int", "bool", "short", "byte", "char", "to", "type", "type_as",
    "detach", "reshape", "view", "view_as", "reshape_as", "flatten", "unflatten", "contiguous", "transpose", "t",
    "permute", "movedim", "swapaxes", "squeeze", "unsqueeze", "sum", "mean", "nanmean", "nansum", "max", "min", "amax",
    "amin", "aminmax", "clamp", "clamp_min", "clamp_max", "clip", "ne", "eq", "gt", "ge", "lt", "le", "log_softmax",
    "softmax", "logsumexp", "exp", "log", "log1p", "expm1", "abs", "neg", "sign", "sqrt", "rsqrt", "square", "pow",
    "reciprocal", "sigmoid", "tanh", "relu", "floor", "ceil", "round", "trunc", "frac", "new_zeros", "new_tensor",
    "new_ones", "new_empty", "new_full", "masked_fill", "masked_select", "masked_scatter", "gather", "scatter",
    "scatter_add", "index_select", "index_fill", "index_add", "take", "take_along_dim", "expand", "expand_as",
    "clone", "cpu", "cuda", "split", "tensor_split", "chunk", "unbind", "narrow", "select", "unfold", "flip", "roll",
    "repeat", "repeat_interleave", "tril", "triu", "diagonal", "any", "all", "nonzero", "count_nonzero", "cumsum",
    "cumprod", "diff", "argmax", "argmin", "topk", "sort", "argsort", "kthvalue", "unique", "size", "dim", "numel",
    "item", "tolist", "element_size", "stride", "is_contiguous", "is_floating_point", "is_complex", "sub", "add",
    "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "matmul", "mm", "bmm", "dot", "outer", "where",
    "lerp", "addcmul", "logical_and", "logical_or", "logical_xor", "logical_not", "isnan", "isinf", "isfinite",
    "nan_to_num", "norm", "std", "var", "prod", "median", "equal", "allclose", "isclose", "dist", "numpy",
})
TENSOR_IN_PLACE = frozenset({
    "zero_", "fill_", "mul_", "add_", "sub_", "div_", "clamp_", "masked_fill_", "scatter_", "scatter_add_",
    "index_fill_", "index_add_", "copy_", "exp_", "log_", "neg_", "abs_", "pow_", "sqrt_", "squeeze_",
    "unsqueeze_", "t_", "transpose_", "requires_grad_", "retain_grad", "register_hook", "backward", "set_",
    "resize_", "uniform_", "normal_", "bernoulli_", "random_", "relu_", "sigmoid_", "tanh_", "round_", "floor_",
})
# Methods that read their object and change nothing: read-only tensor methods, and those of
# dicts, lists, strings and modules. Any other method may change its object.
READ_ONLY_METHODS = TENSOR_READ_ONLY | {
    "get", "keys", "values", "items", "copy", "index", "count", "startswith", "endswith", "format", "join",
    "strip", "lower", "upper", "replace", "parameters", "named_parameters", "buffers", "state_dict",
}


CallKind = Literal["pure", "function", "method"]


def call_kind(call: cst.Call) -> CallKind:
    """Without knowing what names refer to: ``f(x)`` is a function, ``x.f()`` a method."""
    return "method" if isinstance(call.func, cst.Attribute) else "function"


def changed_in_place(node: cst.CSTNode, kind: Callable[[cst.Call], CallKind] = call_kind) -> frozenset[str]:
    """Names whose objects ``node`` may change without rebinding them: the roots of attribute and
    subscript stores and deletions, the objects of methods that are not read-only, and the
    arguments of any call ``kind`` does not call pure (a project function may change what it is
    given; a read-only method changes nothing)."""
    collector = _Changes(kind)
    node.visit(collector)
    return frozenset(collector.names)


def root_name(node: cst.BaseExpression) -> str | None:
    """``x`` for ``x``, ``x.a``, ``x[i]`` and ``x.a[i].b``; ``None`` for anything else (a call's value)."""
    while isinstance(node, cst.Attribute | cst.Subscript):
        node = node.value
    return node.value if isinstance(node, cst.Name) else None


class _Changes(cst.CSTVisitor):
    def __init__(self, kind: Callable[[cst.Call], CallKind]):
        self.kind = kind
        self.names: set[str] = set()

    def _store(self, target: cst.BaseExpression) -> None:
        if isinstance(target, cst.Tuple | cst.List):
            for element in target.elements:
                self._store(element.value)
        elif isinstance(target, cst.StarredElement):
            self._store(target.value)
        elif isinstance(target, cst.Attribute | cst.Subscript) and (root := root_name(target)) is not None:
            self.names.add(root)

    def visit_AssignTarget(self, node: cst.AssignTarget) -> None:
        self._store(node.target)

    def visit_AugAssign(self, node: cst.AugAssign) -> None:
        self._store(node.target)

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        if node.value is not None:
            self._store(node.target)

    def visit_Del(self, node: cst.Del) -> None:
        self._store(node.target)

    def visit_Call(self, node: cst.Call) -> None:
        kind = self.kind(node)
        if kind == "pure" or (kind == "method" and node.func.attr.value in READ_ONLY_METHODS):
            return
        if kind == "method" and (root := root_name(node.func.value)) is not None:
            self.names.add(root)
        for arg in node.args:
            if (root := root_name(arg.value)) is not None:
                self.names.add(root)

    def visit_FunctionDef(self, node) -> bool:
        return False  # a nested function changes nothing until it is called (and then its call counts)

    def visit_ClassDef(self, node) -> bool:
        return False

    def visit_Lambda(self, node) -> bool:
        return False
