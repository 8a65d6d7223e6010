"""Import the loss utility, merged in sorted order into an existing ``from MODULE import (...)``."""

from __future__ import annotations

import argparse

import libcst as cst
import libcst.matchers as m
from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand
from libcst.codemod.visitors import AddImportsVisitor, ImportItem

from mtp_migrate.config import DEFAULT_UTILITY_MODULE
from mtp_migrate.cst_utils import dotted


class AddUtilityImportCommand(VisitorBasedCodemodCommand):
    DESCRIPTION = "Import compute_mtp_ce_loss* from the utility module, merging into an existing import."

    @staticmethod
    def add_args(arg_parser: argparse.ArgumentParser) -> None:
        arg_parser.add_argument("--names", nargs="+", default=[], help="names to import")
        arg_parser.add_argument("--utility-module", default=DEFAULT_UTILITY_MODULE, dest="utility_module")

    def __init__(self, context: CodemodContext, names=(), utility_module: str = DEFAULT_UTILITY_MODULE,
                 aliases: dict[str, str] | None = None):
        super().__init__(context)
        self.import_module = utility_module
        self.names = set(names)
        self.aliases = {name: alias for name, alias in (aliases or {}).items() if alias and alias != name}
        self.merged = False

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
        keep_sorted = [a.evaluated_name for a in aliases] == sorted(a.evaluated_name for a in aliases)
        separator = next((a.comma for a in aliases[:-1] if isinstance(a.comma, cst.Comma)), None)
        if separator is None and updated_node.lpar is not None:  # one name per line, as after "("
            separator = cst.Comma(whitespace_after=updated_node.lpar.whitespace_after)
        separator = separator or cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        last_comma = aliases[-1].comma
        new = [cst.ImportAlias(name=cst.Name(name), asname=cst.AsName(cst.Name(self.aliases[name]))
                               if name in self.aliases else None) for name in missing]
        merged = sorted(aliases + new, key=lambda a: a.evaluated_name) if keep_sorted else aliases + new
        fixed = [alias.with_changes(comma=alias.comma if alias in aliases[:-1] else separator) for alias in merged]
        fixed[-1] = fixed[-1].with_changes(comma=last_comma)
        if len(fixed) > 1 and updated_node.lpar is None and isinstance(last_comma, cst.Comma):
            fixed[-1] = fixed[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated_node.with_changes(names=fixed)

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        if self.merged or not self.names:
            return updated_node
        items = [ImportItem(self.import_module, name, self.aliases.get(name)) for name in sorted(self.names)]
        module = AddImportsVisitor(self.context, items).transform_module(updated_node)
        body = list(module.body)
        for index in range(1, len(body)):
            if self._is_new_import(body[index]) and m.matches(body[index - 1], _DOCSTRING) \
                    and not body[index].leading_lines:  # a blank line after the docstring, as isort puts it
                body[index] = body[index].with_changes(leading_lines=[cst.EmptyLine()])
                return module.with_changes(body=body)
        return module

    def _is_new_import(self, statement: cst.BaseStatement) -> bool:
        return m.matches(statement, m.SimpleStatementLine(body=[m.ImportFrom(module=m.MatchIfTrue(
            lambda module: module is not None and dotted(module) == self.import_module))]))


_DOCSTRING = m.SimpleStatementLine(body=[m.Expr(m.SimpleString() | m.ConcatenatedString())])
