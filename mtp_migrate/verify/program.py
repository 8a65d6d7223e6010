"""The two programs a site's verification runs: the original and the rewritten backward slice.

For one side, the program is the site (or its replacement) preceded by every statement
of the enclosing function that defines a name it reads, found through reaching
definitions and followed transitively, in source order. Imports are executed as
written. What is left free (parameters, attributes, globals, values from branches or
from calls the verifier cannot make, such as ``model(x)``) becomes an input *slot*:
a name, or an access path rooted at one (``batch["labels"]``, ``self.n_future``).

Nothing here comes from the recognizer: the slots, their kinds (tensor of some rank,
integer, dtype, device) and the outputs to compare are read off the two programs
alone. The outputs are the names the original binds that later code may read.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m
from libcst.metadata import MetadataWrapper

from mtp_migrate.cst_utils import code
from mtp_migrate.mtp_loop.dataflow import ALL, FlowIndex, Point, live_after, reaching_definition
from mtp_migrate.mtp_loop.names import binds
from mtp_migrate.refusals import Code, Refusal
from mtp_migrate.verify.slots import (
    SLOT_PREFIX,
    TENSOR_METHODS,
    Paths,
    Replace,
    Returns,
    Slot,
    hint,
    prologue,
    read_kinds,
    weight_paths,
)

_SAFE_BUILTINS = {"len", "range", "max", "min", "int", "float", "bool", "abs", "sum", "round", "tuple", "list",
                  "dict", "isinstance", "enumerate", "zip", "print", "getattr", "hasattr", "str", "divmod", "pow"}


@dataclass
class SiteProgram:
    """What the verification worker needs; plain data, so it can be hashed and sent to a process."""

    original: str
    rewritten: str
    slots: list[Slot]
    outputs: list[str]
    line: int
    utility: dict[str, str] = field(default_factory=dict)  # module -> file of the verified utility


class _Side:
    """One program: a region of a scope, its backward slice, and the imports it needs."""

    def __init__(self, point: Point, index: FlowIndex, module_imports: list[cst.SimpleStatementLine],
                 module_bound: set[str], outputs: list[str]):
        self.point = point
        self.index = index
        self.module_imports = module_imports
        self.module_bound = module_bound  # module-level names bound other than by an import
        self.region = list(point.block[point.start:point.stop])
        self.statements: dict[int, tuple[tuple, cst.BaseStatement]] = {}  # id -> (order key, statement)
        self.free: set[str] = set()
        self._slice(outputs)

    @staticmethod
    def _order(point: Point) -> tuple:
        return tuple(level.index for level in reversed(point.levels))

    def _slice(self, outputs: list[str]) -> None:
        # The outputs' earlier values too: a region that does not bind one leaves it as it was.
        work = [(name, self.point) for name in {*self.index.exposed_reads(self.region), *outputs}]
        seen: set[tuple[str, int]] = set()
        while work:
            name, at = work.pop()
            key = (name, id(at.block[at.start]) if at.start < len(at.block) else id(at.block))
            if key in seen:
                continue
            seen.add(key)
            definition = reaching_definition(self.index, at, name)
            if definition.kind != "statement":
                self.free.add(name)
                continue
            statement = definition.statement
            if id(statement) in self.statements:
                continue
            if not self._executable(statement) or self._unpacks_free(statement, definition.point):
                self.free |= binds(statement)  # a value the verifier cannot compute: it becomes an input
                continue
            self.statements[id(statement)] = (self._order(definition.point), statement)
            for read in self.index.exposed_reads([statement]):
                work.append((read, definition.point))

    def _unpacks_free(self, statement: cst.BaseStatement, at: Point) -> bool:
        """``a, b = batch`` with ``batch`` an input: its parts are the inputs (no value can be guessed whole)."""
        if not m.matches(statement, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple() | m.List())],
                                                                         value=m.Name())])):
            return False
        return reaching_definition(self.index, at, statement.body[0].value.value).kind != "statement"

    def _executable(self, statement: cst.BaseStatement) -> bool:
        """No call into code the verifier cannot run (``model(x)``, ``self.helper()``), no attribute stores."""
        if m.findall(statement, m.AssignTarget(target=m.Attribute())):
            return False
        if isinstance(statement, cst.FunctionDef | cst.ClassDef):
            return True
        local = set()
        for small in getattr(statement, "body", ()):
            if isinstance(small, cst.Import | cst.ImportFrom):
                local |= binds(small)
        for call in m.findall(statement, m.Call()):
            if not self._callable(call.func, local):
                return False
        return True

    def _callable(self, func: cst.BaseExpression, local: set[str]) -> bool:
        root = func
        while isinstance(root, cst.Attribute | cst.Subscript | cst.Call):
            root = root.value if not isinstance(root, cst.Call) else root.func
        if not isinstance(root, cst.Name):
            return True  # a method of a literal or a parenthesised expression
        name = root.value
        if name in local or self._imported(name):
            return True
        if func is root:
            return name in _SAFE_BUILTINS and name not in self.module_bound
        return isinstance(func, cst.Attribute) and func.attr.value in TENSOR_METHODS

    def _imported(self, name: str) -> bool:
        return name not in self.module_bound and any(name in binds(s) for s in self.module_imports)

    def body(self) -> list[cst.BaseStatement]:
        ordered = [s for _, s in sorted(self.statements.values(), key=lambda item: item[0])]
        return ordered + self.region

    def imports(self, names: set[str]) -> list[cst.SimpleStatementLine]:
        """The module's import lines that bind any of ``names``, narrowed to those names
        (``__future__`` and relative ones left out)."""
        chosen, apart = [], False
        for statement in self.module_imports:
            small = statement.body[0]
            # A blank line where the module had one: its import sections stay apart (emitted tests pass isort).
            apart |= bool(chosen) and any(line.comment is None for line in statement.leading_lines)
            if isinstance(small, cst.ImportFrom) and (small.relative or (
                    small.module is not None and code(small.module) == "__future__")):
                continue
            if binds(statement) & names:
                chosen.append(_narrowed(statement, names).with_changes(leading_lines=[cst.EmptyLine()] if apart else []))
                apart = False
        return chosen


def _narrowed(statement: cst.SimpleStatementLine, names: set[str]) -> cst.SimpleStatementLine:
    """``from m import a, b, c`` -> ``from m import b`` when only ``b`` is read: the names the program does not
    read are not its business (the utility module stands in for the target's, and has only the utility)."""
    small = statement.body[0]
    if not isinstance(small, cst.ImportFrom) or isinstance(small.names, cst.ImportStar):
        return statement
    kept = [alias.with_changes(comma=cst.MaybeSentinel.DEFAULT) for alias in small.names
            if (alias.evaluated_alias or alias.evaluated_name) in names]
    return statement.with_changes(body=[small.with_changes(names=kept, lpar=None, rpar=None)])


def _module_context(module: cst.Module) -> tuple[list[cst.SimpleStatementLine], set[str]]:
    imports, other = [], set()
    for statement in module.body:
        if m.matches(statement, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])):
            imports.append(statement)
        else:
            other |= binds(statement)
    return imports, other


def _outputs(old: Point, new: Point, new_index: FlowIndex) -> list[str]:
    """Names either region binds that the code after the new region may read.

    The new function's continuation is what runs after the new region; a name only an
    old, since rewritten, site read is not its business (that site is verified on its own).
    """
    live = live_after(new_index, new)
    if live is ALL:
        raise Refusal(Code.NOT_RUNNABLE, "the function inspects its own locals (locals(), eval, exec)")
    bound = set()
    for point in (old, new):
        bound |= set().union(*(binds(s) for s in point.block[point.start:point.stop]))
    return sorted(bound & live)


def build(original: tuple[Point, FlowIndex, cst.Module], rewritten: tuple[Point, FlowIndex, cst.Module],
          line: int, added_imports: list[cst.SimpleStatementLine] = (), utility: dict[str, str] | None = None
          ) -> SiteProgram:
    """The two programs for a site; raises ``Refusal`` (MTP204) for a site the verifier cannot run."""
    old_point, old_index, old_module = original
    new_point, new_index, new_module = rewritten
    outputs = _outputs(old_point, new_point, new_index)
    sides = []
    for point, index, module, extra in ((old_point, old_index, old_module, []),
                                        (new_point, new_index, new_module, list(added_imports))):
        imports, bound = _module_context(module)
        sides.append(_Side(point, index, imports + extra, bound, outputs))
    old, new = sides
    roots = set()
    for side in sides:
        roots |= {n for n in side.free if not side._imported(n) and not (
            hasattr(builtins, n) and n not in side.module_bound)}
    slots: dict[str, Slot] = {}
    bodies, readable = [], []
    for side, name in ((old, "original"), (new, "rewritten")):
        body = [*side.imports(side.free), *side.body()]
        module = cst.Module(body=[cst.FunctionDef(name=cst.Name(name), params=cst.Parameters(),
                                                  body=cst.IndentedBlock(body=body))])
        wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
        survey = Paths(roots)
        wrapper.visit(survey)
        paths = Paths(roots, survey.fielded)
        wrapper.visit(paths)
        if paths.mixed():
            raise Refusal(Code.NOT_RUNNABLE, f"`{sorted(paths.mixed())[0]}` is used both whole and through its fields")
        params = {}
        for text, nodes in paths.nodes.items():
            slot = slots.setdefault(text, Slot(f"{SLOT_PREFIX}{len(slots)}", text, "scalar", hint=hint(text)))
            params.update((id(node), slot.param) for node in nodes)
        readable.append(module.visit(Replace(params)))
        bodies.append((name, body))
    parameters = cst.Parameters(params=[cst.Param(cst.Name(s.param)) for s in slots.values()])
    binding = prologue(slots)
    sources = []
    for name, body in bodies:
        function = cst.FunctionDef(name=cst.Name(name), params=parameters, body=cst.IndentedBlock(
            body=[*binding, *body, cst.parse_statement("return None\n")]))
        sources.append(cst.Module(body=[function]).visit(Returns()).code)
    read_kinds(cst.Module(body=[*readable[0].body, *readable[1].body]), slots)
    for path in weight_paths(readable[1], new.module_imports, utility or {}):
        for slot in slots.values():
            slot.weights |= slot.param == path
    return SiteProgram(original=sources[0], rewritten=sources[1], slots=list(slots.values()),
                       outputs=outputs, line=line, utility=dict(utility or {}))
