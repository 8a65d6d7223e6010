"""Names in the flow of one function: what a statement reads and binds, which definition
reaches a point, and which names are still read after it (liveness).

Everything here errs on the side of "read" and "live": a name read anywhere in a nested
function or lambda is live throughout, ``finally``/``except``/``else`` blocks and loop
back edges are followed, and ``locals()``/``eval``/``exec`` make every name live. A
definition reaches a point only if it is the single straight-line one; anything bound
in a branch, a loop or a handler is ``OPAQUE``.

``FlowIndex`` holds the per-function facts and memoises ``reads``; make one per module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from codemods.cst_utils import code

# Calls that read every local name by their nature.
_INTROSPECTION = {"locals", "vars", "eval", "exec", "dir", "globals"}


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


def binds(node: cst.CSTNode) -> set[str]:
    collector = _Binds()
    node.visit(collector)
    return collector.names


def target_names(target: cst.BaseExpression) -> set[str]:
    """Names an assignment or loop target binds (``a, (b, *c)`` binds a, b and c)."""
    collector = _Binds()
    collector._target(target)
    return collector.names


def header_binds(statement: cst.BaseCompoundStatement) -> set[str]:
    """Names a compound statement binds in its own header: loop targets, ``as`` names, walruses in tests."""
    names = target_names(statement.target) if isinstance(statement, cst.For) else set()
    for header in _headers(statement):
        if not (isinstance(statement, cst.For) and header is statement.target):
            names |= binds(header)
    return names


def _straight_line_binds(small: cst.BaseSmallStatement) -> tuple[set[str], set[str]]:
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
            added, removed = _straight_line_binds(small)
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


def _suites(statement: cst.BaseCompoundStatement) -> Iterable[Sequence[cst.BaseStatement]]:
    """The statement blocks inside a compound statement, in the order they can run."""
    for child in statement.children:
        if isinstance(child, cst.IndentedBlock):
            yield child.body
        elif isinstance(child, cst.SimpleStatementSuite):
            yield [cst.SimpleStatementLine(body=child.body)]
        elif isinstance(child, cst.Else | cst.Finally | cst.ExceptHandler | cst.ExceptStarHandler):
            yield from _suites(child)
        elif isinstance(child, cst.If):  # elif
            yield from _suites(child)
        elif isinstance(child, cst.MatchCase):
            yield from _suites(child)


def _headers(statement: cst.BaseCompoundStatement) -> list[cst.CSTNode]:
    """The expressions a compound statement evaluates itself (tests, iterables, context managers)."""
    parts = []
    for child in statement.children:
        if isinstance(child, cst.BaseSuite | cst.Else | cst.Finally | cst.EmptyLine | cst.Decorator):
            continue
        if isinstance(child, cst.If):
            parts.extend(_headers(child))
        elif isinstance(child, cst.ExceptHandler | cst.ExceptStarHandler):
            if child.type is not None:
                parts.append(child.type)
        elif isinstance(child, cst.CSTNode):
            parts.append(child)
    return parts


class FlowIndex:
    """Per-module memo of reads, plus the enclosing blocks of every statement."""

    def __init__(self):
        self._reads: dict[int, tuple[cst.CSTNode, frozenset[str]]] = {}

    def reads(self, node: cst.CSTNode) -> frozenset[str]:
        cached = self._reads.get(id(node))
        if cached is None or cached[0] is not node:
            collector = _Reads()
            node.visit(collector)
            cached = (node, frozenset(collector.names))
            self._reads[id(node)] = cached
        return cached[1]

    def exposed_reads(self, statements: Sequence[cst.BaseStatement], killed: set[str] | None = None) -> set[str]:
        """Names the statements may read before binding them (``killed`` names are bound already)."""
        killed = set() if killed is None else set(killed)
        found: set[str] = set()
        for statement in statements:
            if isinstance(statement, cst.SimpleStatementLine):
                for small in statement.body:
                    found |= self.reads(small) - killed
                    added, removed = _straight_line_binds(small)
                    killed = (killed | added) - removed
                continue
            if isinstance(statement, cst.FunctionDef | cst.ClassDef):
                found |= self.reads(statement) - killed  # closures: whatever they read may be read
                killed.add(statement.name.value)
                continue
            for header in _headers(statement):
                if isinstance(statement, cst.For) and header is statement.target:
                    reader = _Reads()
                    reader._target(header)  # x[i] as a loop target reads x and i
                    found |= reader.names - killed
                else:
                    found |= self.reads(header) - killed
            inner = set(killed)
            inner |= header_binds(statement)
            for suite in _suites(statement):
                found |= self.exposed_reads(suite, inner)
            killed |= definitely_binds(statement)
        return found


@dataclass(frozen=True)
class Level:
    """One enclosing block of a point: ``block[index]`` is the statement holding the point."""

    block: tuple[cst.BaseStatement, ...]
    index: int
    owner: cst.CSTNode  # the compound statement, function or module whose block this is
    role: str  # "body", "orelse", "handler", "finally"


@dataclass(frozen=True)
class Point:
    """A statement range ``block[start:stop]`` and its enclosing blocks, innermost first."""

    scope: cst.FunctionDef | cst.Module
    levels: tuple[Level, ...]
    stop: int

    @property
    def block(self) -> tuple[cst.BaseStatement, ...]:
        return self.levels[0].block

    @property
    def start(self) -> int:
        return self.levels[0].index


def locate(scope: cst.FunctionDef | cst.Module, target: cst.BaseStatement) -> Point | None:
    """The point of ``target`` inside ``scope`` (not inside a nested function), or ``None``."""
    found: list[Level] = []

    def search(block: Sequence[cst.BaseStatement], owner, role) -> bool:
        block = tuple(block)
        for index, statement in enumerate(block):
            if statement is target:
                found.append(Level(block, index, owner, role))
                return True
            if isinstance(statement, cst.BaseCompoundStatement) and not isinstance(
                    statement, cst.FunctionDef | cst.ClassDef):
                for inner_block, inner_owner, inner_role in blocks_of(statement):
                    if search(inner_block, inner_owner, inner_role):
                        found.append(Level(block, index, owner, role))
                        return True
        return False

    body = scope.body.body if isinstance(scope, cst.FunctionDef) else scope.body
    if not search(body, scope, "body"):
        return None
    return Point(scope, tuple(found), found[0].index + 1)


def blocks_of(statement: cst.BaseCompoundStatement):
    """``(block, owner, role)`` for each statement block directly inside ``statement``."""
    def block_of(suite):
        if isinstance(suite, cst.IndentedBlock):
            return suite.body
        return [cst.SimpleStatementLine(body=suite.body)]

    yield block_of(statement.body), statement, "body"
    if isinstance(statement, cst.Try | cst.TryStar):
        for handler in statement.handlers:
            yield block_of(handler.body), statement, "handler"
        if statement.orelse is not None:
            yield block_of(statement.orelse.body), statement, "orelse"
        if statement.finalbody is not None:
            yield block_of(statement.finalbody.body), statement, "finally"
        return
    orelse = getattr(statement, "orelse", None)
    if isinstance(orelse, cst.If):
        yield from ((b, o, "orelse" if o is statement else r) for b, o, r in blocks_of(orelse))
    elif orelse is not None:
        yield block_of(orelse.body), statement, "orelse"
    if isinstance(statement, cst.Match):
        for case in statement.cases:
            yield block_of(case.body), statement, "body"


ALL = frozenset({"*"})  # every name: the function inspects its own locals


def live_after(index: FlowIndex, point: Point) -> frozenset[str]:
    """Names that may be read after ``block[start:stop]`` before being rebound (or ``ALL``)."""
    scope = point.scope
    if _introspects(index, scope):
        return ALL
    found: set[str] = set()
    for depth, level in enumerate(point.levels):
        after = level.index + 1 if depth else point.stop
        found |= index.exposed_reads(level.block[after:])
        owner = level.owner
        if isinstance(owner, cst.For | cst.While):
            if level.role == "body":  # the next iteration, then the loop's else
                found |= index.exposed_reads(level.block, header_binds(owner) if isinstance(owner, cst.For) else set())
                found |= index.reads(owner.test) if isinstance(owner, cst.While) else set()
                if owner.orelse is not None:
                    found |= index.exposed_reads(owner.orelse.body.body)
        elif isinstance(owner, cst.Try | cst.TryStar):
            if level.role == "body":  # an exception after the point reaches the handlers
                for handler in owner.handlers:
                    found |= index.exposed_reads(handler.body.body)
                if owner.orelse is not None:
                    found |= index.exposed_reads(owner.orelse.body.body)
            if level.role in ("body", "handler", "orelse") and owner.finalbody is not None:
                found |= index.exposed_reads(owner.finalbody.body.body)
    if isinstance(scope, cst.Module):
        found |= index.reads(scope)  # any function of the module may read a global
    else:
        found |= _closure_reads(index, scope) | _declared_outside(scope)
    return frozenset(found)


def _introspects(index: FlowIndex, scope) -> bool:
    calls = m.findall(scope, m.Call(func=m.Name()))
    return any(call.func.value in _INTROSPECTION for call in calls)


def _closure_reads(index: FlowIndex, scope: cst.FunctionDef) -> set[str]:
    """Names nested functions and lambdas read from the enclosing function (their free names)."""
    found: set[str] = set()
    for node in m.findall(scope.body, m.FunctionDef() | m.Lambda() | m.ClassDef()):
        own: set[str] = set()
        if isinstance(node, cst.FunctionDef | cst.Lambda):
            params = node.params
            own = {p.name.value for p in (*params.params, *params.kwonly_params, *params.posonly_params)}
            own |= {p.name.value for p in (params.star_arg, params.star_kwarg) if isinstance(p, cst.Param)}
        if isinstance(node, cst.FunctionDef):
            own |= set().union(*(binds(s) for s in node.body.body)) - _declared_outside(node)
        found |= index.reads(node) - own
    return found


def _declared_outside(scope: cst.FunctionDef) -> set[str]:
    names = set()
    for node in m.findall(scope.body, m.Global() | m.Nonlocal()):
        names |= {item.name.value for item in node.names}
    return names


@dataclass(frozen=True)
class Definition:
    """How a name gets its value at a point.

    ``kind`` is ``"statement"`` (the single straight-line definition ``statement``, at
    ``point``), ``"opaque"`` (bound in a branch, a loop, a handler or a loop header),
    ``"parameter"`` or ``"global"`` (not bound in the function).
    """

    kind: str
    statement: cst.BaseStatement | None = None
    point: Point | None = None


OPAQUE = Definition("opaque")


def reaching_definition(index: FlowIndex, point: Point, name: str) -> Definition:
    """The definition of ``name`` that reaches ``block[start]`` of ``point``."""
    scope = point.scope
    for depth, level in enumerate(point.levels):
        found = _search_backwards(level.block[:level.index], name, point.levels[depth:], scope)
        if found is not None:
            return found
        owner = level.owner
        if isinstance(owner, cst.BaseCompoundStatement) and name in header_binds(owner):
            return OPAQUE  # a loop variable, a walrus in a test, a context manager's value
        if isinstance(owner, cst.For | cst.While) and any(name in binds(s) for s in level.block):
            return OPAQUE  # the value may come from the previous iteration
        if isinstance(owner, cst.Try | cst.TryStar) and level.role != "body" and name in binds(owner):
            return OPAQUE  # the try body may have stopped anywhere
    if isinstance(scope, cst.FunctionDef):
        params = scope.params
        if any(p.name.value == name for p in (*params.params, *params.kwonly_params, *params.posonly_params)):
            return Definition("parameter")
        star = [p for p in (params.star_arg, params.star_kwarg) if isinstance(p, cst.Param)]
        if any(p.name.value == name for p in star):
            return Definition("parameter")
    return Definition("global")


def _search_backwards(statements, name: str, levels: tuple[Level, ...], scope) -> Definition | None:
    for position in range(len(statements) - 1, -1, -1):
        statement = statements[position]
        if name not in binds(statement):
            continue
        if isinstance(statement, cst.With) and name not in {
                n for item in statement.items if item.asname for n in binds(item.asname)}:
            inner = statement.body.body
            level = Level(tuple(inner), len(inner), statement, "body")
            found = _search_backwards(inner, name, (level, *_with_position(levels, position)), scope)
            return found if found is not None else OPAQUE
        if name in definitely_binds(statement) and (
                isinstance(statement, cst.SimpleStatementLine | cst.FunctionDef | cst.ClassDef)):
            if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) != 1:
                return OPAQUE  # `a = 1; b = a` on one line: keep slices statement-sized
            return Definition("statement", statement, Point(scope, _with_position(levels, position), position + 1))
        return OPAQUE
    return None


def _with_position(levels: tuple[Level, ...], position: int) -> tuple[Level, ...]:
    first = levels[0]
    return (Level(first.block, position, first.owner, first.role), *levels[1:])
