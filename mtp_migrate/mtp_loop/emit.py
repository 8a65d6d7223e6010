"""LoopSpec -> statements: the utility call with its outputs, or a `del` of a loop's temporaries."""

from __future__ import annotations

import libcst as cst

from mtp_migrate.config import DEFAULT_LINE_LENGTH, OPTION_DEFAULTS, UNWEIGHTED, WEIGHTED
from mtp_migrate.mtp_loop.site import Site
from mtp_migrate.mtp_loop.spec import LoopSpec

_RESULT_NAMES = ("ce_losses", "mtp_ce_losses", "mtp_ce_loss_outputs")


def function_name(spec: LoopSpec) -> str:
    """The utility the call needs: the unweighted one when only that loss is kept."""
    if spec.weighted_output is None and spec.head0_output is None:
        return UNWEIGHTED
    return WEIGHTED


def _arguments(spec: LoopSpec, function: str) -> list[tuple[str, str]]:
    args = [("logits", spec.logits), ("labels", spec.labels), ("attention_mask", spec.attention_mask)]
    if spec.weights is not None and function == WEIGHTED:
        args.append(("weights", spec.weights))
    options = {"n_future": spec.n_future, "ignore_index": spec.ignore_index,
               "weight_alignment": spec.weight_alignment if spec.weights is not None else "target",
               "mask_ignored_labels": spec.mask_ignored_labels, "normalize": spec.normalize,
               "head_average": spec.head_average if spec.weighted_output is not None else "all"}
    for option, value in options.items():
        if value == OPTION_DEFAULTS[option] or value is None:
            continue
        args.append((option, value if option in ("n_future", "ignore_index") else repr(value).replace("'", '"')))
    return args


def _call(spec: LoopSpec, function: str, local: str, prefix: str, suffix: str, indent: str,
          line_length: int) -> cst.BaseStatement:
    args = _arguments(spec, function)
    one_line = f"{prefix}{local}({', '.join(f'{k}={v}' for k, v in args)}){suffix}"
    if len(indent) + len(one_line) <= line_length:
        return cst.parse_statement(one_line + "\n")
    # Continuation lines are relative: libcst prefixes them with the block's indentation.
    lines = "".join(f"    {k}={v},\n" for k, v in args)
    return cst.parse_statement(f"{prefix}{local}(\n{lines}){suffix}\n")


def replacement(site: Site, utility_names: dict[str, str], taken: set[str],
                line_length: int = DEFAULT_LINE_LENGTH) -> list[cst.BaseStatement]:
    """The statements that replace ``block[site.start:site.stop]``: kept statements, the call, its outputs."""
    spec = site.spec
    function = function_name(spec)
    local = utility_names[function]
    outputs = [(spec.weighted_output, '["weighted_ce_loss"]'), (spec.unweighted_output, '["unweighted_ce_loss"]'),
               (spec.head0_output, '["per_head_ce_loss"][0]' + (".item()" if spec.head0_item else ""))]
    outputs = [(target, access) for target, access in outputs if target is not None]
    if function == UNWEIGHTED:
        statements = [_call(spec, function, local, f"{spec.unweighted_output} = ", "", site.indent, line_length)]
    elif len(outputs) == 1:
        target, access = outputs[0]
        statements = [_call(spec, function, local, f"{target} = ", access, site.indent, line_length)]
    else:
        result = next(n for n in _RESULT_NAMES if n not in taken)
        statements = [_call(spec, function, local, f"{result} = ", "", site.indent, line_length)]
        statements += [cst.parse_statement(f"{target} = {result}{access}\n") for target, access in outputs]
    inline = {}
    for average in site.averages:
        if average.inline is not None:
            inline[average.index] = average.inline
    new = [*site.kept, *statements, *(inline[i] for i in sorted(inline))]
    # The comment above the site stays above what replaces it.
    new[0] = new[0].with_changes(leading_lines=[*site.block[site.start].leading_lines, *new[0].leading_lines])
    return new


def removed_statements(site: Site) -> list[cst.BaseStatement]:
    """The statements a rewrite removes: initialisations, the loop, head averages."""
    kept = {id(s) for s in site.kept}
    return [s for s in site.statements if id(s) not in kept]


def del_statement(names: tuple[str, ...], indent: str, line_length: int = DEFAULT_LINE_LENGTH
                  ) -> cst.SimpleStatementLine:
    """``del a, b, c``, wrapped in parentheses one name per line when it would pass ``line_length``."""
    one_line = f"del {', '.join(names)}\n"
    if len(indent) + len(one_line) - 1 <= line_length:
        return cst.parse_statement(one_line)
    lines = "".join(f"    {name},\n" for name in names)
    return cst.parse_statement(f"del (\n{lines})\n")
