"""The two programs a site's verification runs: the original and the rewritten code as it
really runs (``docs/verification.md``).

For one side, the program is the site (or its replacement) preceded by its backward slice:
every statement of the enclosing function that defines, or may change in place, a name it
reads, found through reaching definitions and followed transitively, in source order. A
statement runs only under the execution policy (``policy.py``): one that does not is not
run, and the names it defines or may change become inputs *at its position* (a project
function's result, a value from ``model(x)``, a tensor handed to an unknown call). What is
left free (parameters, attributes, globals, values from branches, names imported from
modules that are never imported) becomes an input *slot*: a name, or an access path rooted
at one (``batch["labels"]``, ``self.n_future``).

What wraps the site is part of the program or a refusal (MTP207): ``with`` items and the
function's grad-mode decorators run around it, ``except`` clauses the site's errors could
reach are modelled (which clause caught what is an output), other decorators are refused.
So is what runs after it (MTP209): later code that changes the logits the call keeps for
backward runs in the program, or the site is refused. Names the module may rebind or read
dynamically (``globals()``, ``exec``, a star import, frame introspection) refuse the site
(MTP208).

Nothing here comes from the recognizer: the analysis is ``mtp_migrate.flow``'s, the slots,
their kinds and the outputs to compare are read off the two programs and their functions.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import libcst as cst
import libcst.matchers as m
from libcst.metadata import MetadataWrapper

from mtp_migrate.cst_utils import code, dotted
from mtp_migrate.flow.dataflow import ALL, FlowIndex, Level, Point, live_after, reaching_definition
from mtp_migrate.flow.names import CallKind, binds, changed_in_place, root_name
from mtp_migrate.refusals import Code, Refusal
from mtp_migrate.verify.policy import (
    ModuleNames,
    allowed,
    builtin_exception,
    import_bindings,
    importable,
    why_not,
)
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

CAUGHT = "_mtp_caught"  # which modelled `except` clause caught what: an output like any other
_HAVOC = "_mtp_input_here"  # placeholder: the names an unrun statement defines become inputs here
# Decorators that run the function as written.
_TRANSPARENT_DECORATORS = {"staticmethod", "classmethod", "property", "functools.wraps", "abc.abstractmethod",
                           "typing.overload", "typing.final", "functools.cache", "functools.lru_cache"}
_NO_GRAD = {"torch.no_grad", "torch.inference_mode", "torch.set_grad_enabled"}
# Frame introspection reads a function's locals from elsewhere.
_FRAME_ATTRIBUTES = {"_getframe", "currentframe", "f_locals", "f_globals", "f_back", "getouterframes", "tb_frame"}
_DYNAMIC_CALLS = {"globals", "exec", "__import__"}


@dataclass
class SiteProgram:
    """What the verification worker needs; plain data, so it can be hashed and sent to a process."""

    original: str
    rewritten: str
    slots: list[Slot]
    outputs: list[str]
    line: int
    utility: dict[str, str] = field(default_factory=dict)  # module -> file of the verified utility


def _line(module: cst.Module, node: cst.CSTNode) -> str:
    """``line N`` of ``node`` (by counting: no position metadata is kept for these modules)."""
    text = module.code
    snippet = code(node).strip().splitlines()[0] if code(node).strip() else ""
    index = text.find(snippet) if snippet else -1
    return f"line {text.count(chr(10), 0, index) + 1}" if index >= 0 else "a line"


class _Module:
    """What a module's code says about the names its functions read from it.

    ``utility`` maps the utility's module names to the names its file defines: those (and only
    those) are given to the rewritten program, loaded from the file by path."""

    def __init__(self, module: cst.Module, utility: dict[str, frozenset[str]]):
        self.module = module
        self.names = ModuleNames.of(module)
        self.utility = utility
        self.trusted = frozenset(f"{module}.{name}" for module, names in utility.items() for name in names)
        self.declared_global = {item.name.value for node in m.findall(module, m.Global()) for item in node.names}
        self._bindings: dict[str, tuple[str, cst.CSTNode | None]] = {}
        self.dynamic = _dynamic(module)

    def binding(self, name: str) -> tuple[str, cst.CSTNode | None]:
        """How the module binds ``name`` when a function runs, by its last top-level binding:
        ``("import", line)``, ``("other", statement)``, ``("star", line)`` (a star import of a module
        that is never imported may have rebound it) or ``("none", None)``."""
        if name not in self._bindings:
            last: tuple[str, cst.CSTNode | None] = ("none", None)
            for statement in self.module.body:
                small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) and len(
                    statement.body) == 1 else None
                if isinstance(small, cst.ImportFrom) and isinstance(small.names, cst.ImportStar):
                    if not self._importable_star(statement):
                        last = ("star", statement)
                elif isinstance(small, cst.Import | cst.ImportFrom):
                    if name in import_bindings(small):
                        last = ("import", statement)
                elif name in binds(statement):
                    last = ("other", statement)
            self._bindings[name] = last
        return self._bindings[name]

    @staticmethod
    def _importable_star(statement: cst.SimpleStatementLine) -> bool:
        node = statement.body[0]
        return not node.relative and node.module is not None and importable(code(node.module))

    def _star(self) -> cst.SimpleStatementLine | None:
        return next((s for _, s in self.names.stars if self._importable_star(s)), None)

    def source(self, name: str) -> cst.SimpleStatementLine | None:
        """The import line (or importable star import) ``name`` comes from, if the program imports it."""
        kind, where = self.binding(name)
        if kind == "import":
            return where if self.resolve(name) is not None else None
        if kind == "none" and not hasattr(builtins, name):
            return self._star()
        return None

    def resolve(self, name: str) -> str | None:
        """What a global ``name`` is when a function runs: a qualified name (one of ``trusted`` for the
        utility's own names, loaded from its file), or ``None`` (an input). Raises ``Refusal`` (MTP208)
        where the code cannot say."""
        if name in self.declared_global:
            raise Refusal(Code.DYNAMIC_NAMES, f"`{name}` is declared `global` in a function, which may rebind it")
        kind, where = self.binding(name)
        if kind == "star":
            raise Refusal(Code.DYNAMIC_NAMES, f"`{code(where).strip()}` ({_line(self.module, where)}) may rebind "
                                              f"`{name}`, and the verifier never imports that module")
        if kind == "import":
            qualified = import_bindings(where.body[0])[name]
            if qualified.rpartition(".")[0] in self.utility:
                return qualified if qualified in self.trusted else None
            return qualified if importable(qualified) and not qualified.startswith(".") else None
        if kind == "other":
            return None
        if hasattr(builtins, name):
            return f"builtins.{name}"
        star = self._star()
        return f"{code(star.body[0].module)}.{name}" if star is not None else None

    def qualified_name(self, name: str) -> str | None:
        """The qualified name of an imported or builtin ``name``, importable or not (for decorators)."""
        kind, where = self.binding(name)
        if kind == "import":
            return import_bindings(where.body[0])[name]
        return f"builtins.{name}" if kind == "none" and hasattr(builtins, name) else None


@lru_cache(maxsize=16)  # both sides of every site of a module ask; modules hash by identity
def _dynamic(module: cst.Module) -> str | None:
    """Why names of a module may be rebound or read at run time beyond what its code says."""
    names = ModuleNames.of(module)
    for call in m.findall(module, m.Call(func=m.Name())):
        name, first = call.func.value, call.args[0].value if call.args else None
        rebinds = name in _DYNAMIC_CALLS or (
            name in ("setattr", "delattr", "vars") and isinstance(first, cst.Name) and first.value in names.imports
        ) or (name == "eval" and not (isinstance(first, cst.SimpleString) and ":=" not in first.value))
        if rebinds:
            return f"`{code(call).strip()[:60]}` ({_line(module, call)}) may rebind names the site reads"
    for target in m.findall(module, m.AssignTarget(target=m.Attribute()) | m.AugAssign(target=m.Attribute())):
        root = root_name(target.target)
        if root in names.imports:  # `F.cross_entropy = smoothed_ce`: a monkeypatch
            return f"`{code(target.target)}` is assigned ({_line(module, target)}): the module's " \
                   f"`{root}` is changed at run time"
    for node in m.findall(module, m.Attribute()):
        if node.attr.value in _FRAME_ATTRIBUTES:
            return f"`{code(node)}` ({_line(module, node)}) reads a function's locals from outside it"
        if dotted(node) in ("sys.modules", "inspect.stack", "inspect.trace"):
            return f"`{code(node)}` ({_line(module, node)}) may rebind or read any name"
    for name in m.findall(module, m.Name()):
        if name.value in ("__builtins__", "__dict__"):
            return f"`{name.value}` ({_line(module, name)}) may rebind any name"
    if names.imports.get("builtins") == "builtins":
        return "the module imports `builtins`, whose names it may rebind"
    return None


def _params(scope) -> dict[str, cst.Param]:
    if not isinstance(scope, cst.FunctionDef):
        return {}
    p = scope.params
    found = {param.name.value: param for param in (*p.params, *p.kwonly_params, *p.posonly_params)}
    found.update((param.name.value, param) for param in (p.star_arg, p.star_kwarg) if isinstance(param, cst.Param))
    return found


def _declared_kinds(scope) -> dict[str, str]:
    """Kinds the function's signature declares: ``device: torch.device``, ``n: int = 4``, ``x: Tensor``."""
    kinds = {}
    for name, param in _params(scope).items():
        annotation = dotted(param.annotation.annotation) if param.annotation is not None else None
        last = (annotation or "").split(".")[-1]
        if last in ("device",):
            kinds[name] = "device"
        elif last == "dtype":
            kinds[name] = "dtype"
        elif last == "Tensor":
            kinds[name] = "tensor"
        elif last in ("int", "float", "bool") or isinstance(param.default, cst.Integer | cst.Float):
            kinds[name] = "scalar"
    return kinds


def _enclosing(module: cst.Module, scope) -> list:
    """The functions and classes around ``scope`` (outermost first), ``scope`` included."""
    if isinstance(scope, cst.Module):
        return []
    path: list = []

    def search(node, trail) -> bool:
        for child in node.children:
            here = [*trail, child] if isinstance(child, cst.FunctionDef | cst.ClassDef) else trail
            if child is scope:
                path.extend(here)
                return True
            if search(child, here):
                return True
        return False

    search(module, [])
    return path


def _nested(statements) -> set[int]:
    """Ids of the statements in ``statements`` and in every block inside them."""
    found = set()
    for statement in statements:
        found.add(id(statement))
        found |= {id(s) for s in m.findall(statement, m.SimpleStatementLine() | m.BaseCompoundStatement())}
    return found


class _Side:
    """One program: a region of a scope, its slice, what wraps it and what follows it."""

    def __init__(self, point: Point, index: FlowIndex, module: cst.Module, context: _Module, outputs: list[str],
                 kept_for_backward: set[str]):
        self.point = point
        self.index = index
        self.module = module
        self.context = context
        self.region = list(point.block[point.start:point.stop])
        self.inside_region = _nested(self.region)
        self.region_binds = frozenset().union(*(binds(s) for s in self.region))
        self.statements: dict[int, tuple[tuple, cst.BaseStatement]] = {}  # id -> (order key, statement)
        self.havoc: dict[int, tuple[tuple, set[str]]] = {}  # id -> (order key, names that become inputs)
        self.free: set[str] = set()
        self.free_at_start: set[str] = set()  # as opposed to free only from an unrun statement on
        self.globals: set[str] = set()  # free names read from the module (imports, builtins, its values)
        self._runs: dict[int, bool] = {}
        self._changed: dict[int, frozenset[str]] = {}
        self.wrappers: list[tuple[str, cst.CSTNode]] = []  # ("with", With) | ("try", Try), innermost first
        self.no_grad = False
        self.decorator_modes: list[cst.Decorator] = []
        self.context_reads: list[tuple[str, Point]] = []  # what the modelled `with` items and handlers read
        self._context()
        self._check_region()
        self._slice(outputs, self._continuation(kept_for_backward))

    # -- what may run ---------------------------------------------------------------------

    def _resolver(self, at: Point, local: frozenset[str] = frozenset()):
        def resolve(name: str) -> str | None:
            if name in local:
                return "local"
            definition = reaching_definition(self.index, at, name)
            if definition.kind == "statement":
                small = definition.statement.body[0] if isinstance(definition.statement,
                                                                   cst.SimpleStatementLine) else None
                if isinstance(small, cst.Import | cst.ImportFrom):
                    qualified = import_bindings(small).get(name, "")
                    given = qualified in self.context.trusted or (importable(qualified) and not qualified.startswith("."))
                    return qualified if given else None
                return "local" if self.runs(definition.statement, definition.point) else None
            if definition.kind in ("opaque", "parameter"):
                return None
            return self.context.resolve(name)

        return resolve

    def runs(self, statement: cst.BaseStatement, at: Point) -> bool:
        """Whether the execution policy lets ``statement`` (at ``at``) run."""
        key = id(statement)
        if key not in self._runs:
            self._runs[key] = False  # a statement never vouches for itself
            self._runs[key] = why_not(statement, self._resolver(at), TENSOR_METHODS, self.context.trusted) is None
        return self._runs[key]

    def _call_kind(self, at: Point):
        resolve = self._resolver(at)

        def kind(call: cst.Call) -> CallKind:
            qualified = _qualified(call.func, resolve)
            if qualified in (None, "local"):  # a value's method, or a function the program was given or made
                return "method" if isinstance(call.func, cst.Attribute) else "function"
            in_place = qualified.endswith("_") or any(
                arg.keyword is not None and arg.keyword.value in ("out", "inplace") for arg in call.args)
            vouched = allowed(qualified) or qualified in self.context.trusted
            return "pure" if vouched and not in_place else "function"

        return kind

    def changes(self, statement: cst.BaseStatement, at: Point) -> frozenset[str]:
        if id(statement) not in self._changed:
            self._changed[id(statement)] = changed_in_place(statement, self._call_kind(at))
        return self._changed[id(statement)]

    # -- the site and what wraps it -------------------------------------------------------

    def _check_region(self) -> None:
        reason = why_not(cst.Module(body=self.region), self._resolver(self.point, self.region_binds), TENSOR_METHODS,
                         self.context.trusted, self._origin)
        if reason is not None:
            raise Refusal(Code.OPAQUE_CALL, f"the site's own code may not run in the verifier: {reason}")

    def _origin(self, name: str) -> str:
        """Where an input the site calls comes from, for a refusal's reason."""
        definition = reaching_definition(self.index, self.point, name)
        if definition.kind == "parameter":
            return "a parameter: what it does cannot be known"
        if definition.kind == "global":
            kind, where = self.context.binding(name)
            if kind == "import":
                qualified = import_bindings(where.body[0])[name]
                return f"`{qualified}`, from a module the verifier never imports"
            return "defined at module level, and the verifier runs no module code"
        if definition.kind == "statement":
            return f"made by `{code(definition.statement).strip().splitlines()[0]}`, which the verifier may not run"
        return "set in a branch, a loop or a handler"

    def _context(self) -> None:
        chain = _enclosing(self.module, self.point.scope)
        for depth, node in enumerate(chain):
            for decorator in node.decorators:
                self._decorator(decorator, innermost=depth == len(chain) - 1)
        for depth, level in enumerate(self.point.levels[:-1]):
            owner, outer = level.owner, self.point.levels[depth + 1]
            at = Point(self.point.scope, self.point.levels[depth + 1:], outer.index + 1)  # the owner's position
            if isinstance(owner, cst.With) and level.role == "body":
                self._with(owner, at)
            elif isinstance(owner, cst.Try | cst.TryStar) and level.role == "body":
                self._try(owner, at)

    def _decorator(self, decorator: cst.Decorator, innermost: bool) -> None:
        expression = decorator.decorator
        target = expression.func if isinstance(expression, cst.Call) else expression
        name = dotted(target)
        qualified = None
        if name is not None:
            head, _, rest = name.partition(".")
            found = self.context.qualified_name(head)
            qualified = found if found is None or not rest else f"{found}.{rest}"
        if qualified is not None and qualified.removeprefix("builtins.") in _TRANSPARENT_DECORATORS:
            return
        resolved = _qualified(target, self.context.resolve)
        if innermost and resolved not in (None, "local") and resolved.startswith("torch.") and \
                why_not(expression, self.context.resolve, TENSOR_METHODS) is None:
            self.decorator_modes.append(decorator)
            self.no_grad |= resolved in _NO_GRAD
            for name in self.index.reads(expression):  # evaluated where the function is defined: the module's
                self._free(name, "global")
            return
        raise Refusal(Code.CONTEXT, f"the function is decorated with `@{code(expression)}`, which may change what "
                                    "its body computes (the verifier runs only torch's grad modes and autocast)")

    def _with(self, statement: cst.With, at: Point) -> None:
        resolve = self._resolver(at)
        for item in statement.items:
            reason = why_not(item.item, resolve, TENSOR_METHODS)
            if reason is not None or not isinstance(item.item, cst.Call):
                raise Refusal(Code.CONTEXT, f"the site runs inside `with {code(item.item)}`, which the verifier "
                                            f"cannot run ({reason or 'not a call'})")
            self.no_grad |= _qualified(item.item.func, resolve) in _NO_GRAD
            self.context_reads += [(name, at) for name in self.index.reads(item.item)]
        self.wrappers.append(("with", statement))

    def _try(self, statement: cst.Try, at: Point) -> None:
        if all(_reraises(handler) for handler in statement.handlers):
            return  # nothing is caught for good: the site's errors go on as they did
        for handler in statement.handlers:
            if _reraises(handler):
                continue
            types = handler.type
            elements = [e.value for e in types.elements] if isinstance(types, cst.Tuple) else \
                [types] if types is not None else []
            for value in elements:
                qualified = _qualified(value, self.context.resolve)
                if qualified is None or qualified == "local" or not allowed(qualified) or (
                        qualified.startswith("builtins.") and not builtin_exception(qualified.removeprefix("builtins."))):
                    raise Refusal(Code.CONTEXT, f"the site runs inside a `try` whose `except {code(value)}` may catch "
                                                "its errors, and the verifier cannot know that exception type")
                self.context_reads += [(name, at) for name in self.index.reads(value)]
        self.wrappers.append(("try", statement))

    # -- what runs after it ---------------------------------------------------------------

    def _continuation(self, kept: set[str]) -> list[tuple[Point, cst.BaseStatement]]:
        """Later statements of the function that may change what the call keeps for backward."""
        if self.no_grad or not kept:
            return []
        tracked, found = set(kept), []
        for depth, level in enumerate(self.point.levels):
            after = level.index + 1 if depth else self.point.stop
            for position in range(after, len(level.block)):
                statement = level.block[position]
                at = Point(self.point.scope, (Level(level.block, position, level.owner, level.role),
                                              *self.point.levels[depth + 1:]), position + 1)
                changed = self.changes(statement, at) & tracked
                if changed:
                    straight = isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1
                    if not (straight and self.runs(statement, at)):
                        raise Refusal(Code.CONTINUATION, f"later code may change `{sorted(changed)[0]}` in place "
                                      f"(`{code(statement).strip().splitlines()[0]}`, {_line(self.module, statement)})"
                                      ", which the call keeps for backward and the loop did not")
                    found.append((at, statement))
                if isinstance(statement, cst.SimpleStatementLine):
                    tracked -= binds(statement)
        return found

    # -- the slice ------------------------------------------------------------------------

    @staticmethod
    def _order(point: Point) -> tuple:
        return tuple(level.index for level in reversed(point.levels))

    def _slice(self, outputs: list[str], continuation) -> None:
        # The outputs' earlier values too: a region that does not bind one leaves it as it was.
        work = [(name, self.point) for name in {*self.index.exposed_reads(self.region), *outputs}]
        work += self.context_reads
        for at, statement in continuation:
            self.statements[id(statement)] = (self._order(at), statement)
            work += [(name, Point(at.scope, at.levels, at.start)) for name in self.index.exposed_reads([statement])]
        seen: set[tuple[str, int]] = set()
        while work:
            name, at = work.pop()
            key = (name, id(at.block[at.start]) if at.start < len(at.block) else id(at.block))
            if key in seen:
                continue
            seen.add(key)
            definition = reaching_definition(self.index, at, name, changes=lambda s, at=at: self.changes(s, at))
            if definition.kind not in ("statement", "change"):
                self._free(name, definition.kind)
                continue
            statement = definition.statement
            if id(statement) in self.inside_region:
                continue  # the site itself: already in the program
            if definition.kind == "statement" and self._unpacks_free(statement, definition.point):
                self._havoc(statement, definition.point, binds(statement))
                continue
            if not self.runs(statement, definition.point):
                self._havoc(statement, definition.point,
                            binds(statement) if definition.kind == "statement" else {name})
                continue
            if id(statement) in self.statements:
                continue
            self.statements[id(statement)] = (self._order(definition.point), statement)
            for read in self.index.exposed_reads([statement]):
                work.append((read, definition.point))

    def _free(self, name: str, kind: str) -> None:
        self.free.add(name)
        self.free_at_start.add(name)
        if kind == "global":
            self.globals.add(name)

    def _havoc(self, statement: cst.BaseStatement, at: Point, names: set[str]) -> None:
        order, known = self.havoc.get(id(statement), (self._order(at), set()))
        self.havoc[id(statement)] = (order, known | set(names))
        self.free |= set(names)

    def _unpacks_free(self, statement: cst.BaseStatement, at: Point) -> bool:
        """``a, b = batch`` with ``batch`` an input: its parts are the inputs (no value can be guessed whole)."""
        if not m.matches(statement, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Tuple() | m.List())],
                                                                         value=m.Name())])):
            return False
        return reaching_definition(self.index, at, statement.body[0].value.value).kind not in ("statement", "change")

    # -- the program ----------------------------------------------------------------------

    def _havoced(self) -> set[str]:
        return set().union(*(names for _, names in self.havoc.values()))

    def roots(self) -> set[str]:
        """Free names that are inputs: all but those the module's imports and the builtins give."""
        givens = self.globals - self._havoced()
        return {name for name in self.free if name not in givens or self.context.resolve(name) is None}

    def imports(self) -> list[cst.SimpleStatementLine]:
        """The module's import lines the program needs, in order, narrowed to the names it reads."""
        wanted: dict[int, set[str]] = {}
        for name in self.globals - self._havoced():
            source = self.context.source(name)
            if source is not None:
                wanted.setdefault(id(source), set()).add(name)
        # The module's own grouping (a blank line between its sections), so that the emitted tests sort as it does.
        chosen, separated = [], False
        for statement in self.module.body:
            separated |= _after_blank(statement)
            if id(statement) in wanted:
                lines = [cst.EmptyLine()] if chosen and separated else []
                chosen.append(_narrowed(statement, wanted[id(statement)]).with_changes(leading_lines=lines))
                separated = False
        return chosen

    def body(self) -> list[cst.BaseStatement]:
        items = list(self.statements.values())
        items += [(order, _placeholder(names)) for order, names in self.havoc.values()]
        region_order = self._order(self.point)
        before = [s for order, s in sorted(items, key=lambda item: item[0]) if order < region_order]
        after = [s for order, s in sorted(items, key=lambda item: item[0]) if order >= region_order]
        return [*before, *self._wrapped(), *after]

    def _wrapped(self) -> list[cst.BaseStatement]:
        body = list(self.region)
        caught = False
        for kind, statement in self.wrappers:  # innermost first
            if kind == "with":
                body = [statement.with_changes(body=cst.IndentedBlock(body=body), leading_lines=())]
            else:
                handlers = [_recorder(handler, position) for position, handler in enumerate(statement.handlers)
                            if not _reraises(handler)]
                body = [cst.Try(body=cst.IndentedBlock(body=body), handlers=handlers)]
                caught = True
        if caught:
            body = [cst.parse_statement(f"{CAUGHT} = None\n"), *body]
        return body

    @property
    def models_handlers(self) -> bool:
        return any(kind == "try" for kind, _ in self.wrappers)


def _after_blank(statement: cst.SimpleStatementLine) -> bool:
    return any(line.comment is None for line in statement.leading_lines)


def _reraises(handler: cst.ExceptHandler) -> bool:
    """A clause that ends by re-raising what it caught (after logging it, say): transparent."""
    last = handler.body.body[-1] if handler.body.body else None
    return m.matches(last, m.SimpleStatementLine(body=[m.Raise(exc=None)]))


def _recorder(handler: cst.ExceptHandler, position: int) -> cst.ExceptHandler:
    record = cst.parse_statement(f"{CAUGHT} = 'except clause {position + 1}: ' + type(_mtp_error).__qualname__\n")
    return handler.with_changes(name=cst.AsName(name=cst.Name("_mtp_error")), body=cst.IndentedBlock(body=[record]),
                                leading_lines=())


def _placeholder(names: set[str]) -> cst.SimpleStatementLine:
    return cst.parse_statement(f"{_HAVOC}({', '.join(repr(n) for n in sorted(names))})\n")


def _qualified(node: cst.BaseExpression, resolve) -> str | None:
    if isinstance(node, cst.Attribute):
        inner = _qualified(node.value, resolve)
        return inner if inner in (None, "local") else f"{inner}.{node.attr.value}"
    if isinstance(node, cst.Name):
        return resolve(node.value)
    return "local"


def _narrowed(statement: cst.SimpleStatementLine, names: set[str]) -> cst.SimpleStatementLine:
    """``from m import a, b, c`` (or ``*``) -> ``from m import b`` when only ``b`` is read: the names the program does not
    read are not its business (the utility module stands in for the target's, and has only the utility)."""
    small = statement.body[0]
    if not isinstance(small, cst.ImportFrom):
        return statement.with_changes(leading_lines=())
    if isinstance(small.names, cst.ImportStar):  # `import *` is only allowed at module level, the program is a function
        kept = [cst.ImportAlias(cst.Name(name)) for name in sorted(names)]
        statement = statement.with_changes(trailing_whitespace=cst.TrailingWhitespace())  # its comment is about the star
    else:
        kept = [alias.with_changes(comma=cst.MaybeSentinel.DEFAULT) for alias in small.names
                if (alias.evaluated_alias or alias.evaluated_name) in names]
    return statement.with_changes(body=[small.with_changes(names=kept, lpar=None, rpar=None)], leading_lines=())


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


def _kept_for_backward(point: Point, index: FlowIndex, context: _Module) -> set[str]:
    """The names of the logits the rewrite's utility calls keep for backward, and the names they
    were read from (``logits = outputs.logits``): what later code must not change in place."""
    utility = {local for local in context.names.imports if context.resolve(local) in context.trusted}
    kept = set()
    for call in m.findall(cst.Module(body=list(point.block[point.start:point.stop])), m.Call(func=m.Name())):
        if call.func.value not in utility:
            continue
        for position, arg in enumerate(call.args):
            if (arg.keyword.value if arg.keyword else ("logits" if position == 0 else None)) != "logits":
                continue
            root, at = root_name(_uncast(arg.value)), point
            while root is not None and root not in kept:
                kept.add(root)
                definition = reaching_definition(index, at, root)
                if definition.kind != "statement" or not m.matches(definition.statement,
                                                                   m.SimpleStatementLine(body=[m.Assign()])):
                    break
                root, at = root_name(definition.statement.body[0].value), definition.point
    return kept


def _uncast(node: cst.BaseExpression) -> cst.BaseExpression:
    while isinstance(node, cst.Call) and isinstance(node.func, cst.Attribute) and node.func.attr.value in (
            "float", "double", "to", "contiguous", "detach"):
        node = node.func.value
    return node


def build(original: tuple[Point, FlowIndex, cst.Module], rewritten: tuple[Point, FlowIndex, cst.Module],
          line: int, utility: dict[str, str] | None = None) -> SiteProgram:
    """The two programs for a site; raises ``Refusal`` for a site the verifier cannot run or model.

    ``utility`` maps module names to the utility file the rewritten code's imports of them load."""
    old_point, old_index, old_module = original
    new_point, new_index, new_module = rewritten
    defined = {module: _defined_names(path) for module, path in (utility or {}).items()}
    outputs = _outputs(old_point, new_point, new_index)
    contexts = (_Module(old_module, defined), _Module(new_module, defined))
    for context in contexts:
        if context.dynamic is not None:
            raise Refusal(Code.DYNAMIC_NAMES, context.dynamic)
    kept = _kept_for_backward(new_point, new_index, contexts[1])
    sides = [_Side(point, index, module, context, outputs, kept) for point, index, module, context in (
        (old_point, old_index, old_module, contexts[0]), (new_point, new_index, new_module, contexts[1]))]
    if any(side.models_handlers for side in sides):
        outputs = sorted({*outputs, CAUGHT})
    roots = set().union(*(side.roots() for side in sides))
    declared = {**_declared_kinds(old_point.scope), **_declared_kinds(new_point.scope)}
    slots: dict[str, Slot] = {}
    bodies, readable = [], []
    for side, name in zip(sides, ("original", "rewritten"), strict=True):
        body = side.body()
        module = cst.Module(body=[cst.FunctionDef(name=cst.Name(name), params=cst.Parameters(),
                                                  body=cst.IndentedBlock(body=[*side.imports(), *body]))])
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
        bodies.append((side, name, body))
    parameters = cst.Parameters(params=[cst.Param(cst.Name(s.param)) for s in slots.values()])
    binding = prologue(slots)
    by_root = {code(statement.body[0].targets[0].target): statement for statement in binding}
    sources = []
    for side, name, body in bodies:
        body = [bound for statement in body for bound in _bind_here(statement, by_root)]
        for decorator in reversed(side.decorator_modes):  # the function's grad mode or autocast, around all it runs
            body = [cst.With(items=[cst.WithItem(decorator.decorator)], body=cst.IndentedBlock(body=body))]
        start = [statement for root, statement in by_root.items() if root in side.free_at_start]
        function = cst.FunctionDef(name=cst.Name(name), params=parameters, body=cst.IndentedBlock(
            body=[*start, *side.imports(), *body, cst.parse_statement("return None\n")]))
        sources.append(cst.Module(body=[function]).visit(Returns()).code)
    priors = {path: declared[path] for path in slots if path in declared}
    read_kinds(cst.Module(body=[*readable[0].body, *readable[1].body]), slots, priors)
    imports = [s for s in new_module.body if m.matches(s, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()]))]
    for path in weight_paths(readable[1], imports, utility or {}):
        for slot in slots.values():
            slot.weights |= slot.param == path
    return SiteProgram(original=sources[0], rewritten=sources[1], slots=list(slots.values()),
                       outputs=outputs, line=line, utility=dict(utility or {}))


def _bind_here(statement: cst.BaseStatement, by_root: dict[str, cst.SimpleStatementLine]) -> list[cst.BaseStatement]:
    """A placeholder becomes the prologue's binding of each of its names (the same inputs, bound again here)."""
    if not m.matches(statement, m.SimpleStatementLine(body=[m.Expr(m.Call(func=m.Name(_HAVOC)))])):
        return [statement]
    names = [arg.value.evaluated_value for arg in statement.body[0].value.args]
    return [by_root[name] for name in names if name in by_root]


@lru_cache(maxsize=64)
def _defined_names(path: str) -> frozenset[str]:
    """The top-level names a utility file defines (read, never run)."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return frozenset(names)
