"""Replace inline MTP cross-entropy loops with a call to ``compute_mtp_ce_loss``.

This is the entry point: it follows ``plan()`` for every site (a rewrite, a `del` in a
rho1-style loop, or a skip with its reason), asks the verifier it was given to confirm
each edited site (``mtp-migrate`` always gives one; dropping a refused site re-plans
the file), then runs ``RemoveDeadCodeCommand`` and ``AddUtilityImportCommand`` in that
order. ``python -m libcst.tool codemod rewrite_mtp_loop.RewriteMTPLoopCommand`` runs the
same transform without a verifier.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import libcst as cst
from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand

from mtp_migrate.commands.add_utility_import import AddUtilityImportCommand
from mtp_migrate.commands.remove_dead_code import RemoveDeadCodeCommand
from mtp_migrate.config import DEFAULT_LINE_LENGTH, DEFAULT_RHO1, DEFAULT_UTILITY_MODULE, RHO1_MODES
from mtp_migrate.flow.dataflow import FlowIndex
from mtp_migrate.flow.names import binds
from mtp_migrate.import_order import FirstParty, insert
from mtp_migrate.mtp_loop.emit import reads_torch, removed_statements
from mtp_migrate.mtp_loop.plan import (
    Decision,
    UtilityImport,
    edit,
    needed_functions,
    plan,
    unmark,
    utility_import,
)
from mtp_migrate.mtp_loop.spec import Action, SiteReport
from mtp_migrate.refusals import Refusal

# (original module, the module to write with its sites marked, decisions, utility import)
#   -> {line: None if verified, else the refusal}
Verifier = Callable[[cst.Module, cst.Module, list[Decision], UtilityImport], dict[int, Refusal | None]]


class RewriteMTPLoopCommand(VisitorBasedCodemodCommand):
    DESCRIPTION = (
        "Rewrite the inline per-head MTP cross-entropy loop into compute_mtp_ce_loss(...), "
        "insert `del` in rho1-style loops, remove what became dead and add the import."
    )
    REPORT_KEY = "mtp_migrate.sites"  # context.scratch: the SiteReport of every site, in line order

    @staticmethod
    def add_args(arg_parser: argparse.ArgumentParser) -> None:
        arg_parser.add_argument("--rho1", choices=RHO1_MODES, default=DEFAULT_RHO1,
                                help="rho1-style loops: insert del (default), rewrite them, or skip")
        arg_parser.add_argument("--utility-module", default=DEFAULT_UTILITY_MODULE, dest="utility_module")
        arg_parser.add_argument("--line-length", type=int, default=DEFAULT_LINE_LENGTH, dest="line_length")

    def __init__(self, context: CodemodContext, rho1: str = DEFAULT_RHO1,
                 utility_module: str = DEFAULT_UTILITY_MODULE, verifier: Verifier | None = None,
                 utility_problem: Refusal | None = None, line_length: int = DEFAULT_LINE_LENGTH,
                 first_party: FirstParty | None = None):
        super().__init__(context)
        self.line_length = line_length
        self.first_party = first_party
        self.rho1 = rho1
        self.utility_module = utility_module
        self.verifier = verifier
        self.utility_problem = utility_problem

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        decisions = plan(tree, rho1=self.rho1, utility_module=self.utility_module,
                         utility_problem=self.utility_problem, line_length=self.line_length)
        utility = utility_import(tree, self.utility_module)
        verified: set[int] = set()
        while True:
            # The verifier sees the final text (cleanup included), the sites marked by comments.
            written = self.cleanup(edit(tree, decisions, mark=self.verifier is not None), decisions, utility)
            if self.verifier is None or not any(d.action is not Action.SKIPPED for d in decisions):
                break
            results = self.verifier(tree, written, decisions, utility)
            refused = {line: refusal for line, refusal in results.items() if refusal is not None}
            verified = {line for line, refusal in results.items() if refusal is None}
            if not refused:
                break
            decisions = [d.skipped(refused[d.line]) if d.line in refused else d for d in decisions]
        self.context.scratch[self.REPORT_KEY] = [
            SiteReport(d.line, d.action, d.refusal, d.line in verified) for d in decisions]
        return unmark(written) if self.verifier is not None else written

    def cleanup(self, edited: cst.Module, decisions: list[Decision], utility: UtilityImport) -> cst.Module:
        """Remove what the rewrites made dead, then import the utility."""
        needed = needed_functions(decisions)
        if not needed:
            return edited
        index = FlowIndex()
        freed = set()
        for decision in decisions:
            if decision.action is Action.REWRITTEN:
                freed |= set().union(*(index.reads(s) for s in removed_statements(decision.site)))
        edited = RemoveDeadCodeCommand(self.context, names=freed).transform_module(edited)
        missing = needed - utility.existing
        if missing:
            aliases = {name: utility.names[name] for name in missing}
            edited = AddUtilityImportCommand(self.context, missing, self.utility_module, aliases, self.line_length,
                                             self.first_party).transform_module(edited)
        if reads_torch(decisions) and not any("torch" in binds(s) for s in edited.body):
            # A cast to the loop's dtype reads `torch` where the module imported only `F`.
            edited = insert(edited, cst.parse_statement("import torch\n"), self.first_party or (lambda module: False))
        return edited
