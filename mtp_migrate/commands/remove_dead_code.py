"""Remove what a rewrite made dead: shape unpacks, ``model_dtype`` lookups, loss modules, imports.

Only names that the removed code read are candidates (``names``: ``--names`` on the
command line, or what ``RewriteMTPLoopCommand`` removed), so nothing that was already
unused before is touched.
Never removed: ``__future__`` imports, names in ``__all__``, imports in ``__init__.py``
and imports marked ``# noqa``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m
from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand
from libcst.codemod.visitors import RemoveImportsVisitor
from libcst.metadata import QualifiedNameProvider, ScopeProvider

from mtp_migrate.cst_utils import code, dotted
from mtp_migrate.mtp_loop.losses import Form, spelling

# `x.shape[i]`, `x.size(i)`, `x.dtype`, `x.device`, `next(m.parameters()).dtype`: pure lookups.
_PURE_LOOKUP = (
    m.Subscript(value=m.Attribute(attr=m.Name("shape")))
    | m.Call(func=m.Attribute(attr=m.Name("size")))
    | m.Attribute(attr=m.Name("dtype") | m.Name("device"))
)
_SHAPE = m.Attribute(attr=m.Name("shape")) | m.Call(func=m.Attribute(attr=m.Name("size")), args=[])


class KeepsSurroundingLines:
    """Mixin for transforms that remove statements: the lines above a removed statement go to the next one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.depth = 0  # indented blocks entered
        self.pending: _Removed | None = None  # lines of removed statements, until the next statement takes them
        self.deliveries: dict[int, list[cst.EmptyLine]] = {}  # id(statement) -> the lines it takes
        self.block_start = False  # the next statement visited opens an indented block
        self.firsts: set[int] = set()  # id(statement) of the statements that open their block (or now do)

    def on_visit(self, node: cst.CSTNode) -> bool:
        if isinstance(node, cst.BaseStatement):
            if self.block_start:
                self.firsts.add(id(node))
            self.block_start = False
            if self.pending is not None:
                self.deliveries[id(node)] = self.pending.lines_for(node, self.depth)
                if self.pending.first and self.pending.sibling(self.depth):
                    self.firsts.add(id(node))
                self.pending = None
        if isinstance(node, cst.IndentedBlock):
            self.depth += 1
            self.block_start = True
        return super().on_visit(node)

    def on_leave(self, original_node, updated_node):
        if id(original_node) in self.deliveries:
            lines = _join(self.deliveries.pop(id(original_node)), updated_node.leading_lines)
            if id(original_node) in self.firsts:  # what now opens the block has no blank line above it
                lines = _strip_blank_start(lines)
            updated_node = updated_node.with_changes(leading_lines=lines)
        if isinstance(original_node, cst.IndentedBlock):
            self.depth -= 1
            if self.pending is not None:
                self.pending.left_block = True
        result = super().on_leave(original_node, updated_node)
        removed = isinstance(result, cst.RemovalSentinel) or (
            isinstance(result, cst.SimpleStatementLine) and not result.body)
        if removed and isinstance(original_node, cst.SimpleStatementLine):
            self.pending = _Removed(list(updated_node.leading_lines), self.depth, id(original_node) in self.firsts)
        return result


class _RemoveImports(KeepsSurroundingLines, RemoveImportsVisitor):
    pass


class RemoveDeadCodeCommand(KeepsSurroundingLines, VisitorBasedCodemodCommand):
    DESCRIPTION = "Remove shape unpacks, dtype lookups and imports that only the rewritten MTP loop used."

    METADATA_DEPENDENCIES = (ScopeProvider, QualifiedNameProvider)

    @staticmethod
    def add_args(arg_parser: argparse.ArgumentParser) -> None:
        arg_parser.add_argument("--names", nargs="+", default=[], help="names the removed code read")

    def __init__(self, context: CodemodContext, names=()):
        super().__init__(context)
        self.freed = set(names)
        self.exported: set[str] = set()
        # (bound name, (module, name, alias)) of each import that may be dropped if unused and freed
        self.imports: list[tuple[str, tuple[str, str | None, str | None]]] = []

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        tree = super().transform_module_impl(tree)
        imports = [spec for bound, spec in self.imports if bound in self.freed]  # freed: also what removals read
        if not imports:
            return tree
        # Run here, once, rather than scheduled: later commands share this context.
        return _RemoveImports(self.context, imports).transform_module(tree)

    def visit_Module(self, node: cst.Module) -> None:
        for statement in node.body:
            if not isinstance(statement, cst.SimpleStatementLine):
                continue
            for small in statement.body:
                if m.matches(small, m.Assign(targets=[m.AssignTarget(m.Name("__all__"))])) and \
                        isinstance(small.value, cst.List | cst.Tuple):
                    self.exported |= {e.value.evaluated_value for e in small.value.elements
                                      if isinstance(e.value, cst.SimpleString)}

    def _unused(self, name_node: cst.Name) -> bool:
        scope = self.get_metadata(ScopeProvider, name_node, None)
        if scope is None:
            return False
        return not any(assignment.references for assignment in scope.assignments[name_node.value])

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
        comment = node.trailing_whitespace.comment
        if comment is not None and "noqa" in comment.value:
            return
        filename = self.context.filename or ""
        for small in node.body:
            if isinstance(small, cst.Import | cst.ImportFrom) and not filename.endswith("__init__.py"):
                self._schedule_import_removal(small)

    def _schedule_import_removal(self, node: cst.Import | cst.ImportFrom) -> None:
        if isinstance(node, cst.ImportFrom):
            if node.relative or node.module is None or isinstance(node.names, cst.ImportStar):
                return
            module = dotted(node.module)
            if module == "__future__":
                return
            for alias in node.names:
                bound = alias.evaluated_alias or alias.evaluated_name
                if bound not in self.exported:
                    self.imports.append((bound, (module, alias.evaluated_name, alias.evaluated_alias)))
            return
        for alias in node.names:
            bound = alias.evaluated_alias or alias.evaluated_name.split(".")[0]
            if bound not in self.exported:
                self.imports.append((bound, (alias.evaluated_name, None, alias.evaluated_alias)))

    def leave_SimpleStatementLine(self, original_node, updated_node):
        if len(updated_node.body) != 1 or not isinstance(updated_node.body[0], cst.Assign):
            return updated_node
        assign = updated_node.body[0]
        original = original_node.body[0]
        if len(assign.targets) != 1:
            return updated_node
        target = original.targets[0].target
        if isinstance(target, cst.Name) and (m.matches(assign.value, _PURE_LOOKUP) or self._builds_loss(original.value)):
            if target.value in self.freed and self._unused(target):
                self.freed |= _reads(original.value)
                return cst.RemoveFromParent()
            return updated_node
        if isinstance(target, cst.Tuple) and m.matches(assign.value, _SHAPE) and \
                all(isinstance(e.value, cst.Name) for e in target.elements):
            return self._unpack(updated_node, assign, target)
        return updated_node

    def _builds_loss(self, value: cst.BaseExpression) -> bool:
        """``nn.CrossEntropyLoss(reduction="none")``: a registered loss module built from its own options,
        with no call among them, so building it has no effect."""
        if not isinstance(value, cst.Call):
            return False
        names = {name.name for name in self.get_metadata(QualifiedNameProvider, value.func, set())}
        loss = spelling(names, Form.MODULE)
        return loss is not None and all(
            a.keyword is not None and a.keyword.value in loss.options for a in value.args) and not any(
            m.findall(a.value, m.Call()) for a in value.args)

    def _unpack(self, statement: cst.SimpleStatementLine, assign: cst.Assign, target: cst.Tuple):
        """``b, s, n, v = x.shape`` keeps only the names still used: ``n = x.shape[2]``, ``_, s, n, _ = ...``."""
        elements = list(target.elements)
        names = [e.value for e in elements]
        unused = [self._unused(n) for n in names]
        if not any(u and n.value in self.freed for n, u in zip(names, unused, strict=True)):
            return statement
        starred = next((i for i, e in enumerate(elements) if isinstance(e, cst.StarredElement)), None)
        kept = [(i, n.value) for i, (n, u) in enumerate(zip(names, unused, strict=True)) if not u]
        shape = code(assign.value.value if isinstance(assign.value, cst.Attribute) else assign.value.func.value)
        if not kept:
            return cst.RemoveFromParent()
        if len(kept) == 1 and kept[0][0] != starred:
            ((index, name),) = kept
            if starred is not None and index > starred:
                index -= len(elements)  # after `*rest`: counted from the end
            new = cst.parse_statement(f"{name} = {shape}.shape[{index}]\n")
        else:
            kept_names = dict(kept)
            parts = [("*" if i == starred else "") + kept_names.get(i, "_") for i in range(len(names))]
            new = cst.parse_statement(f"{', '.join(parts)} = {code(assign.value)}\n")
        return new.with_changes(leading_lines=statement.leading_lines, trailing_whitespace=statement.trailing_whitespace)



@dataclass
class _Removed:
    """The lines above a removed statement: blank lines and comments about something else move on; the
    comment directly above it goes with it, unless the next line continues its group."""

    leading_lines: list[cst.EmptyLine]
    depth: int
    first: bool  # it opened its block
    left_block: bool = False

    def sibling(self, depth: int) -> bool:
        return depth == self.depth and not self.left_block

    def lines_for(self, receiver: cst.BaseStatement, depth: int) -> list[cst.EmptyLine]:
        lines = self.leading_lines
        attached = len(lines)
        while attached and lines[attached - 1].comment is not None:
            attached -= 1
        if not self.sibling(depth):  # it ended its block: its blank lines go with it
            return [line for line in lines[:attached] if line.comment is not None]
        if not receiver.leading_lines:  # `# dims` above `B, S, N, V = ...` and the line after it
            return lines
        return lines[:attached]


def _reads(node: cst.BaseExpression) -> set[str]:
    """The names ``node`` reads (not attribute or keyword names)."""
    names = {id(n): n.value for n in m.findall(node, m.Name())}
    for part in m.findall(node, m.Attribute() | m.Arg()):
        names.pop(id(part.attr if isinstance(part, cst.Attribute) else part.keyword), None)
    return set(names.values())


def _join(carried: list[cst.EmptyLine], own) -> list[cst.EmptyLine]:
    """``carried + own``, where blank lines meeting at the join count once (the larger run wins)."""
    own = list(own)
    tail = len(carried) - len(_strip_blank_start(carried[::-1]))
    head = len(own) - len(_strip_blank_start(own))
    if tail and head:
        carried = carried[:len(carried) - min(tail, head)]
    return [*carried, *own]


def _strip_blank_start(lines: list[cst.EmptyLine]) -> list[cst.EmptyLine]:
    start = 0
    while start < len(lines) and lines[start].comment is None:
        start += 1
    return lines[start:]
