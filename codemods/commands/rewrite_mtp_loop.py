"""Replace inline MTP cross-entropy loops with a call to ``compute_mtp_ce_loss``.

This is the entry point: after its own rewrite it runs, in this order,
``InsertMTPDelCommand`` (rho1-style loops, ``--rho1 del``), ``RemoveDeadCodeCommand``
and ``AddUtilityImportCommand``, so ``python -m libcst.tool codemod
rewrite_mtp_loop.RewriteMTPLoopCommand`` gives the same result as ``mtp-migrate``.
"""

from __future__ import annotations

import argparse

import libcst as cst
import libcst.matchers as m
from libcst.codemod import CodemodContext, VisitorBasedCodemodCommand

from codemods.commands._scratch import DEFAULT_UTILITY_MODULE, FREED_NAMES, report
from codemods.commands.add_utility_import import AddUtilityImportCommand
from codemods.commands.insert_mtp_del import InsertMTPDelCommand
from codemods.commands.remove_dead_code import RemoveDeadCodeCommand
from codemods.mtp_loop import find_sites
from codemods.mtp_loop.emit import UNWEIGHTED, WEIGHTED, action_for, function_name, removed_reads, replacement
from codemods.mtp_loop.recognize import reads

UTILITY_SELF = "a loop inside the loss utility itself"


class RewriteMTPLoopCommand(VisitorBasedCodemodCommand):
    DESCRIPTION = (
        "Rewrite the inline per-head MTP cross-entropy loop into compute_mtp_ce_loss(...), "
        "insert `del` in rho1-style loops, remove what became dead and add the import."
    )

    @staticmethod
    def add_args(arg_parser: argparse.ArgumentParser) -> None:
        arg_parser.add_argument("--rho1", choices=["del", "rewrite", "skip"], default="del",
                                help="rho1-style loops: insert del (default), rewrite them, or skip")
        arg_parser.add_argument("--utility-module", default=DEFAULT_UTILITY_MODULE, dest="utility_module")
        arg_parser.add_argument("--verify", action="store_true", help="verify each rewrite numerically first")

    def __init__(self, context: CodemodContext, rho1: str = "del", utility_module: str = DEFAULT_UTILITY_MODULE,
                 verify: bool = False):
        super().__init__(context)
        self.rho1 = rho1
        self.utility_module = utility_module
        self.verify = verify
        self.planned: dict[int, list] = {}  # block id -> [(site, replacement statements)]

    def transform_module_impl(self, tree: cst.Module) -> cst.Module:
        freed: set[str] = set()
        needed: set[str] = set()
        inserts_del = False
        replacements: dict[int, list] = {}
        planned = plan(tree, self.rho1)
        if any(action == "rewritten" for _, action, _ in planned):
            taken = reads(tree)
            # Built once: the statements verified are the statements written.
            replacements = {id(site): replacement(site, taken) for site, action, _ in planned if action == "rewritten"}
        verdicts = _verify(planned, replacements) if self.verify and replacements else {}
        for site, action, reason in planned:
            verdict = verdicts.get(site.line)
            if verdict is not None and not verdict["ok"]:
                action, reason = "skipped", f"not verified: {verdict['reason']}"
            report(self.context, site.line, action, reason, verified=bool(verdict and verdict["ok"]))
            if action == "rewritten":
                self.planned.setdefault(site.block_id, []).append((site, replacements[id(site)]))
                freed |= removed_reads(site)
                needed.add(function_name(site.spec))
            inserts_del |= action == "del_inserted"
        if not self.planned and not inserts_del:
            return tree
        tree = tree.visit(self)
        if inserts_del:
            tree = InsertMTPDelCommand(self.context, self.rho1, report_sites=False).transform_module(tree)
        if needed:
            self.context.scratch[FREED_NAMES] = freed
            tree = RemoveDeadCodeCommand(self.context).transform_module(tree)
            AddUtilityImportCommand.schedule(self.context, self.utility_module, needed)
            tree = AddUtilityImportCommand(self.context).transform_module(tree)
        return tree

    def _rewrite_block(self, original_node, updated_node):
        sites = self.planned.get(id(original_node))
        if not sites:
            return updated_node
        body = list(updated_node.body)
        for site, statements in sorted(sites, key=lambda pair: pair[0].start, reverse=True):
            body[site.start:site.stop] = statements
        return updated_node.with_changes(body=body)

    def leave_IndentedBlock(self, original_node, updated_node):
        return self._rewrite_block(original_node, updated_node)

    def leave_Module(self, original_node, updated_node):
        return self._rewrite_block(original_node, updated_node)


def plan(tree: cst.Module, rho1: str):
    """``(site, action, reason)`` for every site of ``tree``: what the transform will do."""
    refuse_all = UTILITY_SELF if _defines_utility(tree) else None
    return [(site, *action_for(site, rho1)) for site in find_sites(tree, refuse_all)]


def _verify(planned, replacements) -> dict[int, dict]:
    """Verdicts by line for the sites to rewrite; the numbers use the shipped utility."""
    from codemods.verify import program, verify_programs
    from codemods.verify.harness import Unverifiable

    imports = {name: DEFAULT_UTILITY_MODULE for name in (WEIGHTED, UNWEIGHTED)}
    programs, verdicts = [], {}
    for site, action, _ in planned:
        if action != "rewritten":
            continue
        try:
            programs.append(program(site, replacements[id(site)], imports))
        except Unverifiable as error:
            verdicts[site.line] = {"ok": False, "reason": str(error)}
    verdicts.update({verdict["line"]: verdict for verdict in verify_programs(programs)})
    return verdicts


def _defines_utility(tree: cst.Module) -> bool:
    return any(m.matches(s, m.FunctionDef(name=m.Name("compute_mtp_ce_loss"))) for s in tree.body)
