"""Turn a recognised site into code: the utility call, or `del` for its temporaries."""

from __future__ import annotations

import libcst as cst

from codemods.mtp_loop.recognize import code, reads
from codemods.mtp_loop.spec import LoopSpec, Site

WEIGHTED = "compute_mtp_ce_loss"
UNWEIGHTED = "compute_mtp_ce_loss_unweighted"
_ONE_LINE_LIMIT = 100
_RESULT_NAMES = ("ce_losses", "mtp_ce_losses", "mtp_ce_loss_outputs")


def function_name(spec: LoopSpec) -> str:
    """The utility the call needs: the unweighted one when only that loss is kept."""
    if spec.weighted_output is None and spec.head0_output is None:
        return UNWEIGHTED
    return WEIGHTED


def _arguments(spec: LoopSpec, name: str) -> list[tuple[str, str]]:
    args = [("logits", code(spec.logits)), ("labels", code(spec.labels)),
            ("attention_mask", code(spec.attention_mask))]
    if spec.weights is not None and name == WEIGHTED:
        args.append(("weights", code(spec.weights)))
    if spec.n_future is not None:
        args.append(("n_future", code(spec.n_future)))
    if spec.ignore_index is not None:
        args.append(("ignore_index", code(spec.ignore_index)))
    if spec.weights is not None and spec.weight_alignment != "target":
        args.append(("weight_alignment", f'"{spec.weight_alignment}"'))
    if not spec.mask_ignored_labels:
        args.append(("mask_ignored_labels", "False"))
    if spec.normalize != "mask":
        args.append(("normalize", f'"{spec.normalize}"'))
    if spec.head_average != "all" and spec.weighted_output is not None:
        args.append(("head_average", f'"{spec.head_average}"'))
    return args


def _call(spec: LoopSpec, name: str, prefix: str, suffix: str, indent: str) -> cst.BaseStatement:
    args = _arguments(spec, name)
    one_line = f"{prefix}{name}({', '.join(f'{k}={v}' for k, v in args)}){suffix}"
    if len(indent) + len(one_line) <= _ONE_LINE_LIMIT:
        return cst.parse_statement(one_line + "\n")
    # Continuation lines are relative: libcst prefixes them with the block's indentation.
    lines = "".join(f"    {k}={v},\n" for k, v in args)
    return cst.parse_statement(f"{prefix}{name}(\n{lines}){suffix}\n")


def replacement(site: Site, taken_names: set[str]) -> list[cst.BaseStatement]:
    """The statements that replace ``body[site.start:site.stop]``, kept statements first."""
    spec = site.spec
    name = function_name(spec)
    outputs = [(spec.weighted_output, '["weighted_ce_loss"]'), (spec.unweighted_output, '["unweighted_ce_loss"]'),
               (spec.head0_output, '["per_head_ce_loss"][0]' + (".item()" if spec.head0_item else ""))]
    outputs = [(target, access) for target, access in outputs if target is not None]
    if name == UNWEIGHTED:
        statements = [_call(spec, name, f"{spec.unweighted_output} = ", "", site.indent)]
    elif len(outputs) == 1:
        target, access = outputs[0]
        statements = [_call(spec, name, f"{target} = ", access, site.indent)]
    else:
        result = next(n for n in _RESULT_NAMES if n not in taken_names)
        statements = [_call(spec, name, f"{result} = ", "", site.indent)]
        statements += [cst.parse_statement(f"{target} = {result}{access}\n") for target, access in outputs]
    kept = [site.body[i] for i in range(site.start, site.loop_index) if i not in removed_indices(site)]
    new = kept + statements
    # The comment above the site stays above what replaces it.
    new[0] = new[0].with_changes(leading_lines=[*site.body[site.start].leading_lines, *new[0].leading_lines])
    return new


def removed_indices(site: Site) -> set[int]:
    """Indices into ``site.body`` that a rewrite removes: inits, the loop, head averages."""
    return {*site.init_indices, *range(site.loop_index, site.stop)}


def removed_reads(site: Site) -> set[str]:
    """Names the removed statements read: candidates for dead-code cleanup."""
    return set().union(*(reads(site.body[i]) for i in removed_indices(site)))


def del_statement(names: tuple[str, ...]) -> cst.SimpleStatementLine:
    return cst.parse_statement(f"del {', '.join(names)}\n")


def action_for(site: Site, rho1: str) -> tuple[str, str | None]:
    """``("rewritten" | "del_inserted" | "skipped", reason)`` for a site under a ``--rho1`` mode."""
    if site.rho1_style and rho1 == "skip":
        return "skipped", "rho1-style loop (--rho1 skip)"
    if site.rho1_style and rho1 == "del":
        if site.temporaries:
            return "del_inserted", None
        return "skipped", "rho1-style loop with no temporaries left to delete"
    if site.spec is not None:
        return "rewritten", None
    return "skipped", site.refusal
