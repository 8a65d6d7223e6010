"""The single decision per site that every command follows: rewrite, insert `del`, or skip.

``plan`` decides; ``edit`` applies the decisions to the site blocks only (the import and
the dead-code cleanup are the commands' business), and says where each edited site now
lives, so the verifier can run exactly what will be written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import libcst as cst
import libcst.matchers as m

from mtp_migrate.config import DEFAULT_LINE_LENGTH, DEFAULT_UTILITY_MODULE, UTILITY_NAMES
from mtp_migrate.cst_utils import code
from mtp_migrate.flow.names import binds, bound_name, target_names
from mtp_migrate.mtp_loop.emit import del_statement, function_name, replacement
from mtp_migrate.mtp_loop.find import Analysis, find_sites
from mtp_migrate.mtp_loop.site import Site
from mtp_migrate.mtp_loop.spec import Action
from mtp_migrate.refusals import Code, Refusal


@dataclass(frozen=True)
class UtilityImport:
    """How the module will refer to the utility: ``{function: local name}``, and whether it must import it."""

    module: str
    names: dict
    existing: frozenset  # functions the module already imports from ``module``

    def alias(self, function: str) -> str | None:
        local = self.names[function]
        return None if local == function else local


@dataclass(frozen=True)
class Decision:
    site: Site
    action: Action
    refusal: Refusal | None = None
    statements: tuple[cst.BaseStatement, ...] = ()  # REWRITTEN: the new block[start:stop]; DEL: (the new loop,)

    @property
    def line(self) -> int:
        return self.site.line

    def skipped(self, refusal: Refusal) -> Decision:
        return replace(self, action=Action.SKIPPED, refusal=refusal, statements=())


def utility_import(module: cst.Module, utility_module: str = DEFAULT_UTILITY_MODULE) -> UtilityImport:
    """Reuse an existing import of the utility; otherwise import it under a name nothing else binds."""
    existing = {}
    for statement in module.body:
        if m.matches(statement, m.SimpleStatementLine(body=[m.ImportFrom()])) and \
                _imports_from(statement.body[0], utility_module):
            for alias in statement.body[0].names:
                if alias.evaluated_name in UTILITY_NAMES:
                    existing[alias.evaluated_name] = bound_name(alias)
    bound = _bound_anywhere(module, utility_module)
    names = {}
    for function in UTILITY_NAMES:
        if function in existing and existing[function] not in bound:
            names[function] = existing[function]
            continue
        candidates = [function, f"{function}_utility", *(f"{function}_utility_{i}" for i in range(2, 100))]
        names[function] = next(c for c in candidates if c not in bound)
    return UtilityImport(utility_module, names, frozenset(f for f in existing if names[f] == existing[f]))


def _imports_from(node: cst.ImportFrom, utility_module: str) -> bool:
    return not node.relative and node.module is not None and code(node.module) == utility_module and \
        not isinstance(node.names, cst.ImportStar)


@lru_cache(maxsize=8)  # asked by the plan and by the command of the same module; modules hash by identity
def _bound_anywhere(module: cst.Module, utility_module: str) -> frozenset[str]:
    """Names bound anywhere in the module (any scope), except by a module-level import of the utility."""
    utility_imports = {id(s.body[0]) for s in module.body if m.matches(s, m.SimpleStatementLine(body=[m.ImportFrom()]))
                       and _imports_from(s.body[0], utility_module)}
    names = set()
    for node in m.findall(module, m.FunctionDef() | m.ClassDef() | m.Assign() | m.AnnAssign() | m.AugAssign()
                          | m.For() | m.With() | m.NamedExpr() | m.Import() | m.ImportFrom() | m.Param()
                          | m.ExceptHandler() | m.Global() | m.Nonlocal() | m.CompFor()):
        if isinstance(node, cst.Param):
            names.add(node.name.value)
        elif isinstance(node, cst.FunctionDef | cst.ClassDef):
            names.add(node.name.value)
        elif isinstance(node, cst.Global | cst.Nonlocal):
            names |= {item.name.value for item in node.names}
        elif isinstance(node, cst.For | cst.CompFor):
            names |= target_names(node.target)
        elif isinstance(node, cst.ImportFrom) and id(node) in utility_imports:
            names |= {bound_name(a) for a in node.names if a.evaluated_name not in UTILITY_NAMES}
        elif isinstance(node, cst.ImportFrom) and isinstance(node.names, cst.ImportStar):
            continue  # our import is added after it, so ours wins
        else:
            names |= binds(node)
    return frozenset(names)


def action_for(site: Site, rho1: str) -> tuple[Action, Refusal | None]:
    """What a site gets under a ``--rho1`` mode, before verification."""
    if site.rho1_style and rho1 == "skip":
        return Action.SKIPPED, Refusal(Code.RHO1_SKIPPED, "rho1-style loop (--rho1 skip)")
    if site.rho1_style and rho1 == "del":
        if site.temporaries:
            return Action.DEL_INSERTED, None
        return Action.SKIPPED, Refusal(Code.RHO1_NOTHING_TO_DELETE, "rho1-style loop with no temporaries left to "
                                                                     "delete")
    if site.spec is not None:
        return Action.REWRITTEN, None
    return Action.SKIPPED, site.refusal


def plan(module: cst.Module, *, rho1: str = "del", utility_module: str = DEFAULT_UTILITY_MODULE,
         utility_problem: Refusal | None = None, analysis: Analysis | None = None,
         line_length: int = DEFAULT_LINE_LENGTH) -> list[Decision]:
    """One decision per site of ``module``, with the statements each rewrite or `del` will write."""
    sites = find_sites(module, analysis)
    if not sites:
        return []
    names = utility_import(module, utility_module)
    taken = _bound_anywhere(module, utility_module)
    decisions = []
    for site in sites:
        action, refusal = action_for(site, rho1)
        if action is Action.REWRITTEN and utility_problem is not None:
            action, refusal = Action.SKIPPED, utility_problem
        statements: tuple = ()
        if action is Action.REWRITTEN:
            statements = tuple(replacement(site, names.names, taken, line_length))
        elif action is Action.DEL_INSERTED:
            loop = site.loop
            body = loop.body
            inner = site.indent + (body.indent if body.indent is not None else "    ")
            statements = (loop.with_changes(body=body.with_changes(
                body=[*body.body, del_statement(site.temporaries, inner, line_length)])),)
        decisions.append(Decision(site, action, refusal, statements))
    return decisions


def needed_functions(decisions: list[Decision]) -> set[str]:
    return {function_name(d.site.spec) for d in decisions if d.action is Action.REWRITTEN}


MARKER = "# mtp-migrate: site "  # marks an edited site's statements until verification is done


def marker(line: int) -> cst.EmptyLine:
    return cst.EmptyLine(comment=cst.Comment(f"{MARKER}{line}"))


class _Edit(cst.CSTTransformer):
    def __init__(self, decisions: list[Decision], mark: bool):
        self.mark = mark
        self.by_block: dict[int, list[Decision]] = {}
        for decision in decisions:
            if decision.action is not Action.SKIPPED:
                self.by_block.setdefault(decision.site.block_id, []).append(decision)

    def _marked(self, statements, line: int) -> list[cst.BaseStatement]:
        if not self.mark:
            return list(statements)
        return [s.with_changes(leading_lines=[*s.leading_lines, marker(line)]) for s in statements]

    def _block(self, original, updated):
        decisions = self.by_block.get(id(original))
        if not decisions:
            return updated
        body = list(updated.body)
        for decision in sorted(decisions, key=lambda d: d.site.start, reverse=True):
            site = decision.site
            if decision.action is Action.REWRITTEN:
                new = list(decision.statements)
            else:
                new = list(body[site.start:site.stop])
                new[site.loop_index - site.start] = decision.statements[0]
            body[site.start:site.stop] = self._marked(new, site.line)
        return updated.with_changes(body=body)

    def leave_IndentedBlock(self, original, updated):
        return self._block(original, updated)

    def leave_Module(self, original, updated):
        return self._block(original, updated)


def edit(module: cst.Module, decisions: list[Decision], mark: bool = False) -> cst.Module:
    """``module`` with every rewrite and `del` applied to its block; ``mark`` labels each edited
    site's statements with a comment, so the verifier finds them after the cleanup commands."""
    if all(d.action is Action.SKIPPED for d in decisions):
        return module
    return module.visit(_Edit(decisions, mark))


class _Unmark(cst.CSTTransformer):
    def on_leave(self, original, updated):
        lines = getattr(updated, "leading_lines", None)
        if lines and any(line.comment is not None and line.comment.value.startswith(MARKER) for line in lines):
            kept = [line for line in lines if not (line.comment is not None and line.comment.value.startswith(MARKER))]
            return updated.with_changes(leading_lines=kept)
        return updated


def unmark(module: cst.Module) -> cst.Module:
    return module.visit(_Unmark())


def marked_regions(module: cst.Module) -> dict[int, list[tuple[tuple, int]]]:
    """``{site line: [(block, index), ...]}`` of the statements ``edit(mark=True)`` labelled."""
    found: dict[int, list] = {}
    blocks = [module.body, *(node.body for node in m.findall(module, m.IndentedBlock()))]
    for block in blocks:
        block = tuple(block)
        for index, statement in enumerate(block):
            for line in getattr(statement, "leading_lines", ()):
                if line.comment is not None and line.comment.value.startswith(MARKER):
                    found.setdefault(int(line.comment.value[len(MARKER):]), []).append((block, index))
    return found
