"""Import the loss utility, merged in sorted order into an existing ``from MODULE import (...)``.

A new import goes where ruff's isort rules put it (``import_order.py``); both a new and a
merged import are wrapped at the project's line length.
"""

from __future__ import annotations

import argparse

import libcst as cst
from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand

from mtp_migrate.config import DEFAULT_LINE_LENGTH, DEFAULT_UTILITY_MODULE
from mtp_migrate.cst_utils import dotted
from mtp_migrate.import_order import FirstParty, insert, member_order, new_import, wrapped


class AddUtilityImportCommand(VisitorBasedCodemodCommand):
    DESCRIPTION = "Import compute_mtp_ce_loss* from the utility module, merging into an existing import."

    @staticmethod
    def add_args(arg_parser: argparse.ArgumentParser) -> None:
        arg_parser.add_argument("--names", nargs="+", default=[], help="names to import")
        arg_parser.add_argument("--utility-module", default=DEFAULT_UTILITY_MODULE, dest="utility_module")
        arg_parser.add_argument("--line-length", type=int, default=DEFAULT_LINE_LENGTH, dest="line_length")

    def __init__(self, context: CodemodContext, names=(), utility_module: str = DEFAULT_UTILITY_MODULE,
                 aliases: dict[str, str] | None = None, line_length: int = DEFAULT_LINE_LENGTH,
                 first_party: FirstParty | None = None):
        super().__init__(context)
        self.import_module = utility_module
        self.line_length = line_length
        self.first_party = first_party or (lambda module: False)  # no tree to look at: only the stdlib is known
        self.names = set(names)
        self.aliases = {name: alias for name, alias in (aliases or {}).items() if alias and alias != name}
        self.merged = False
        self.grown: cst.ImportFrom | None = None  # the import the names were merged into

    def leave_SimpleStatementLine(self, original_node: cst.SimpleStatementLine,
                                  updated_node: cst.SimpleStatementLine) -> cst.SimpleStatementLine:
        if self.grown is not None and updated_node.body[0] is self.grown:
            return wrapped(updated_node, self.line_length)
        return updated_node

    def leave_ImportFrom(self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom) -> cst.ImportFrom:
        if self.merged or not self.names or updated_node.relative or isinstance(updated_node.names, cst.ImportStar):
            return updated_node
        if updated_node.module is None or dotted(updated_node.module) != self.import_module:
            return updated_node
        self.merged = True
        aliases = list(updated_node.names)
        present = {(alias.evaluated_name, alias.evaluated_alias) for alias in aliases}
        missing = sorted(n for n in self.names if (n, self.aliases.get(n)) not in present)
        if not missing:
            return updated_node
        present_names = [a.evaluated_name for a in aliases]
        keep_sorted = present_names == sorted(present_names, key=member_order)
        separator = next((a.comma for a in aliases[:-1] if isinstance(a.comma, cst.Comma)), None)
        if separator is None and updated_node.lpar is not None:  # one name per line, as after "("
            separator = cst.Comma(whitespace_after=updated_node.lpar.whitespace_after)
        separator = separator or cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        last_comma = aliases[-1].comma
        new = [cst.ImportAlias(name=cst.Name(name), asname=cst.AsName(cst.Name(self.aliases[name]))
                               if name in self.aliases else None) for name in missing]
        merged = sorted(aliases + new, key=lambda a: member_order(a.evaluated_name)) if keep_sorted else aliases + new
        fixed = [alias.with_changes(comma=alias.comma if alias in aliases[:-1] else separator) for alias in merged]
        fixed[-1] = fixed[-1].with_changes(comma=last_comma)
        if len(fixed) > 1 and updated_node.lpar is None and isinstance(last_comma, cst.Comma):
            fixed[-1] = fixed[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        self.grown = updated_node.with_changes(names=fixed)
        return self.grown

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        if self.merged or not self.names:
            return updated_node
        statement = new_import(self.import_module, sorted(self.names), self.aliases, self.line_length)
        return insert(updated_node, statement, self.first_party)
