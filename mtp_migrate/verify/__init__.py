"""Numerical verification of edited sites, independent of the recognizer (see ``docs/verification.md``).

``program`` builds the two programs of a site from the code alone; ``worker`` runs them
on a domain of inputs chosen to contradict assumptions (it imports torch, lazily, the
first time a site is verified in a process).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict

import libcst as cst
import libcst.matchers as m

from mtp_migrate.cache import Cache, digest, file_digest
from mtp_migrate.flow.dataflow import FlowIndex, Point, locate
from mtp_migrate.mtp_loop.plan import Decision, UtilityImport, marked_regions
from mtp_migrate.mtp_loop.spec import Action
from mtp_migrate.refusals import Code, Refusal
from mtp_migrate.verify.program import SiteProgram, build


def _scopes(module: cst.Module) -> Iterable[cst.FunctionDef | cst.Module]:
    yield module
    yield from m.findall(module, m.FunctionDef())


def _point(scopes: list, statement: cst.BaseStatement) -> Point | None:
    for scope in scopes:
        point = locate(scope, statement)
        if point is not None:
            return point
    return None


def programs(original: cst.Module, written: cst.Module, decisions: list[Decision],
             utility_file: str, utility_module: str) -> tuple[list[SiteProgram], dict[int, Refusal]]:
    """The two programs of every edited site, or the reason one cannot be built (by line).

    ``written`` is the module as it will be written, its sites marked by ``edit(mark=True)``.
    """
    old_index, new_index = FlowIndex(), FlowIndex()
    regions = marked_regions(written)
    scopes = list(_scopes(written))
    built, refused = [], {}
    for decision in decisions:
        if decision.action is Action.SKIPPED:
            continue
        site = decision.site
        old = locate(site.scope, site.block[site.start])
        old = Point(old.scope, old.levels, site.stop)
        marked = regions.get(site.line, [])
        new = _point(scopes, marked[0][0][marked[0][1]]) if marked else None
        if new is None or len({id(block) for block, _ in marked}) != 1:
            refused[site.line] = Refusal(Code.VERIFIER_FAILED, "cannot find the edited site in the written file")
            continue
        stop = new.start + len(marked)
        try:
            built.append(build((old, old_index, original), (Point(new.scope, new.levels, stop), new_index, written),
                               site.line, utility={utility_module: utility_file}))
        except Refusal as refusal:
            refused[site.line] = refusal
    return built, refused


def verify_sites(original: cst.Module, written: cst.Module, decisions: list[Decision], utility: UtilityImport,
                 utility_file: str, cache: Cache | None = None, evidence: dict | None = None
                 ) -> dict[int, Refusal | None]:
    """``{line: None}`` for a site verified equivalent, ``{line: refusal}`` otherwise.

    ``evidence``, when given, receives ``{line: (program, compared cases)}`` of every verified site.
    """
    built, results = programs(original, written, decisions, utility_file, utility.module)
    results = dict(results)
    for program in built:
        key = _key(program) if cache is not None else None
        verdict = cache.get("sites", key) if cache is not None else None
        if verdict is None:
            from mtp_migrate.verify.worker import verify  # torch: only when a site is not cached

            verdict = asdict(verify(program))
            if cache is not None:
                cache.put("sites", key, verdict)
        results[program.line] = None if verdict["ok"] else Refusal(
            _code(verdict["code"]), verdict["reason"].split(": ", 1)[-1])
        if verdict["ok"] and evidence is not None:
            evidence[program.line] = (program, verdict["compared"])
    return results


def _key(program: SiteProgram) -> str:
    fields = asdict(program)
    fields.pop("line")  # moving a site does not change its verdict
    fields["utility"] = {module: file_digest(path, os.stat(path).st_mtime) for module, path in program.utility.items()}
    return digest("site", fields)


def _code(code: str) -> Code:
    return next(c for c in Code if c.code == code)


__all__ = ["SiteProgram", "build", "programs", "verify_sites"]
