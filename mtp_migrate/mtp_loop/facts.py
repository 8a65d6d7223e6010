"""Integer facts by meaning and by flow: what a name read by the loop is, from its single
reaching definition (an unpack of ``x.shape``, ``x.size(i)``, ``shape[i]`` through a
variable, an annotated assignment, a walrus, an integer literal in any spelling).

A name with no single straight-line definition (a parameter, a global, a config
attribute, a branch) has no fact: the emitter then passes it to the call explicitly.
"""

from __future__ import annotations

from collections.abc import Callable

import libcst as cst
import libcst.matchers as m

from mtp_migrate.cst_utils import code, literal_int
from mtp_migrate.flow.dataflow import Definition, FlowIndex, Point, reaching_definition
from mtp_migrate.mtp_loop.dtypes import CANONICAL, METHOD_DTYPES, DType
from mtp_migrate.mtp_loop.symbolic import Dim, Lin

_DEPTH = 8  # how many definitions deep a fact is followed
# Methods whose result has the shape of their receiver.
_SHAPE_PRESERVING = {"flip", "float", "double", "half", "bfloat16", "to", "type", "type_as", "detach", "clone",
                     "contiguous", "cpu", "cuda", "long", "int", "bool", "requires_grad_"}

# Methods whose result has the dtype of their receiver.
_DTYPE_PRESERVING = {"detach", "clone", "contiguous", "cpu", "cuda", "reshape", "view", "flatten", "flip", "squeeze",
                     "unsqueeze", "transpose", "permute", "expand", "expand_as", "view_as", "reshape_as"}

QualifiedNames = Callable[[cst.CSTNode], set[str]]


class Facts:
    """Facts valid at ``point`` (the head loop) of one function."""

    def __init__(self, index: FlowIndex, point: Point, qualified: QualifiedNames):
        self.index = index
        self.point = point
        self.qualified = qualified

    def definition(self, name: str, at: Point | None = None) -> Definition:
        return reaching_definition(self.index, at or self.point, name)

    def same_value(self, node: cst.CSTNode, at: Point) -> bool:
        """Every name ``node`` reads has the same definition at ``at`` as at the loop."""
        for name in self.index.reads(node):
            here, there = self.definition(name), self.definition(name, at)
            if here.kind != there.kind or here.statement is not there.statement:
                return False
            if here.kind == "opaque":
                return False
        return True

    def integer(self, name: str, at: Point | None = None, depth: int = 0) -> Lin | None:
        """``name`` as a linear form over tensor dimensions and constants, or ``None``."""
        if depth > _DEPTH:
            return None
        definition = self.definition(name, at)
        if definition.kind != "statement" or not isinstance(definition.statement, cst.SimpleStatementLine):
            return None
        (small,) = definition.statement.body
        where = definition.point
        if isinstance(small, cst.Assign) and len(small.targets) == 1:
            target = small.targets[0].target
            if isinstance(target, cst.Name) and target.value == name:
                return self.expression(small.value, where, depth + 1)
            if isinstance(target, cst.Tuple | cst.List):
                return self._unpacked(target, small.value, name, where, depth)
        if isinstance(small, cst.AnnAssign) and small.value is not None and m.matches(small.target, m.Name(name)):
            return self.expression(small.value, where, depth + 1)
        return None

    def _unpacked(self, target, value, name: str, where: Point, depth: int) -> Lin | None:
        if isinstance(value, cst.Tuple | cst.List) and len(value.elements) == len(target.elements):
            for element, source in zip(target.elements, value.elements, strict=True):
                if m.matches(element.value, m.Name(name)) and not isinstance(source, cst.StarredElement):
                    return self.expression(source.value, where, depth + 1)
            return None
        shape_of = self.shape_source(value, where, depth)
        if shape_of is None:
            return None
        elements = list(target.elements)
        starred = [i for i, e in enumerate(elements) if isinstance(e, cst.StarredElement)]
        if len(starred) > 1:
            return None
        for position, element in enumerate(elements):
            if isinstance(element, cst.Element) and m.matches(element.value, m.Name(name)):
                if starred and position > starred[0]:
                    position -= len(elements)  # counted from the end
                return Lin.of(Dim(shape_of, position))
        return None

    def shape_source(self, node: cst.BaseExpression, where: Point, depth: int = 0) -> str | None:
        """The tensor ``X`` (as written) when ``node`` is ``X.shape``/``X.size()`` or a name bound to one."""
        if isinstance(node, cst.NamedExpr):
            return self.shape_source(node.value, where, depth)
        if m.matches(node, m.Attribute(attr=m.Name("shape"))) or m.matches(
                node, m.Call(func=m.Attribute(attr=m.Name("size")), args=[])):
            tensor = node.value if isinstance(node, cst.Attribute) else node.func.value
            return code(tensor) if self.same_value(tensor, where) else None
        if isinstance(node, cst.Name) and depth < _DEPTH:
            definition = self.definition(node.value, where)
            if definition.kind == "statement" and isinstance(definition.statement, cst.SimpleStatementLine):
                (small,) = definition.statement.body
                if m.matches(small, m.Assign(targets=[m.AssignTarget(m.Name(node.value))])) or m.matches(
                        small, m.AnnAssign(target=m.Name(node.value))):
                    return self.shape_source(small.value, definition.point, depth + 1)
        return None

    def expression(self, node: cst.BaseExpression, where: Point, depth: int = 0) -> Lin | None:
        """An integer expression evaluated at ``where`` as a ``Lin``, or ``None``."""
        value = literal_int(node)
        if value is not None:
            return Lin((), value)
        if isinstance(node, cst.NamedExpr):
            return self.expression(node.value, where, depth)
        if isinstance(node, cst.Name):
            return self.integer(node.value, where, depth + 1)
        if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Add | cst.Subtract):
            left, right = self.expression(node.left, where, depth), self.expression(node.right, where, depth)
            if left is None or right is None:
                return None
            return left + right if isinstance(node.operator, cst.Add) else left - right
        if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
            inner = self.expression(node.expression, where, depth)
            return None if inner is None else -inner
        if isinstance(node, cst.Call) and self.qualified(node.func) == {"builtins.int"} and len(node.args) == 1:
            return self.expression(node.args[0].value, where, depth)
        dim = self.dimension(node, where, depth)
        return None if dim is None else Lin.of(dim)

    def dimension(self, node: cst.BaseExpression, where: Point, depth: int = 0) -> Dim | None:
        """``X.shape[i]``, ``X.size(i)``, ``X.size()[i]``, ``shape[i]`` with ``shape = X.shape``."""
        if isinstance(node, cst.Subscript) and len(node.slice) == 1 and isinstance(node.slice[0].slice, cst.Index):
            axis = literal_int(node.slice[0].slice.value)
            tensor = self.shape_source(node.value, where, depth)
            if axis is not None and tensor is not None:
                return Dim(tensor, axis)
            return None
        if m.matches(node, m.Call(func=m.Attribute(attr=m.Name("size")), args=[m.Arg()])):
            arg = node.args[0]
            if arg.keyword is not None and arg.keyword.value != "dim":
                return None
            axis = literal_int(arg.value)
            tensor = node.func.value
            if axis is not None and self.same_value(tensor, where):
                return Dim(code(tensor), axis)
        return None

    def same_shape(self, node: cst.BaseExpression, at: Point | None = None, depth: int = 0) -> set[str]:
        """Expressions (as written) that provably have ``node``'s shape: aliases, casts, ``flip``..."""
        found = {code(node)}
        if depth > _DEPTH:
            return found
        at = at or self.point
        if isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and \
                node.func.attr.value in _SHAPE_PRESERVING:
            return found | self.same_shape(node.func.value, at, depth + 1)
        if not isinstance(node, cst.Name):
            return found
        definition = self.definition(node.value, at)
        if definition.kind != "statement" or not isinstance(definition.statement, cst.SimpleStatementLine):
            return found
        (small,) = definition.statement.body
        if not isinstance(small, cst.Assign) or len(small.targets) != 1:
            return found
        target, value = small.targets[0].target, small.value
        if isinstance(target, cst.Tuple | cst.List) and isinstance(value, cst.Tuple | cst.List) and \
                len(target.elements) == len(value.elements):
            for element, source in zip(target.elements, value.elements, strict=True):
                if m.matches(element.value, m.Name(node.value)) and not isinstance(source, cst.StarredElement):
                    return found | self.same_shape(source.value, definition.point, depth + 1)
            return found
        if m.matches(target, m.Name(node.value)):
            return found | self.same_shape(value, definition.point, depth + 1)
        return found

    def dtypes(self, node: cst.BaseExpression, at: Point | None = None, depth: int = 0) -> tuple[DType, ...] | None:
        """The dtypes whose promotion is ``node``'s dtype where its definitions name them
        (``loss_mask = attention_mask.float() * (labels != -100)``), else ``None``."""
        at = at or self.point
        if depth > _DEPTH:
            return None
        if isinstance(node, cst.Comparison):
            return (DType.of("torch.bool"),)
        if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply | cst.BitAnd):
            left, right = self.dtypes(node.left, at, depth + 1), self.dtypes(node.right, at, depth + 1)
            return None if left is None or right is None else (*left, *right)
        if isinstance(node, cst.Subscript):
            return self.dtypes(node.value, at, depth + 1)
        if isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute):
            method = node.func.attr.value
            if method in METHOD_DTYPES and not node.args:
                return (DType.of(METHOD_DTYPES[method]),)
            if method == "to" and len(node.args) == 1:
                names = self.qualified(node.args[0].value)
                return (DType.of(next(iter(names))),) if len(names) == 1 and next(iter(names)) in CANONICAL else None
            if method in _DTYPE_PRESERVING:
                return self.dtypes(node.func.value, at, depth + 1)
            return None
        if isinstance(node, cst.Name):
            definition = self.definition(node.value, at)
            if definition.kind == "statement" and m.matches(definition.statement, m.SimpleStatementLine(
                    body=[m.Assign(targets=[m.AssignTarget(m.Name(node.value))])])):
                return self.dtypes(definition.statement.body[0].value, definition.point, depth + 1)
        return None
