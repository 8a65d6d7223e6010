"""LoopSpec -> statements: the utility call with its outputs, or a `del` of a loop's temporaries."""

from __future__ import annotations

import re

import libcst as cst
import libcst.matchers as m

from mtp_migrate.config import DEFAULT_LINE_LENGTH, OPTION_DEFAULTS, UNWEIGHTED, WEIGHTED
from mtp_migrate.cst_utils import code
from mtp_migrate.mtp_loop.site import Site
from mtp_migrate.mtp_loop.spec import (
    PER_HEAD_LOSS,
    UNWEIGHTED_LOSS,
    WEIGHTED_LOSS,
    Action,
    LoopSpec,
    Result,
    ScaledOutput,
)

_RESULT_NAMES = ("ce_losses", "mtp_ce_losses", "mtp_ce_loss_outputs")


def function_name(spec: LoopSpec) -> str:
    """The utility the call needs: the unweighted one when only that loss is kept, as a tensor."""
    result = spec.unweighted_result
    if spec.weighted_output is None and spec.head0_output is None and not spec.scaled_outputs and \
            result.count is None and not (
            result.dtype is not None and result.dtype.extends(spec.call_dtype)):
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


def _fit(text: str, start: int, base: int, line_length: int, depth: int = 0) -> str:
    """The expression ``text``, begun at column ``start`` in a block indented ``base``, wrapped as black
    does where it would pass ``line_length``: a call puts each argument on a line of its own, one level
    deeper. Continuation lines are relative: libcst prefixes them with the block's indentation."""
    if start + len(text) <= line_length:
        return text
    node = cst.parse_expression(text)
    if m.matches(node, m.BinaryOperation(left=m.Call(args=[m.Arg(value=m.GeneratorExp())]))):
        # `sum(term for k, loss in ...) / n`: the term and its `for` on lines of their own
        generator, inner = node.left.args[0].value, "    " * (depth + 1)
        return (f"{code(node.left.func)}(\n{inner}{code(generator.elt)}\n{inner}{code(generator.for_in).strip()}\n"
                f"{'    ' * depth}){code(node)[len(code(node.left)):]}")
    if not isinstance(node, cst.Call) or not node.args:
        return text
    inner = "    " * (depth + 1)
    lines = []
    for arg in node.args:
        keyword = f"{arg.keyword.value}=" if arg.keyword is not None else ""
        value = _fit(code(arg.value), base + len(inner) + len(keyword), base, line_length, depth + 1)
        lines.append(f"{inner}{keyword}{value}{',' if len(node.args) > 1 else ''}\n")
    return f"{code(node.func)}(\n{''.join(lines)}{'    ' * depth})"


def _fit_suffix(suffix: str, start: int, base: int, line_length: int) -> str:
    """A cast or subscript after a call's closing parenthesis (``.to(...)``), wrapped like ``_fit``."""
    return _fit(f"_{suffix}", start - 1, base, line_length).removeprefix("_") if suffix else suffix


def _call(spec: LoopSpec, function: str, local: str, prefix: str, suffix: str, indent: str,
          line_length: int) -> cst.BaseStatement:
    args = _arguments(spec, function)
    one_line = f"{prefix}{local}({', '.join(f'{k}={v}' for k, v in args)}){suffix}"
    if len(indent) + len(one_line) <= line_length:
        return cst.parse_statement(one_line + "\n")
    lines = "".join(f"    {k}={v},\n" for k, v in args)
    suffix = _fit_suffix(suffix, len(indent) + 1, len(indent), line_length)
    return cst.parse_statement(f"{prefix}{local}(\n{lines}){suffix}\n")


def _value(result: Result, call_dtype, losses: str, access: str, item: bool) -> str:
    """What the site binds to one output, read off ``losses`` (the call's result): the loss in the loop's
    dtype, or the loop's Python zero where the utility counts no head."""
    loss = f"{losses}{access}"
    if result.dtype is not None:
        loss += result.dtype.cast(call_dtype, loss) or ""
    if item:
        loss += ".item()"
    if result.count is not None:
        loss = f'{loss} if {losses}["{result.count}"] else {result.zero}'
    return loss


def _scaled_value(scaled: ScaledOutput, call_dtype, losses: str) -> str:
    """``sum(scale_k * per_head_k for k, per_head_k in ...) / n``: the loop's products, in its order."""
    per_head = f'{losses}["{PER_HEAD_LOSS}"]'
    loss = next(name for name in ("head_loss", "head_ce_loss", "per_head_loss")
                if not re.search(rf"\b{name}\b", scaled.template))
    term = scaled.template.format(loss + (scaled.dtype.cast(call_dtype, loss) or ""))
    start = f", {scaled.first}" if scaled.first else ""
    divisor = scaled.divisor or f"len({per_head})"
    total = f"sum({term} for {scaled.variable}, {loss} in enumerate({per_head}{start})) / {divisor}"
    return f'{total} if {losses}["heads_with_tokens"] else 0.0'  # the loop's 0.0 where no head added


def _assignment(target: str, value: str, indent: str, line_length: int) -> cst.BaseStatement:
    """``target = value``, its conditional wrapped one part per line where it would pass ``line_length``."""
    one_line = f"{target} = {value}"
    if len(indent) + len(one_line) <= line_length:
        return cst.parse_statement(one_line + "\n")
    if " if " not in value:
        return cst.parse_statement(f"{target} = {_fit(value, len(indent) + len(target) + 3, len(indent), line_length)}\n")
    loss, rest = value.split(" if ", 1)
    condition, zero = rest.rsplit(" else ", 1)
    loss = _fit(loss, len(indent) + 4, len(indent), line_length, depth=1)
    return cst.parse_statement(f"{target} = (\n    {loss}\n    if {condition}\n    else {zero}\n)\n")


def replacement(site: Site, utility_names: dict[str, str], taken: set[str],
                line_length: int = DEFAULT_LINE_LENGTH) -> list[cst.BaseStatement]:
    """The statements that replace ``block[site.start:site.stop]``: kept statements, the call, its outputs."""
    spec = site.spec
    function = function_name(spec)
    local = utility_names[function]
    outputs = [(spec.weighted_output, f'["{WEIGHTED_LOSS}"]', spec.weighted_result, False),
               (spec.unweighted_output, f'["{UNWEIGHTED_LOSS}"]', spec.unweighted_result, False),
               (spec.head0_output, f'["{PER_HEAD_LOSS}"][0]', spec.head0_result, spec.head0_item)]
    outputs = [output for output in outputs if output[0] is not None]
    if function == UNWEIGHTED:
        ((target, _, result, _),) = outputs
        cast = (result.dtype.cast(spec.call_dtype, "") if result.dtype is not None else None) or ""
        statements = [_call(spec, function, local, f"{target} = ", cast, site.indent, line_length)]
    else:
        result = next(n for n in _RESULT_NAMES if n not in taken)
        values = [(target, _value(r, spec.call_dtype, result, access, item)) for target, access, r, item in outputs]
        values += [(scaled.output, _scaled_value(scaled, spec.call_dtype, result)) for scaled in spec.scaled_outputs]
        if len(values) == 1 and values[0][1].startswith(f"{result}[") and values[0][1].count(result) == 1:
            target, value = values[0]  # one output, read once: straight off the call
            statements = [_call(spec, function, local, f"{target} = ", value.removeprefix(result), site.indent,
                                line_length)]
        else:
            statements = [_call(spec, function, local, f"{result} = ", "", site.indent, line_length)]
            statements += [_assignment(target, value, site.indent, line_length) for target, value in values]
    inline = {}
    for average in site.averages:
        if average.inline is not None:
            inline[average.index] = average.inline
    new = [*site.kept, *statements, *(inline[i] for i in sorted(inline))]
    # The comment above the site stays above what replaces it.
    new[0] = new[0].with_changes(leading_lines=[*site.block[site.start].leading_lines, *new[0].leading_lines])
    return new


def reads_torch(decisions) -> bool:
    """Whether a rewrite's statements read the name ``torch`` beyond what the loop already read."""
    for decision in decisions:
        if decision.action is Action.REWRITTEN:
            kept = {id(s) for s in decision.site.kept}
            if any(m.findall(s, m.Name("torch")) for s in decision.statements if id(s) not in kept):
                return True
    return False


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
