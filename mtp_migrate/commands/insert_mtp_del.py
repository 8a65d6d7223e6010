"""Insert ``del`` for the tensor temporaries at the end of rho1-style head loops."""

from __future__ import annotations

import argparse

import libcst as cst
from libcst.codemod import VisitorBasedCodemodCommand

from mtp_migrate.config import DEFAULT_LINE_LENGTH
from mtp_migrate.mtp_loop.plan import edit, plan
from mtp_migrate.mtp_loop.spec import Action


class InsertMTPDelCommand(VisitorBasedCodemodCommand):
    DESCRIPTION = (
        "Add `del` of the loop's tensor temporaries at the end of rho1-style MTP head loops "
        "(only names bound on every path and dead after the body)."
    )

    @staticmethod
    def add_args(arg_parser: argparse.ArgumentParser) -> None:
        arg_parser.add_argument("--line-length", type=int, default=DEFAULT_LINE_LENGTH, dest="line_length")

    def __init__(self, context, line_length: int = DEFAULT_LINE_LENGTH):
        super().__init__(context)
        self.line_length = line_length

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        decisions = plan(tree, rho1="del", line_length=self.line_length)
        return edit(tree, [d for d in decisions if d.action is Action.DEL_INSERTED])
