"""Export the vendored utility from a package's ``__init__.py``: the import and the ``__all__`` entries.

Existing entries, their comments and their blank lines are left exactly as they are;
the new names go where the list's own order puts them (sorted lists stay sorted). The
import goes where ruff's isort rules put it (``import_order.py``), and the import and a
one-line ``__all__`` are wrapped at the project's line length.
"""

from __future__ import annotations

import bisect

import libcst as cst
import libcst.matchers as m
from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand

from mtp_migrate.config import DEFAULT_LINE_LENGTH, DEFAULT_UTILITY_MODULE, UTILITY_NAMES
from mtp_migrate.cst_utils import code
from mtp_migrate.import_order import FirstParty, insert, new_import


class ExportUtilityCommand(VisitorBasedCodemodCommand):
    DESCRIPTION = "Import compute_mtp_ce_loss* from loss_utils in a package's __init__.py and list them in __all__."

    def __init__(self, context: CodemodContext, module: str = DEFAULT_UTILITY_MODULE,
                 line_length: int = DEFAULT_LINE_LENGTH, first_party: FirstParty | None = None):
        super().__init__(context)
        self.utility_module = module
        self.line_length = line_length
        self.first_party = first_party or (lambda name: name.split(".")[0] == module.split(".")[0])
        self.imported: set[str] = set()
        self.relative = False
        self.grown: cst.Assign | None = None  # the __all__ the names were added to

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        if isinstance(node.names, cst.ImportStar):
            return
        self.relative |= bool(node.relative)
        self.imported |= {alias.evaluated_alias or alias.evaluated_name for alias in node.names}

    def leave_Assign(self, original_node: cst.Assign, updated_node: cst.Assign) -> cst.Assign:
        if not m.matches(updated_node, m.Assign(targets=[m.AssignTarget(m.Name("__all__"))],
                                                value=m.List() | m.Tuple())):
            return updated_node
        listed = list(updated_node.value.elements)
        if not all(isinstance(e.value, cst.SimpleString) for e in listed):
            return updated_node
        present = [e.value.evaluated_value for e in listed]
        missing = [name for name in UTILITY_NAMES if name not in present]
        if not missing:
            return updated_node
        quote = listed[0].value.value[0] if listed else '"'
        container = updated_node.value
        separator = _separator(listed, container)
        elements = list(listed)
        for name in missing:
            new = cst.Element(cst.SimpleString(f"{quote}{name}{quote}"), comma=separator)
            values = [e.value.evaluated_value for e in elements]
            ordered = len(values) > 1 and values == sorted(values)
            position = bisect.bisect(values, name) if ordered else len(elements)
            if position == len(elements):  # the new last element ends the list as the old last one did
                if elements:
                    last = elements[-1]
                    new = new.with_changes(comma=_without_comment(last.comma))
                    container, last = _detach_closing_comment(container, last, separator)
                    elements[-1] = last.with_changes(comma=_keep_comment(separator, last.comma))
                else:
                    new = new.with_changes(comma=cst.MaybeSentinel.DEFAULT)
            elements.insert(position, new)
        self.grown = updated_node.with_changes(value=container.with_changes(elements=elements))
        return self.grown

    def leave_SimpleStatementLine(self, original_node: cst.SimpleStatementLine,
                                  updated_node: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        """``__all__`` on one line that the new names made too long: one name per line."""
        if updated_node.body[0] is not self.grown or not isinstance(self.grown.value, cst.List):
            return updated_node
        text = code(updated_node.with_changes(leading_lines=()))
        if "\n" in text.rstrip("\n") or len(text.rstrip("\r\n")) <= self.line_length:
            return updated_node
        target = code(updated_node.body[0].targets[0].target)
        names = "".join(f"    {code(element.value)},\n" for element in updated_node.body[0].value.elements)
        return cst.parse_statement(f"{target} = [\n{names}]\n").with_changes(
            leading_lines=updated_node.leading_lines, trailing_whitespace=updated_node.trailing_whitespace)

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        missing = [name for name in UTILITY_NAMES if name not in self.imported]
        if not missing:
            return updated_node
        source = ".loss_utils" if self.relative else f"{self.utility_module}.loss_utils"
        return insert(updated_node, new_import(source, missing, {}, self.line_length), self.first_party)


def _separator(listed: list[cst.Element], container: cst.List | cst.Tuple) -> cst.Comma:
    """A comma like the list's own, without any comment or blank line it carries."""
    for element in listed[:-1]:
        comma = element.comma
        if isinstance(comma, cst.Comma):
            after = comma.whitespace_after
            if isinstance(after, cst.ParenthesizedWhitespace):
                after = after.with_changes(first_line=cst.TrailingWhitespace(), empty_lines=())
            return comma.with_changes(whitespace_after=after)
    opening = container.lbracket.whitespace_after if isinstance(container, cst.List) else (
        container.lpar[0].whitespace_after if container.lpar else cst.SimpleWhitespace(""))
    if isinstance(opening, cst.ParenthesizedWhitespace):
        return cst.Comma(whitespace_after=opening.with_changes(empty_lines=()))
    return cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))


def _detach_closing_comment(container, last: cst.Element, separator: cst.Comma):
    """A comment after the last element sits on the closing bracket, where an appended name would take
    it: move it onto the element's own comma, ``(container, last)``."""
    closing = container.rbracket if isinstance(container, cst.List) else (container.rpar[0] if container.rpar else None)
    space = closing.whitespace_before if closing is not None else None
    if not (isinstance(space, cst.ParenthesizedWhitespace) and space.first_line.comment is not None) or \
            not isinstance(separator.whitespace_after, cst.ParenthesizedWhitespace):
        return container, last
    comma = last.comma if isinstance(last.comma, cst.Comma) else cst.Comma()
    last = last.with_changes(comma=comma.with_changes(whitespace_after=separator.whitespace_after.with_changes(
        first_line=space.first_line)))
    closing = closing.with_changes(whitespace_before=space.with_changes(first_line=cst.TrailingWhitespace()))
    if isinstance(container, cst.List):
        return container.with_changes(rbracket=closing), last
    return container.with_changes(rpar=[closing, *container.rpar[1:]]), last


def _keep_comment(separator: cst.Comma, old: cst.Comma | cst.MaybeSentinel) -> cst.Comma:
    """``separator``, keeping a comment that followed the old last element on its line."""
    if isinstance(old, cst.Comma) and isinstance(old.whitespace_after, cst.ParenthesizedWhitespace) and \
            isinstance(separator.whitespace_after, cst.ParenthesizedWhitespace):
        return separator.with_changes(whitespace_after=separator.whitespace_after.with_changes(
            first_line=old.whitespace_after.first_line))
    return separator


def _without_comment(comma: cst.Comma | cst.MaybeSentinel) -> cst.Comma | cst.MaybeSentinel:
    if isinstance(comma, cst.Comma) and isinstance(comma.whitespace_after, cst.ParenthesizedWhitespace):
        return comma.with_changes(whitespace_after=comma.whitespace_after.with_changes(
            first_line=cst.TrailingWhitespace()))
    return comma
