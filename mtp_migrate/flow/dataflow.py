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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import libcst as cst
import libcst.matchers as m

from mtp_migrate.flow.names import (
    binds,
    definitely_binds,
    header_binds,
    headers,
    reads,
    straight_line_binds,
    suites,
    target_reads,
)

# Calls that read every local name by their nature.
_INTROSPECTION = {"locals", "vars", "eval", "exec", "dir", "globals"}


class FlowIndex:
    """Per-module memo of reads, plus the enclosing blocks of every statement."""

    def __init__(self):
        self._reads: dict[int, tuple[cst.CSTNode, frozenset[str]]] = {}
        self._outside: dict[int, tuple[cst.CSTNode, frozenset[str] | None]] = {}

    def outside_reads(self, scope: cst.FunctionDef | cst.Module) -> frozenset[str] | None:
        """What may read a scope's names besides its own statements: its closures' free names and its
        global/nonlocal declarations (a module: any function). ``None`` if it inspects its own locals."""
        cached = self._outside.get(id(scope))
        if cached is None or cached[0] is not scope:
            if _introspects(scope):
                value = None
            elif isinstance(scope, cst.Module):
                value = self.reads(scope)
            else:
                value = frozenset(_closure_reads(self, scope) | _declared_outside(scope))
            cached = (scope, value)
            self._outside[id(scope)] = cached
        return cached[1]

    def reads(self, node: cst.CSTNode) -> frozenset[str]:
        cached = self._reads.get(id(node))
        if cached is None or cached[0] is not node:
            cached = (node, frozenset(reads(node)))
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
                    added, removed = straight_line_binds(small)
                    killed = (killed | added) - removed
                continue
            if isinstance(statement, cst.FunctionDef | cst.ClassDef):
                found |= self.reads(statement) - killed  # closures: whatever they read may be read
                killed.add(statement.name.value)
                continue
            for header in headers(statement):
                if isinstance(statement, cst.For) and header is statement.target:
                    found |= target_reads(header) - killed
                else:
                    found |= self.reads(header) - killed
            inner = set(killed)
            inner |= header_binds(statement)
            for suite in suites(statement):
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

    if isinstance(statement, cst.Match):  # its blocks are its cases' (it has no body of its own)
        for case in statement.cases:
            yield block_of(case.body), statement, "body"
        return
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


ALL = frozenset({"*"})  # every name: the function inspects its own locals


def live_after(index: FlowIndex, point: Point) -> frozenset[str]:
    """Names that may be read after ``block[start:stop]`` before being rebound (or ``ALL``)."""
    outside = index.outside_reads(point.scope)
    if outside is None:
        return ALL
    found: set[str] = set(outside)
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
    return frozenset(found)


def _introspects(scope) -> bool:
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
    ``point``), ``"change"`` (a straight-line statement that may change the name's value in
    place, asked for with ``changes``), ``"opaque"`` (bound or changed in a branch, a loop, a
    handler or a loop header), ``"parameter"`` or ``"global"`` (not bound in the function).
    """

    kind: Literal["statement", "change", "opaque", "parameter", "global"]
    statement: cst.BaseStatement | None = None
    point: Point | None = None


OPAQUE = Definition("opaque")


Changes = Callable[[cst.BaseStatement], frozenset[str]]  # names whose value a statement may change in place


def reaching_definition(index: FlowIndex, point: Point, name: str, changes: Changes | None = None) -> Definition:
    """The definition of ``name`` that reaches ``block[start]`` of ``point``; with ``changes``, a
    statement that may change the name's value in place (``x.a = 1``, ``x.add_(1)``) counts too."""
    scope = point.scope
    for depth, level in enumerate(point.levels):
        found = _search_backwards(level.block[:level.index], name, point.levels[depth:], scope, changes)
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


def _search_backwards(statements, name: str, levels: tuple[Level, ...], scope,
                      changes: Changes | None = None) -> Definition | None:
    for position in range(len(statements) - 1, -1, -1):
        statement = statements[position]
        changed = changes is not None and name in changes(statement)
        if name not in binds(statement) and not changed:
            continue
        if isinstance(statement, cst.With) and name not in {
                n for item in statement.items if item.asname for n in binds(item.asname)}:
            inner = statement.body.body
            level = Level(tuple(inner), len(inner), statement, "body")
            found = _search_backwards(inner, name, (level, *_with_position(levels, position)), scope, changes)
            return found if found is not None else OPAQUE
        if name in definitely_binds(statement) and (
                isinstance(statement, cst.SimpleStatementLine | cst.FunctionDef | cst.ClassDef)):
            if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) != 1:
                return OPAQUE  # `a = 1; b = a` on one line: keep slices statement-sized
            return Definition("statement", statement, Point(scope, _with_position(levels, position), position + 1))
        if changed and name not in binds(statement) and isinstance(statement, cst.SimpleStatementLine) and \
                len(statement.body) == 1:
            return Definition("change", statement, Point(scope, _with_position(levels, position), position + 1))
        return OPAQUE
    return None


def _with_position(levels: tuple[Level, ...], position: int) -> tuple[Level, ...]:
    first = levels[0]
    return (Level(first.block, position, first.owner, first.role), *levels[1:])
