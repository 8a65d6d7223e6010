"""Find head loops and describe each as a ``Site``: its initialisations, its averages, what
it computes (via ``evaluate`` and ``classify``) or why it is refused."""

from __future__ import annotations

from dataclasses import replace

import libcst as cst
import libcst.matchers as m
from libcst.metadata import MetadataWrapper, PositionProvider, QualifiedNameProvider, ScopeProvider

from mtp_migrate.config import UTILITY_NAMES
from mtp_migrate.cst_utils import code, dotted, literal_number
from mtp_migrate.flow.dataflow import FlowIndex, Point, live_after, locate
from mtp_migrate.flow.names import binds
from mtp_migrate.mtp_loop.classify import classify
from mtp_migrate.mtp_loop.evaluate import LoopEvaluator, evaluate
from mtp_migrate.mtp_loop.facts import Facts
from mtp_migrate.mtp_loop.losses import REGISTERED_NAMES, Form, suffixes, written_out
from mtp_migrate.mtp_loop.site import Site
from mtp_migrate.mtp_loop.spec import Average, Divisor
from mtp_migrate.mtp_loop.symbolic import Ratio, View
from mtp_migrate.refusals import Code, Refusal


class _HeadLoops(cst.CSTVisitor):
    """The innermost ``for`` around each cross-entropy-like call (not outer batch loops)."""

    def __init__(self, modules: set[str]):
        self.modules = modules  # names bound to a loss module somewhere in the file: `criterion(...)` calls it
        self.loops: list[cst.For] = []
        self.found: dict[int, cst.For] = {}

    def visit_For(self, node):
        self.loops.append(node)

    def leave_For(self, node):
        self.loops.pop()

    def visit_FunctionDef(self, node):
        self.loops.append(None)  # a loop outside a nested function does not hold its calls

    def leave_FunctionDef(self, node):
        self.loops.pop()

    def visit_Call(self, node):
        loss = (dotted(node.func) or "").endswith(suffixes(Form.FUNCTION)) or m.matches(
            node.func, m.Name(m.MatchIfTrue(lambda name: name in self.modules)))
        if loss:
            self._found()

    def visit_UnaryOperation(self, node):
        if written_out(node, None):
            self._found()

    def visit_BinaryOperation(self, node):
        if written_out(node, dotted(node.left.func) if isinstance(node.left, cst.Call) else None):
            self._found()

    def _found(self):
        if self.loops and self.loops[-1] is not None:
            self.found[id(self.loops[-1])] = self.loops[-1]


class Analysis:
    """Module-wide metadata for site analysis: qualified names, positions, a dataflow memo."""

    def __init__(self, module: cst.Module):
        wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
        self._qualified = wrapper.resolve(QualifiedNameProvider)
        self._scopes = wrapper.resolve(ScopeProvider)
        self.positions = wrapper.resolve(PositionProvider)
        self.index = FlowIndex()
        stars = [dotted(s.module) for s in m.findall(module, m.ImportFrom(names=m.ImportStar()))]
        self._star = stars[0] if len(stars) == 1 and not stars[0].startswith(".") else None

    def qualified(self, node: cst.CSTNode) -> set[str]:
        names = self._qualified.get(node, ())
        if callable(names):  # resolved lazily by LibCST
            names = names()
        if not names and self._star is not None and isinstance(node, cst.Name):
            return self._from_star(node)
        return {name.name for name in names}

    def _from_star(self, node: cst.Name) -> set[str]:
        """``cross_entropy`` bound by the module's one ``from torch.nn.functional import *`` and nothing else: only
        registered names are taken for what the star import binds (what else it binds is not known here)."""
        scope = self._scopes.get(node)
        name = f"{self._star}.{node.value}"
        if scope is None or scope[node.value] or name not in REGISTERED_NAMES:
            return set()
        return {name}


def _assigned(statement: cst.BaseStatement) -> tuple[str, cst.BaseExpression] | None:
    """``(name, value)`` of ``name = value`` or ``name: T = value``."""
    if m.matches(statement, m.SimpleStatementLine(body=[m.Assign(targets=[m.AssignTarget(m.Name())])])):
        return statement.body[0].targets[0].target.value, statement.body[0].value
    if m.matches(statement, m.SimpleStatementLine(body=[m.AnnAssign(target=m.Name())])) and \
            statement.body[0].value is not None:
        return statement.body[0].target.value, statement.body[0].value
    return None


def accumulator_inits(statement: cst.BaseStatement, qualified) -> dict[str, cst.BaseExpression]:
    """The names a statement sets to a zero, each with its zero: ``name = zero`` or, all zeros,
    ``total, count = 0.0, 0``; an empty list (``losses = []``) is the zero of a list summed after the loop."""
    assigned = _assigned(statement)
    if assigned is not None:
        name, value = assigned
        return {name: value} if _is_zero_init(value, qualified) else {}
    if not m.matches(statement, m.SimpleStatementLine(body=[m.Assign(
            targets=[m.AssignTarget(m.Tuple())], value=m.Tuple())])):
        return {}
    targets, values = statement.body[0].targets[0].target.elements, statement.body[0].value.elements
    if len(targets) != len(values) or any(not isinstance(t.value, cst.Name) or isinstance(t, cst.StarredElement)
                                          or isinstance(v, cst.StarredElement) for t, v in zip(targets, values,
                                                                                               strict=True)):
        return {}
    zeros = {t.value.value: v.value for t, v in zip(targets, values, strict=True)}
    if len(zeros) != len(targets) or not all(_is_zero_init(v, qualified) for v in zeros.values()):
        return {}
    return zeros


def _is_zero_init(value: cst.BaseExpression, qualified) -> bool:
    """``0 | 0.0 | [] | torch.tensor(0.0, ...) | torch.zeros(()) | x.new_zeros(())``."""
    if literal_number(value) == 0 or m.matches(value, m.List(elements=[])):
        return True
    if not isinstance(value, cst.Call) or not value.args or value.args[0].keyword is not None:
        return False
    first = value.args[0].value
    empty_shape = m.matches(first, m.Tuple(elements=[]) | m.List(elements=[]))
    callee = qualified(value.func)
    method = value.func.attr.value if isinstance(value.func, cst.Attribute) else None
    if (callee & {"torch.tensor", "torch.scalar_tensor"} or method == "new_tensor") and literal_number(first) == 0:
        return True
    return bool((callee == {"torch.zeros"} or method == "new_zeros") and empty_shape)


def _accumulated(statement: cst.BaseStatement) -> set[str]:
    """Names a loop body statement adds to (``x += ...``, ``x = x + ...``, ``x.append(...)``), at any depth
    of ``if``."""
    names = {node.func.value.value for node in m.findall(statement, m.Call(func=m.Attribute(
        value=m.Name(), attr=m.Name("append"))))}
    for node in m.findall(statement, m.AugAssign(target=m.Name())):
        names.add(node.target.value)
    for node in m.findall(statement, m.Assign(targets=[m.AssignTarget(m.Name())],
                                               value=m.BinaryOperation(operator=m.Add()))):
        target = node.targets[0].target.value
        if m.matches(node.value.left, m.Name(target)) or m.matches(node.value.right, m.Name(target)):
            names.add(target)
    return names


def _divisor(node: cst.BaseExpression, ev: LoopEvaluator, qualified) -> Divisor:
    inner = node
    if isinstance(inner, cst.Call) and qualified(inner.func) & {"builtins.float", "builtins.int"} and \
            len(inner.args) == 1:
        inner = inner.args[0].value
    if isinstance(node, cst.Call) and qualified(node.func) == {"builtins.max"} and len(node.args) == 2:
        values = [a.value for a in node.args]
        counter = next((v for v in values if isinstance(v, cst.Name)), None)
        if counter is not None and any(literal_number(v) == 1 for v in values):
            return Divisor("valid", counter=counter.value)
    if code(inner) == code(ev.head_count) or (ev.count_name and m.matches(inner, m.Name(ev.count_name))):
        return Divisor("heads")
    here = ev.facts.expression(inner, ev.facts.point)
    there = ev.facts.expression(ev.head_count, ev.facts.point)
    if here is not None and here == there:
        return Divisor("heads")
    return Divisor("other", code(node))


def _reciprocal(node: cst.BaseExpression) -> cst.BaseExpression | None:
    """``n`` of ``1.0 / n`` (or ``1 / n``): ``acc * (1.0 / n)`` averages as ``acc / n`` does."""
    if m.matches(node, m.BinaryOperation(operator=m.Divide())) and literal_number(node.left) == 1:
        return node.right
    return None


def _averaged(node: cst.BaseExpression, ev: LoopEvaluator) -> tuple[str, cst.BaseExpression] | None:
    """``(acc, divisor)`` of ``acc / divisor`` or ``acc * (1.0 / divisor)``, with ``sum(acc)`` for an
    accumulator the loop appends to."""
    if not isinstance(node, cst.BinaryOperation):
        return None
    read = _read_sum(node.left, ev)
    if read is None:
        return None
    if isinstance(node.operator, cst.Divide):
        return read.value, node.right
    reciprocal = _reciprocal(node.right) if isinstance(node.operator, cst.Multiply) else None
    return None if reciprocal is None else (read.value, reciprocal)


def _read_sum(node: cst.BaseExpression, ev: LoopEvaluator) -> cst.Name | None:
    """The accumulator ``node`` reads as its sum: ``acc``, or ``sum(acc)`` of a list the loop appends to."""
    if isinstance(node, cst.Name):
        return None if node.value in ev.lists else node
    if m.matches(node, m.Call(args=[m.Arg(keyword=None, star="", value=m.Name())])) and \
            ev.qualified(node.func) == {"builtins.sum"} and node.args[0].value.value in ev.lists:
        return node.args[0].value
    return None


class _Inline(cst.CSTTransformer):
    """Replace ``acc / divisor`` (or ``acc * (1.0 / divisor)``) by ``acc`` for the accumulators in ``targets``."""

    def __init__(self, targets: set[str], ev: LoopEvaluator, qualified):
        self.targets = targets
        self.ev = ev
        self.qualified = qualified
        self.divisors: dict[str, set[Divisor]] = {}

    def leave_BinaryOperation(self, original, updated):
        averaged = _averaged(original, self.ev)
        if averaged is not None and averaged[0] in self.targets:
            name, divisor = averaged
            self.divisors.setdefault(name, set()).add(_divisor(divisor, self.ev, self.qualified))
            return cst.Name(name, lpar=updated.lpar, rpar=updated.rpar)
        return updated


def _inline_use(statement, targets: set[str], ev, qualified, index) -> tuple[cst.BaseStatement, dict] | None:
    """A statement that reads accumulators only as ``acc / divisor`` (``return w / n, u / n``), rewritten."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None
    small = statement.body[0]
    if not isinstance(small, cst.Return | cst.Assign | cst.Expr | cst.AugAssign):
        return None
    used = index.reads(small) & targets
    if not used or binds(small) & targets:
        return None
    divided = {id(_read_sum(node.left, ev)) for node in m.findall(small, m.BinaryOperation()) if _averaged(node, ev)}
    if any(id(name) not in divided for name in m.findall(small, m.Name()) if name.value in used):
        return None  # the sum itself is used too
    transformer = _Inline(used, ev, qualified)
    new = statement.visit(transformer)
    if any(len(divisors) != 1 for divisors in transformer.divisors.values()):
        return None
    return new, {name: divisors.pop() for name, divisors in transformer.divisors.items()}


def _averages(block, loop_index, ev: LoopEvaluator, targets: set[str], qualified, index) -> tuple[list[Average], int]:
    """The head-average statements right after the loop, and the index just past them."""
    averages: list[Average] = []
    position = loop_index + 1
    pending = set(targets)
    while position < len(block) and pending:
        statement = block[position]
        small = statement.body[0] if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1 \
            else None
        in_place = None
        if isinstance(small, cst.AugAssign) and m.matches(small.target, m.Name()):
            in_place = small.value if isinstance(small.operator, cst.DivideAssign) else \
                _reciprocal(small.value) if isinstance(small.operator, cst.MultiplyAssign) else None
        averaged = _averaged(small.value, ev) if m.matches(small, m.Assign(targets=[m.AssignTarget(m.Name())])) \
            else None
        if in_place is not None and small.target.value in pending and small.target.value not in ev.lists:
            name = small.target.value
            averages.append(Average(name, name, _divisor(in_place, ev, qualified), position, in_place=True))
            pending.discard(name)
        elif averaged is not None and averaged[0] in pending and averaged[0] not in index.reads(averaged[1]):
            name = averaged[0]
            averages.append(Average(name, small.targets[0].target.value, _divisor(averaged[1], ev, qualified),
                                    position))
            pending.discard(name)
        else:
            inline = _inline_use(statement, pending, ev, qualified, index)
            if inline is None:
                break
            new, divisors = inline
            for name, divisor in divisors.items():
                averages.append(Average(name, name, divisor, position, new))
                pending.discard(name)
        position += 1
    return averages, position


def analyze(analysis: Analysis, scope, block, block_id: int, loop_index: int, indent: str,
            refuse_all: Refusal | None) -> Site:
    """Describe the site around ``block[loop_index]``."""
    block = tuple(block)
    loop = block[loop_index]
    positions = analysis.positions
    line = positions[loop].start.line
    site = Site(block=block, block_id=block_id, start=loop_index, stop=loop_index + 1, loop_index=loop_index,
                init_indices=(), averages=(), indent=indent, line=line, span=(line, positions[loop].end.line),
                scope=scope)
    progress = [site]  # the site as far as the analysis got: a late refusal keeps what was learned
    try:
        if refuse_all is not None:
            raise refuse_all
        return _analyze(analysis, progress)
    except Refusal as refusal:
        return replace(progress[-1], refusal=refusal)


def _analyze(analysis: Analysis, progress: list[Site]) -> Site:
    site = progress[-1]
    block, loop_index, loop = site.block, site.loop_index, site.loop
    qualified, index = analysis.qualified, analysis.index
    loop_writes = set().union(*(_accumulated(s) for s in loop.body.body))
    if not loop_writes:
        raise Refusal(Code.ACCUMULATOR, "the loop accumulates into no local variable (`name += ...`)")
    inits: dict[str, int] = {}
    zeros: dict[str, cst.BaseExpression] = {}
    for position in range(loop_index - 1, -1, -1):
        found = accumulator_inits(block[position], qualified)
        if found and set(found) <= loop_writes - set(inits):
            inits.update((name, position) for name in found)
            zeros.update(found)
        elif binds(block[position]) & (loop_writes - set(inits)) or index.reads(block[position]) & (
                loop_writes - set(inits)):
            break
    missing = loop_writes - set(inits)
    if missing:
        raise Refusal(Code.ACCUMULATOR, f"`{sorted(missing)[0]}` is accumulated without a zero initialisation "
                                        "right before the loop")
    for position in range(min(inits.values()), loop_index):
        touched = (index.reads(block[position]) | binds(block[position])) & set(inits)
        if position not in inits.values() and touched:
            raise Refusal(Code.ACCUMULATOR, f"`{sorted(touched)[0]}` is used or rebound between its "
                                            "initialisation and the loop")
    point = locate(site.scope, loop)
    facts = Facts(index, point, qualified)
    ev = evaluate(loop, set(inits), facts, {name for name, zero in zeros.items() if isinstance(zero, cst.List)})
    for metric in ev.head0:  # its zero default before the loop belongs to the site
        default = next((i for i in range(loop_index - 1, -1, -1)
                        if set(accumulator_inits(block[i], qualified)) == {metric.name}), None)
        if default is None:
            raise Refusal(Code.HEAD0_METRIC, f"the head-0 metric `{metric.name}` has no zero default before the "
                                             "loop")
        inits[metric.name] = default
        zeros[metric.name] = _assigned(block[default])[1]
    counters = {a.name for a in ev.accumulations if a.value == 1}
    if any(isinstance(a.value, Ratio) for a in ev.accumulations if a.name in counters):
        raise Refusal(Code.ACCUMULATOR, "a name is both a head counter and a loss accumulator")
    rho1_style = bool(counters or ev.head0 or any(
        isinstance(f, View) and f.head is not None for a in ev.accumulations if isinstance(a.value, Ratio)
        for f in a.value.numerator.factors))
    start = min(inits.values())
    temporaries = _temporaries(analysis, site.scope, loop, ev)
    site = replace(site, start=start, init_indices=tuple(sorted(set(inits.values()))), rho1_style=rho1_style,
                   temporaries=temporaries)
    progress.append(site)
    averages, stop = _averages(block, loop_index, ev, set(inits) - counters - {h.name for h in ev.head0},
                               qualified, index)
    positions = analysis.positions
    site = replace(site, averages=tuple(averages), stop=stop,
                   span=(positions[block[start]].start.line, positions[block[stop - 1]].end.line))
    spec = classify(ev, averages, counters, zeros)
    _check_liveness(analysis, site, spec)
    return replace(site, spec=spec,
                   rho1_style=rho1_style or spec.normalize == "weights" or spec.head_average == "valid")


def _check_liveness(analysis: Analysis, site: Site, spec) -> None:
    """Every name the site binds that is read later must be bound, to the same value, by the call."""
    inline = {a.accumulator for a in site.averages if a.inline is not None}
    outputs = {spec.weighted_output, spec.unweighted_output, spec.head0_output,
               *(scaled.output for scaled in spec.scaled_outputs)} - {None} - inline
    bound = set().union(*(binds(s) for s in site.statements))
    kept = set().union(*(binds(s) for s in site.kept)) if site.kept else set()
    point = locate(site.scope, site.block[site.start])
    point = Point(point.scope, point.levels, site.stop)
    live = live_after(analysis.index, point)
    if "*" in live:
        raise Refusal(Code.LIVE_AFTER, "the function inspects its own locals (locals(), eval, exec)")
    leaked = sorted((bound - outputs - kept) & live)
    if leaked:
        raise Refusal(Code.LIVE_AFTER, f"`{leaked[0]}`, bound by the loop, is read after it (the call would not "
                                       "bind it)")


def _temporaries(analysis: Analysis, scope, loop: cst.For, ev: LoopEvaluator) -> tuple[str, ...]:
    """Tensor names the body binds on every path, not deleted yet, and dead after the body."""
    statements = list(loop.body.body)
    index = analysis.index
    deleted = set()
    for statement in statements:
        if isinstance(statement, cst.SimpleStatementLine):
            deleted |= {n for small in statement.body if isinstance(small, cst.Del) for n in binds(small)}
    last = locate(scope, statements[-1])
    live = live_after(index, Point(last.scope, last.levels, last.stop))
    if "*" in live:
        return ()
    result = []
    for name in dict.fromkeys(ev.top_level):
        if name in deleted or name in live or any(isinstance(s, cst.BaseCompoundStatement) and name in binds(s)
                                                  for s in statements):
            continue
        first = next(i for i, s in enumerate(statements) if name in binds(s))
        if any(name in index.reads(s) for s in statements[:first + 1] if s is not statements[first]) or \
                name in index.reads(statements[first]):
            continue  # read before it is bound in the body: the previous iteration's value
        result.append(name)
    return tuple(result)


class SiteFinder(cst.CSTVisitor):
    """Collects every head loop as a ``Site``."""

    def __init__(self, analysis: Analysis, module: cst.Module, head_loops: dict[int, cst.For]):
        self.analysis = analysis
        self.module = module
        self.head_loops = head_loops
        self.sites: list[Site] = []
        self._indents: list[str] = [""]
        self._scopes: list = [module]
        self._functions: list[str] = []
        self._scripted: list[bool] = []  # per enclosing function: decorated with torch.jit.*

    def visit_Module(self, node):
        self._visit_block(node.body, node)

    def visit_FunctionDef(self, node):
        self._scopes.append(node)
        self._functions.append(node.name.value)
        self._scripted.append(any(name.startswith("torch.jit.") for decorator in node.decorators
                                  for name in self.analysis.qualified(_called(decorator.decorator))))

    def leave_FunctionDef(self, node):
        self._scopes.pop()
        self._functions.pop()
        self._scripted.pop()

    def visit_IndentedBlock(self, node):
        indent = self._indents[-1] + (self.module.default_indent if node.indent is None else node.indent)
        self._indents.append(indent)
        self._visit_block(node.body, node)

    def leave_IndentedBlock(self, node):
        self._indents.pop()

    def _visit_block(self, body, node):
        for position, statement in enumerate(body):
            if id(statement) in self.head_loops:
                refuse = None
                if set(self._functions) & set(UTILITY_NAMES):
                    refuse = Refusal(Code.UTILITY_ITSELF, "a loop inside the loss utility itself")
                elif any(self._scripted):
                    refuse = Refusal(Code.TORCHSCRIPT, "a loop inside a `torch.jit` function: TorchScript cannot "
                                                       "compile the utility, so the module would fail at import")
                self.sites.append(analyze(self.analysis, self._scopes[-1], body, id(node), position,
                                          self._indents[-1], refuse))


def _called(decorator: cst.BaseExpression) -> cst.BaseExpression:
    """``torch.jit.script`` for ``@torch.jit.script`` and for ``@torch.jit.script(...)``."""
    return decorator.func if isinstance(decorator, cst.Call) else decorator


def find_sites(module: cst.Module, analysis: Analysis | None = None) -> list[Site]:
    built = m.findall(module, m.Assign(targets=[m.AssignTarget(m.Name())], value=m.Call()))
    loops = _HeadLoops({a.targets[0].target.value for a in built
                        if (dotted(a.value.func) or "").endswith(suffixes(Form.MODULE))})
    module.visit(loops)
    if not loops.found:
        return []
    analysis = analysis or Analysis(module)
    finder = SiteFinder(analysis, module, loops.found)
    module.visit(finder)
    return finder.sites

