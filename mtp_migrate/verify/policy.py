"""What the verifier may run: the execution policy (``docs/verification.md``).

``diff``, ``check`` and ``apply`` must be safe on an untrusted pull request, and must work
where the target's own package and its heavy dependencies are not importable. So a
statement of a verified program runs only if every name it refers to resolves, by
qualified name, to something known to be pure: torch's tensor operations, ``math``,
``operator``, a few of ``functools``/``itertools``, pure builtins, or a value the program
itself made or was given. Nothing of the target is ever imported. A statement that does
not pass is not run: what it defines becomes an input (``program.py``), and a site whose
own code does not pass is refused (MTP206), naming the call.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass, field

import libcst as cst
import libcst.matchers as m

from mtp_migrate.cst_utils import code
from mtp_migrate.flow.names import bound_name, root_name

# Top-level modules whose import statements run in the verifier's process: never the target's.
IMPORTABLE = frozenset({"torch", "math", "cmath", "operator", "functools", "itertools", "typing", "numbers",
                        "collections", "contextlib"})

# Qualified names, by prefix; the longest matching prefix decides. Everything under torch is a
# tensor operation except what reads or writes files, processes, devices, global state or compilers.
_RULES: dict[str, bool] = {
    "torch": True,
    **dict.fromkeys((
        "torch.save", "torch.load", "torch.hub", "torch.distributed", "torch.multiprocessing", "torch.utils",
        "torch.backends", "torch.cuda", "torch.mps", "torch.xpu", "torch.mtia", "torch.ops", "torch.library",
        "torch.classes", "torch.profiler", "torch.autograd.profiler", "torch.compile", "torch.compiler",
        "torch.jit", "torch.onnx", "torch.export", "torch.package", "torch.fx", "torch.random",
        "torch.manual_seed", "torch.seed", "torch.use_deterministic_algorithms", "torch.from_file",
        "torch.serialization", "torch.testing", "torch.overrides", "torch.nn.parallel", "torch.optim",
        "torch.set_default_dtype", "torch.set_default_device", "torch.set_default_tensor_type",
        "torch.set_num_threads", "torch.set_num_interop_threads", "torch.set_printoptions",
        "torch.set_float32_matmul_precision", "torch.set_deterministic_debug_mode", "torch.set_warn_always",
        "torch.set_flush_denormal", "torch.set_rng_state", "torch.cpu", "torch.accelerator", "torch.futures",
        "torch.monitor", "torch.signal", "torch.sparse.check_sparse_tensor_invariants",
    ), False),
    **dict.fromkeys(("torch.cuda.is_available", "torch.cuda.device_count", "torch.cuda.is_bf16_supported"), True),
    "math": True, "cmath": True, "operator": True, "itertools": True, "numbers": True,
    "functools.partial": True, "functools.reduce": True,
    "typing": True,
    "collections.OrderedDict": True, "collections.defaultdict": True, "collections.Counter": True,
    "collections.namedtuple": True, "collections.deque": True,
    "contextlib.nullcontext": True,
}

PURE_BUILTINS = frozenset({
    "abs", "all", "any", "bool", "callable", "chr", "complex", "dict", "divmod", "enumerate", "filter", "float",
    "format", "frozenset", "hash", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min",
    "next", "ord", "pow", "print", "range", "repr", "reversed", "round", "set", "slice", "sorted", "str", "sum",
    "tuple", "zip", "getattr", "hasattr", "True", "False", "None", "Ellipsis", "NotImplemented",
})
_ATTRIBUTE_BUILTINS = frozenset({"getattr", "hasattr"})  # only with a plain, non-dunder attribute name


def builtin_exception(name: str) -> bool:
    value = getattr(builtins, name, None)
    return isinstance(value, type) and issubclass(value, BaseException)


def allowed(qualified: str) -> bool:
    """Whether the verifier may refer to (and call) ``qualified``."""
    if qualified.startswith("builtins."):
        name = qualified.removeprefix("builtins.")
        return name in PURE_BUILTINS or builtin_exception(name)
    parts = qualified.split(".")
    if any(part.startswith("_") for part in parts[1:]) or (parts[0] == "torch" and parts[-1].startswith("set_")):
        return qualified == "torch.set_grad_enabled"
    for depth in range(len(parts), 0, -1):
        rule = _RULES.get(".".join(parts[:depth]))
        if rule is not None:
            return rule
    return False


def importable(module: str) -> bool:
    return module.split(".")[0] in IMPORTABLE


@dataclass
class ModuleNames:
    """What a module's own top-level statements bind: import aliases (to qualified names), other names,
    and the modules it star-imports."""

    imports: dict[str, str] = field(default_factory=dict)  # local name -> qualified name ("." prefix: relative)
    import_lines: dict[str, cst.SimpleStatementLine] = field(default_factory=dict)
    other: set[str] = field(default_factory=set)
    stars: list[tuple[str, cst.SimpleStatementLine]] = field(default_factory=list)

    @staticmethod
    def of(module: cst.Module) -> ModuleNames:
        from mtp_migrate.flow.names import binds

        names = ModuleNames()
        for statement in module.body:
            small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) and len(
                statement.body) == 1 else None
            if isinstance(small, cst.Import | cst.ImportFrom):
                for local, qualified in import_bindings(small).items():
                    names.imports[local] = qualified
                    names.import_lines[local] = statement
                if isinstance(small, cst.ImportFrom) and isinstance(small.names, cst.ImportStar):
                    names.stars.append((import_source(small), statement))
            else:
                names.other |= binds(statement)
        return names


def import_source(node: cst.ImportFrom) -> str:
    return "." * len(node.relative) + (code(node.module) if node.module is not None else "")


def import_bindings(node: cst.Import | cst.ImportFrom) -> dict[str, str]:
    """``{local name: qualified name}`` an import statement binds (``import a.b`` binds ``a`` to ``a``)."""
    if isinstance(node, cst.Import):
        found = {}
        for alias in node.names:
            name = code(alias.name)
            found[bound_name(alias)] = name if alias.asname is not None else name.split(".")[0]
        return found
    if isinstance(node.names, cst.ImportStar):
        return {}
    source = import_source(node)
    return {bound_name(alias): f"{source}.{code(alias.name)}" for alias in node.names}


class Checker(cst.CSTVisitor):
    """The first reason a statement may not run, or ``None`` (``reason``).

    ``resolve(name)`` says what a free name of the statement is: a qualified name (an import or
    a builtin), ``"local"`` (a value the program made or was given) or ``None`` (an input: it may
    be read and its tensor methods called, but it is not a function the verifier knows).
    """

    def __init__(self, resolve: Callable[[str], str | None], tensor_methods: frozenset[str],
                 trusted: frozenset[str] = frozenset(), origin: Callable[[str], str] | None = None):
        self.resolve = resolve
        self.origin = origin or (lambda name: "an input the verifier cannot know")
        self.tensor_methods = tensor_methods
        self.trusted = trusted  # qualified names vouched for beyond the policy (the verified utility's functions)
        self.reason: str | None = None
        self.scopes: list[set[str]] = []  # names bound by nested functions, lambdas and comprehensions

    def _refuse(self, reason: str) -> bool:
        if self.reason is None:
            self.reason = reason
        return False

    def _allowed(self, qualified: str) -> bool:
        return qualified in self.trusted or allowed(qualified)

    def _local(self, name: str) -> bool:
        return any(name in scope for scope in self.scopes)

    def qualified(self, node: cst.BaseExpression) -> str | None:
        """``torch.nn.functional.cross_entropy`` for ``F.cross_entropy``, ``"local"``, or ``None``."""
        if isinstance(node, cst.Attribute):
            inner = self.qualified(node.value)
            return inner if inner in (None, "local") else f"{inner}.{node.attr.value}"
        if isinstance(node, cst.Name):
            return "local" if self._local(node.value) else self.resolve(node.value)
        return "local"  # a call's or a literal's value: made by code that passed the check

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        if node.attr.value.startswith("__"):
            return self._refuse(f"`{code(node)}` reaches a dunder attribute")
        qualified = self.qualified(node)
        if qualified not in (None, "local") and not self._allowed(qualified):
            return self._refuse(f"`{code(node)}` is `{qualified}`, which the verifier may not run")
        if qualified in (None, "local"):
            node.value.visit(self)  # the attribute's own name is not a name the statement refers to
        return False

    def visit_Name(self, node: cst.Name) -> None:
        if node.value.startswith("__") and node.value.endswith("__"):
            self._refuse(f"`{node.value}` is a dunder name")
            return
        qualified = self.qualified(node)
        if qualified not in (None, "local") and not self._allowed(qualified):
            self._refuse(f"`{node.value}` is `{qualified}`, which the verifier may not run")

    def _target(self, target: cst.BaseExpression) -> None:
        """A store: only what it reads (``x[i]``, ``x.a``) is checked, not the names it binds."""
        if isinstance(target, cst.Tuple | cst.List):
            for element in target.elements:
                self._target(element.value)
        elif isinstance(target, cst.StarredElement):
            self._target(target.value)
        elif not isinstance(target, cst.Name):
            target.visit(self)

    def visit_AssignTarget(self, node: cst.AssignTarget) -> bool:
        self._target(node.target)
        return False

    def visit_AnnAssign(self, node: cst.AnnAssign) -> bool:
        self._target(node.target)  # a local annotation is never evaluated
        if node.value is not None:
            node.value.visit(self)
        return False

    def visit_AugAssign(self, node: cst.AugAssign) -> bool:
        node.target.visit(self)
        node.value.visit(self)
        return False

    def visit_Del(self, node: cst.Del) -> bool:
        self._target(node.target)
        return False

    def visit_For(self, node: cst.For) -> bool:
        self._target(node.target)
        for part in (node.iter, node.body, node.orelse):
            if part is not None:
                part.visit(self)
        return False

    def visit_AsName(self, node: cst.AsName) -> bool:
        self._target(node.name)
        return False

    def visit_NamedExpr(self, node: cst.NamedExpr) -> bool:
        node.value.visit(self)
        return False

    def visit_ExceptHandler(self, node: cst.ExceptHandler) -> bool:
        if node.type is not None:
            node.type.visit(self)
        node.body.visit(self)
        return False

    def visit_SimpleString(self, node: cst.SimpleString) -> None:
        if "__" in node.value:  # getattr(x, "__class__") and its cousins
            self._refuse(f"the string {node.value} names a dunder attribute")

    def visit_FormattedStringText(self, node: cst.FormattedStringText) -> None:
        if "__" in node.value:
            self._refuse("a format string names a dunder attribute")

    def visit_Call(self, node: cst.Call) -> bool | None:
        func = node.func
        qualified = self.qualified(func)
        if qualified is None and not (isinstance(func, cst.Attribute) and func.attr.value in self.tensor_methods):
            root = root_name(func)
            return self._refuse(f"it calls `{code(func)}`" + (f": `{root}` is {self.origin(root)}" if root else ""))
        if qualified in {f"builtins.{name}" for name in _ATTRIBUTE_BUILTINS}:
            if len(node.args) < 2 or not isinstance(node.args[1].value, cst.SimpleString):
                return self._refuse(f"`{code(func)}` with an attribute name that is not a plain string")
        return True

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)  # a keyword is not a name the statement refers to
        return False

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        return self._refuse("it defines a class (its body would run)")

    def visit_Import(self, node: cst.Import) -> bool:
        for alias in node.names:
            if not importable(code(alias.name)):
                return self._refuse(f"it imports `{code(alias.name)}`, which the verifier never imports")
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        if set(import_bindings(node).values()) <= self.trusted and not isinstance(node.names, cst.ImportStar):
            return False  # the verified utility's own names, loaded from its file
        if node.relative or not importable(import_source(node)):
            return self._refuse(f"it imports from `{import_source(node)}`, which the verifier never imports")
        return False

    def visit_Global(self, node: cst.Global) -> bool:
        return self._refuse("it declares a global")

    def visit_Nonlocal(self, node: cst.Nonlocal) -> bool:
        return self._refuse("it declares a nonlocal")

    def _enter(self, names: set[str]) -> None:
        self.scopes.append(names)

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        if node.decorators:
            return self._refuse(f"`{node.name.value}` is decorated")
        for part in _evaluated(node.params) + ([node.returns.annotation] if node.returns else []):
            part.visit(self)
        from mtp_migrate.flow.names import binds

        self._enter(_params(node.params) | set().union(*(binds(s) for s in node.body.body)) | {node.name.value})
        node.body.visit(self)
        self.scopes.pop()
        return False

    def visit_Lambda(self, node: cst.Lambda) -> bool:
        for default in _evaluated(node.params):
            default.visit(self)
        self._enter(_params(node.params))
        node.body.visit(self)
        self.scopes.pop()
        return False

    def _comprehension(self, node) -> bool:
        from mtp_migrate.flow.names import target_names

        bound: set[str] = set()
        part = node.for_in
        while part is not None:
            bound |= target_names(part.target)
            part = part.inner_for_in
        self._enter(bound)
        part = node.for_in
        while part is not None:
            part.iter.visit(self)
            for condition in part.ifs:
                condition.visit(self)
            part = part.inner_for_in
        for child in (node.key, node.value) if isinstance(node, cst.DictComp) else (node.elt,):
            child.visit(self)
        self.scopes.pop()
        return False

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension


def _params(params: cst.Parameters) -> set[str]:
    names = {p.name.value for p in (*params.params, *params.kwonly_params, *params.posonly_params)}
    return names | {p.name.value for p in (params.star_arg, params.star_kwarg) if isinstance(p, cst.Param)}


def _evaluated(params: cst.Parameters) -> list[cst.BaseExpression]:
    """What a ``def`` evaluates of its parameters: defaults and annotations."""
    found = []
    for param in (*params.params, *params.kwonly_params, *params.posonly_params, params.star_arg, params.star_kwarg):
        if isinstance(param, cst.Param):
            found += [part for part in (param.default, param.annotation and param.annotation.annotation) if part]
    return found


def why_not(node: cst.CSTNode, resolve: Callable[[str], str | None], tensor_methods: frozenset[str],
            trusted: frozenset[str] = frozenset(), origin: Callable[[str], str] | None = None) -> str | None:
    """Why ``node`` may not run under the policy, or ``None`` if it may (``origin(name)`` says where
    an input comes from, for the reason)."""
    checker = Checker(resolve, tensor_methods, trusted, origin)
    node.visit(checker)
    return checker.reason


def is_star_import(statement: cst.CSTNode) -> bool:
    return m.matches(statement, m.SimpleStatementLine(body=[m.ImportFrom(names=m.ImportStar())]))
