"""Export the vendored utility from a ``weighted_mtp/utils/__init__.py``: import and ``__all__``."""

from __future__ import annotations

import libcst as cst
import libcst.matchers as m
from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand

from codemods.mtp_loop.emit import UNWEIGHTED, WEIGHTED

EXPORTS = (WEIGHTED, UNWEIGHTED)


class ExportUtilityCommand(VisitorBasedCodemodCommand):
    DESCRIPTION = "Import compute_mtp_ce_loss* from loss_utils in utils/__init__.py and list them in __all__."

    def __init__(self, context: CodemodContext):
        super().__init__(context)
        self.imported: set[str] = set()
        self.relative = False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        if isinstance(node.names, cst.ImportStar):
            return
        self.relative |= bool(node.relative)
        self.imported |= {alias.evaluated_alias or alias.evaluated_name for alias in node.names}

    def leave_Assign(self, original_node: cst.Assign, updated_node: cst.Assign) -> cst.Assign:
        if not m.matches(updated_node, m.Assign(targets=[m.AssignTarget(m.Name("__all__"))],
                                                value=m.List() | m.Tuple())):
            return updated_node
        listed = updated_node.value.elements
        present = {e.value.evaluated_value for e in listed if isinstance(e.value, cst.SimpleString)}
        quote = listed[0].value.value[0] if listed and isinstance(listed[0].value, cst.SimpleString) else '"'
        missing = [name for name in EXPORTS if name not in present]
        if not missing:
            return updated_node
        separator = next((e.comma for e in listed[:-1] if isinstance(e.comma, cst.Comma)),
                         cst.Comma(whitespace_after=cst.SimpleWhitespace(" ")))
        last_comma = listed[-1].comma if listed else cst.MaybeSentinel.DEFAULT
        elements = [e.with_changes(comma=separator) for e in listed]
        elements += [cst.Element(cst.SimpleString(f"{quote}{name}{quote}"), comma=separator) for name in missing]
        elements[-1] = elements[-1].with_changes(comma=last_comma)
        return updated_node.with_changes(value=updated_node.value.with_changes(elements=elements))

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        missing = [name for name in EXPORTS if name not in self.imported]
        if not missing:
            return updated_node
        source = ".loss_utils" if self.relative else "weighted_mtp.utils.loss_utils"
        statement = cst.parse_statement(f"from {source} import {', '.join(missing)}\n")
        body = list(updated_node.body)
        # After the docstring, __future__ and the other imports.
        position = 0
        for index, item in enumerate(body):
            if m.matches(item, m.SimpleStatementLine(body=[m.Import() | m.ImportFrom() | m.Expr(m.SimpleString())])):
                position = index + 1
        body.insert(position, statement)
        return updated_node.with_changes(body=body)
