"""Insert ``del`` for the tensor temporaries at the end of rho1-style head loops."""

from __future__ import annotations

import argparse

import libcst as cst
from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand

from codemods.commands._scratch import report
from codemods.mtp_loop import find_sites
from codemods.mtp_loop.emit import action_for, del_statement


class InsertMTPDelCommand(VisitorBasedCodemodCommand):
    DESCRIPTION = (
        "Add `del` of the loop's tensor temporaries at the end of rho1-style MTP head loops "
        "(only names bound on every path and dead after the body)."
    )

    @staticmethod
    def add_args(arg_parser: argparse.ArgumentParser) -> None:
        arg_parser.add_argument("--rho1", choices=["del", "rewrite", "skip"], default="del")

    def __init__(self, context: CodemodContext, rho1: str = "del", report_sites: bool = True):
        super().__init__(context)
        self.rho1 = rho1
        self.report_sites = report_sites
        self.planned: dict[int, tuple[str, ...]] = {}

    def visit_Module(self, node: cst.Module) -> None:
        for site in find_sites(node):
            if not site.rho1_style:
                continue
            action, reason = action_for(site, self.rho1)
            if action == "del_inserted":
                self.planned[id(site.loop)] = site.temporaries
            if self.report_sites:
                report(self.context, site.line, action, reason)

    def leave_For(self, original_node: cst.For, updated_node: cst.For) -> cst.For:
        names = self.planned.get(id(original_node))
        if not names:
            return updated_node
        body = updated_node.body
        return updated_node.with_changes(body=body.with_changes(body=[*body.body, del_statement(names)]))
