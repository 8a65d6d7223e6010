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
import re
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m
from libcst.metadata import MetadataWrapper, ParentNodeProvider

from codemods.cst_utils import code, literal_int, string_value
from codemods.mtp_loop.dataflow import (
    ALL,
    FlowIndex,
    Point,
    binds,
    live_after,
    reaching_definition,
)
from codemods.refusals import Code, Refusal

# Attribute names that read a tensor rather than an object's field: a path stops before them.
TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "requires_grad", "grad", "data",
                     "layout", "is_floating_point", "dim", "size", "numel", "item", "tolist"}
# Method names that only a tensor (among the values slots can take) has.
TENSOR_METHODS = {
    "float", "double", "half", "bfloat16", "long", "int", "bool", "short", "byte", "to", "type", "type_as", "detach",
    "reshape", "view", "view_as", "reshape_as", "flatten", "contiguous", "transpose", "permute", "squeeze",
    "unsqueeze", "sum", "mean", "max", "min", "amax", "clamp", "clamp_min", "clip", "ne", "eq", "gt", "ge", "lt",
    "le", "log_softmax", "softmax", "exp", "log", "abs", "new_zeros", "new_tensor", "new_ones", "masked_fill",
    "gather", "expand", "expand_as", "clone", "cpu", "cuda", "split", "chunk", "narrow", "select", "index_select",
    "any", "all", "nonzero", "cumsum", "argmax", "topk", "size", "dim", "numel", "item", "sub", "add", "mul", "div",
    "pow", "sqrt", "where", "masked_select", "repeat", "zero_", "fill_", "mul_", "add_", "logical_and", "logical_not",
}
_SAFE_BUILTINS = {"len", "range", "max", "min", "int", "float", "bool", "abs", "sum", "round", "tuple", "list",
                  "dict", "isinstance", "enumerate", "zip", "print", "getattr", "hasattr", "str", "divmod", "pow"}
SLOT_PREFIX = "mtp_slot_"


@dataclass
class Slot:
    """One input of both programs: ``path`` as written, passed as parameter ``param``."""

    param: str
    path: str
    kind: str  # "tensor", "scalar", "dtype", "device"
    rank: int | None = None  # for tensors: the rank the code implies (exactly, or at least)
    rank_is_exact: bool = False
    hint: str = ""  # the path's last name: orders candidate values, never restricts them
    contract: bool = False  # passed as it is (cast, cut) to the utility, whose documented shapes it must have


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
        """The module's import lines that bind any of ``names`` (``__future__`` and relative ones left out)."""
        chosen = []
        for statement in self.module_imports:
            small = statement.body[0]
            if isinstance(small, cst.ImportFrom) and (small.relative or (
                    small.module is not None and code(small.module) == "__future__")):
                continue
            if binds(statement) & names:
                chosen.append(statement)
        return chosen


def _module_context(module: cst.Module) -> tuple[list[cst.SimpleStatementLine], set[str]]:
    imports, other = [], set()
    for statement in module.body:
        if m.matches(statement, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])):
            imports.append(statement)
        else:
            other |= binds(statement)
    return imports, other


class _Paths(cst.CSTVisitor):
    """Find each maximal access path rooted at a free name (``batch["labels"]``, ``self.n_future``)."""

    METADATA_DEPENDENCIES = (ParentNodeProvider,)

    def __init__(self, roots: set[str], objects: set[str] = frozenset()):
        super().__init__()
        self.roots = roots
        self.objects = objects  # roots known to be objects: `self.device` is a field, not a tensor's device
        self.whole: set[str] = set()  # roots used as a whole somewhere
        self.fielded: set[str] = set()  # roots with a field that only an object has
        self.nodes: dict[str, list[cst.CSTNode]] = {}  # path -> its occurrences

    def _extends(self, node: cst.CSTNode, attributes_only: bool, root: str) -> cst.CSTNode | None:
        parent = self.get_metadata(ParentNodeProvider, node, None)
        if isinstance(parent, cst.Attribute) and parent.value is node:
            name = parent.attr.value
            tensorish = name in TENSOR_ATTRIBUTES or name in TENSOR_METHODS
            called = isinstance(self.get_metadata(ParentNodeProvider, parent, None), cst.Call)
            if not tensorish or (root in self.objects and attributes_only and not called):
                return parent
        if isinstance(parent, cst.Subscript) and parent.value is node and len(parent.slice) == 1 and \
                isinstance(parent.slice[0].slice, cst.Index) and string_value(parent.slice[0].slice.value) is not None:
            return parent
        return None

    def visit_Name(self, node: cst.Name) -> None:
        if node.value not in self.roots or not self._is_load(node):
            return
        path, attributes_only = node, True
        while (parent := self._extends(path, attributes_only, node.value)) is not None:
            attributes_only &= isinstance(parent, cst.Attribute)
            if not (isinstance(parent, cst.Attribute) and (
                    parent.attr.value in TENSOR_ATTRIBUTES or parent.attr.value in TENSOR_METHODS)):
                self.fielded.add(node.value)
            path = parent
        if path is node:
            self.whole.add(node.value)
        self.nodes.setdefault(code(path), []).append(path)

    def _is_load(self, node: cst.Name) -> bool:
        parent = self.get_metadata(ParentNodeProvider, node, None)
        if isinstance(parent, cst.Attribute) and parent.attr is node:
            return False
        if isinstance(parent, cst.Arg) and parent.keyword is node:
            return False
        return not isinstance(parent, cst.AssignTarget | cst.Param | cst.ImportAlias | cst.AsName | cst.FunctionDef)

    def mixed(self) -> set[str]:
        """Roots used both whole and through fields: no single value can stand for them."""
        return self.whole & {_root(text) for text in self.nodes if _root(text) != text}


class _Replace(cst.CSTTransformer):
    """Each path occurrence becomes its slot's parameter (a view of the program for reading kinds off)."""

    def __init__(self, params: dict[int, str]):
        self.params = params

    def on_leave(self, original, updated):
        param = self.params.get(id(original))
        return cst.Name(param) if param is not None else updated


class _Returns(cst.CSTTransformer):
    """A ``return`` of the program's own body reports the outputs and the returned value."""

    def __init__(self):
        self.depth = 0  # nested functions and lambdas keep their own returns

    def visit_FunctionDef(self, node) -> None:
        self.depth += 1

    def leave_FunctionDef(self, original, updated):
        self.depth -= 1
        return updated

    def leave_Return(self, original, updated):
        if self.depth > 1:
            return updated
        value = updated.value if updated.value is not None else cst.Name("None")
        if isinstance(value, cst.Tuple) and not value.lpar:
            value = value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
        call = cst.parse_expression("_mtp_outputs(locals(), 0)")
        return updated.with_changes(value=call.with_changes(args=[call.args[0], cst.Arg(value)]))


def _prologue(slots: dict[str, Slot]) -> list[cst.BaseStatement]:
    """Bind every free root before the program runs: ``batch = {"labels": slot, ...}``, ``n = slot``.

    Binding (rather than replacing each read) keeps Python's semantics when the program
    rebinds a root later.
    """
    trees: dict[str, dict] = {}
    for path, slot in slots.items():
        steps = re.findall(r"\.([A-Za-z_][A-Za-z_0-9]*)|\[(.+?)\](?=\.|\[|$)", path[len(_root(path)):])
        node = trees.setdefault(_root(path), {})
        for attribute, key in steps:
            node = node.setdefault(("attr", attribute) if attribute else ("item", key), {})
        node[None] = slot.param
    return [cst.parse_statement(f"{root} = {_construct(tree)}\n") for root, tree in sorted(trees.items())]


def _construct(tree: dict) -> str:
    if None in tree:
        return tree[None]
    attrs = ", ".join(f"{name!r}: {_construct(child)}" for (kind, name), child in tree.items() if kind == "attr")
    items = ", ".join(f"{key}: {_construct(child)}" for (kind, key), child in tree.items() if kind == "item")
    return f"_mtp_box({{{attrs}}}, {{{items}}})"


_PASS_THROUGH = {"float", "double", "half", "bfloat16", "long", "int", "bool", "to", "type_as", "detach", "contiguous"}
_TENSOR_ARGUMENTS = ("logits", "labels", "attention_mask", "weights")


def _contract_paths(program: cst.Module, side: _Side, utility: dict[str, str]) -> set[str]:
    """Slot parameters the rewrite passes, as they are, as the utility's tensor arguments.

    The utility documents ``[B, S]`` shapes for them; everything else (``input_ids``, a
    tensor a mask is computed from) may have any length the loop tolerates.
    """
    locals_ = set()
    for statement in side.module_imports:
        node = statement.body[0]
        if isinstance(node, cst.ImportFrom) and node.module is not None and code(node.module) in utility and \
                not isinstance(node.names, cst.ImportStar):
            locals_ |= {alias.asname.name.value if alias.asname else alias.evaluated_name for alias in node.names}
    aliases = {a.targets[0].target.value: a.value for a in m.findall(program, m.Assign(targets=[m.AssignTarget(m.Name())]))}
    found = set()
    for call in m.findall(program, m.Call(func=m.Name())):
        if call.func.value not in locals_:
            continue
        for position, arg in enumerate(call.args):
            name = arg.keyword.value if arg.keyword else (_TENSOR_ARGUMENTS[position] if position < 4 else None)
            if name not in _TENSOR_ARGUMENTS:
                continue
            value, depth = arg.value, 0
            while depth < 8:
                depth += 1
                if isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute) and \
                        value.func.attr.value in _PASS_THROUGH:
                    value = value.func.value
                elif isinstance(value, cst.Subscript):
                    value = value.value  # `x[:, :seq_len]`: the loop's own cut
                elif isinstance(value, cst.Name) and value.value in aliases:
                    value = aliases.pop(value.value)
                else:
                    break
            if isinstance(value, cst.Name) and value.value.startswith(SLOT_PREFIX):
                found.add(value.value)
    return found


def _root(path: str) -> str:
    return re.match(r"[A-Za-z_][A-Za-z_0-9]*", path).group(0)


def _hint(path: str) -> str:
    return re.findall(r"[A-Za-z_][A-Za-z_0-9]*", path)[-1].lower()


def _usage(module: cst.Module, slots: dict[str, Slot]) -> None:
    """Set each slot's kind and rank from how the program uses it (and names bound to it)."""
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    parents = wrapper.resolve(ParentNodeProvider)
    by_param = {slot.param: slot for slot in slots.values()}
    aliases: dict[str, str] = {}  # local name -> slot param, for `x = slot` and `x = slot.float()`
    for assign in m.findall(module, m.Assign(targets=[m.AssignTarget(m.Name())])):
        value = assign.value
        while isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute) and \
                value.func.attr.value in TENSOR_METHODS - {"sum", "mean", "item", "size", "dim", "numel"}:
            value = value.func.value
        if isinstance(value, cst.Name) and value.value in by_param:
            aliases[assign.targets[0].target.value] = value.value
    evidence: dict[str, dict] = {p: {"tensor": 0, "rank": 0, "exact": None, "dtype": 0, "device": 0, "scalar": 0}
                                 for p in by_param}
    for name in m.findall(module, m.Name()):
        param = name.value if name.value in by_param else aliases.get(name.value)
        if param is None:
            continue
        _observe(name, parents, evidence[param])
    for param, seen in evidence.items():
        slot = by_param[param]
        if seen["tensor"]:
            slot.kind = "tensor"
            slot.rank = seen["exact"] or (seen["rank"] or None)
            slot.rank_is_exact = bool(seen["exact"])
        elif seen["dtype"]:
            slot.kind = "dtype"
        elif seen["device"]:
            slot.kind = "device"
        else:
            slot.kind = "scalar"


def _observe(node: cst.Name, parents, seen: dict) -> None:
    parent = parents.get(node)
    if isinstance(parent, cst.Attribute) and parent.value is node:
        attribute = parent.attr.value
        grand = parents.get(parent)
        if attribute in TENSOR_ATTRIBUTES or attribute in TENSOR_METHODS:
            seen["tensor"] += 1
        if attribute == "shape":
            if isinstance(grand, cst.Subscript) and len(grand.slice) == 1 and isinstance(grand.slice[0].slice,
                                                                                         cst.Index):
                axis = literal_int(grand.slice[0].slice.value)
                if axis is not None:
                    seen["rank"] = max(seen["rank"], axis + 1 if axis >= 0 else -axis)
            assign = parents.get(grand) if isinstance(grand, cst.AssignTarget) else None
            if isinstance(grand, cst.Assign) or isinstance(assign, cst.Assign):
                target = (grand if isinstance(grand, cst.Assign) else assign).targets[0].target
                if isinstance(target, cst.Tuple) and not any(isinstance(e, cst.StarredElement)
                                                             for e in target.elements):
                    seen["exact"] = len(target.elements)
        return
    if isinstance(parent, cst.Subscript) and parent.value is node:
        seen["tensor"] += 1
        count = sum(1 for e in parent.slice if not m.matches(e.slice, m.Index(value=m.Ellipsis())))
        if any(m.matches(e.slice, m.Index(value=m.Ellipsis())) for e in parent.slice):
            count += 1
        seen["rank"] = max(seen["rank"], count)
        return
    if isinstance(parent, cst.Arg) and parent.value is node:
        if parent.keyword is not None and parent.keyword.value == "dtype":
            seen["dtype"] += 1
        elif parent.keyword is not None and parent.keyword.value == "device":
            seen["device"] += 1
        call = parents.get(parent)
        if isinstance(call, cst.Call) and m.matches(call.func, m.Attribute(attr=m.Name("to"))) and \
                parent.keyword is None:
            seen["dtype"] += 1
        if isinstance(call, cst.Call) and m.matches(call.func, m.Attribute(attr=m.Name("type_as"))):
            seen["tensor"] += 1
        return
    if isinstance(parent, cst.BinaryOperation):
        seen["scalar"] += 1


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
        survey = _Paths(roots)
        wrapper.visit(survey)
        paths = _Paths(roots, survey.fielded)
        wrapper.visit(paths)
        if paths.mixed():
            raise Refusal(Code.NOT_RUNNABLE, f"`{sorted(paths.mixed())[0]}` is used both whole and through its fields")
        params = {}
        for text, nodes in paths.nodes.items():
            slot = slots.setdefault(text, Slot(f"{SLOT_PREFIX}{len(slots)}", text, "scalar", hint=_hint(text)))
            params.update((id(node), slot.param) for node in nodes)
        readable.append(module.visit(_Replace(params)))
        bodies.append((name, body))
    parameters = cst.Parameters(params=[cst.Param(cst.Name(s.param)) for s in slots.values()])
    prologue = _prologue(slots)
    sources = []
    for name, body in bodies:
        function = cst.FunctionDef(name=cst.Name(name), params=parameters, body=cst.IndentedBlock(
            body=[*prologue, *body, cst.parse_statement("return None\n")]))
        sources.append(cst.Module(body=[function]).visit(_Returns()).code)
    _usage(cst.Module(body=[*readable[0].body, *readable[1].body]), slots)
    for path in _contract_paths(readable[1], new, utility or {}):
        for slot in slots.values():
            slot.contract |= slot.param == path
    return SiteProgram(original=sources[0], rewritten=sources[1], slots=list(slots.values()),
                       outputs=outputs, line=line, utility=dict(utility or {}))
