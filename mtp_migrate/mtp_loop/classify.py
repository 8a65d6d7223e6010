"""Accumulations -> ``LoopSpec``: which tensor is the mask, which the weights, which option
each ratio implies, or a refusal that names the reason.

Dimensions are resolved here, once the cross-entropy has said which tensors are the
logits and the labels: ``labels.shape[1]`` is the sequence length (the utility checks
that labels and logits agree), ``input_ids.shape[1]`` is not (nothing ties it to them).
"""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m

from mtp_migrate.config import Count, WeightAlignment
from mtp_migrate.cst_utils import code, literal_number
from mtp_migrate.mtp_loop.dtypes import FLOAT64, OF_CROSS_ENTROPY, DType, Promotion
from mtp_migrate.mtp_loop.evaluate import LoopEvaluator
from mtp_migrate.mtp_loop.results import accumulator_result, head0_result, zero_dtypes
from mtp_migrate.mtp_loop.spec import Average, LoopSpec, Result, ScaledOutput
from mtp_migrate.mtp_loop.symbolic import (
    LENGTH,
    B,
    CrossEntropy,
    Dim,
    Free,
    H,
    HeadScale,
    K,
    Lin,
    Ratio,
    S,
    Total,
    V,
    View,
)
from mtp_migrate.refusals import Code, Refusal

_AXES = {4: (B, S, H, V), 3: (B, S, None), 2: (B, S)}


@dataclass(frozen=True)
class Factor:
    """A resolved per-token factor: what it is, where it is aligned and how to write it whole."""

    view: View
    alignment: WeightAlignment
    per_head: bool
    valid: bool  # labels != ignore_index: the utility's mask_ignored_labels


class Resolver:
    """Maps ``Dim`` atoms to ``S``, ``B``, ``H``, ``V`` by the role of their tensor."""

    def __init__(self, ranks: dict[str, int], names: dict):
        self.ranks = ranks
        self.names = names  # Dim -> the name the loop read it through

    def __call__(self, lin: Lin) -> Lin:
        mapping = {}
        for atom in lin.atoms():
            if isinstance(atom, Dim):
                mapping[atom] = self._dimension(atom)
        return lin.substitute(mapping)

    def _dimension(self, dim: Dim):
        rank = self.ranks.get(dim.base)
        axis = dim.axis if dim.axis >= 0 else dim.axis + (rank or 0)
        resolved = _AXES.get(rank, ())[axis] if rank and 0 <= axis < rank else None
        if resolved is None:
            return Free(self.names.get(dim, f"{dim.base}.shape[{dim.axis}]"))
        return resolved


def _stop(lin: Lin | None) -> Lin:
    if lin is None:
        return Lin.of(S)
    if S not in lin.atoms() and all(c <= 0 for _, c in lin.terms) and lin.const <= 0 and lin != Lin():
        return lin + Lin.of(S)  # a negative index counts from the end
    return lin


class Classifier:
    def __init__(self, ev: LoopEvaluator):
        if ev.cross_entropy is None:
            raise Refusal(Code.REDUCTION, "no cross_entropy in the loop")
        self.ev = ev
        self.ce: CrossEntropy = ev.cross_entropy
        roles = [(self.ce.logits.base, 4), (self.ce.labels.base, 2)]
        for accumulation in ev.accumulations:
            if isinstance(accumulation.value, Ratio):
                roles += [(view.base, 3 if view.head is not None else 2) for view in self._views(accumulation.value)]
        ranks: dict[str, int] = {}
        for base, rank in roles:  # a tensor's aliases and casts have its shape
            for text in ev.facts.same_shape(base.node):
                ranks.setdefault(text, rank)
        self.resolve = Resolver(ranks, ev.dimension_names)
        self.truncate: Free | None = None
        self._check_cross_entropy()
        for guard in ev.length_guards:
            if not self._is_length(self.resolve(guard)):
                raise Refusal(Code.POSITIONS, "a `continue` condition other than an empty head (S - k <= 0)")

    @staticmethod
    def _views(ratio: Ratio) -> list[View]:
        return [f for total in (ratio.numerator, ratio.denominator) for f in total.factors if isinstance(f, View)]

    def _check_cross_entropy(self) -> None:
        logits, labels = self.ce.logits, self.ce.labels
        if logits.head is None or self.resolve(logits.head) != Lin.of(K, 1, -1):
            raise Refusal(Code.HEAD_INDEXING, f"cross_entropy's input is not head k-1 of `{logits.base.text}`")
        if self.resolve(logits.start) != Lin() or not self._is_length(self._length(logits)):
            raise Refusal(Code.POSITIONS, f"cross_entropy's input is not positions 0..S-k-1 of `{logits.base.text}`")
        if labels.head is not None or self.resolve(labels.start) != Lin.of(K) or \
                not self._is_length(self._length(labels)):
            raise Refusal(Code.POSITIONS, f"cross_entropy's target is not `{labels.base.text}` shifted by k")
        for check in (*logits.shape_checks, *labels.shape_checks):
            self._check_shape(check)

    def _is_length(self, lin: Lin) -> bool:
        """``S - k``, or ``T - k`` for one integer ``T`` the loop takes as the sequence length.

        With ``T`` (say ``seq_len`` taken from another batch), the call receives every
        tensor cut to ``[:, :T]``: where the loop runs at all, that is what it read.
        """
        if lin == LENGTH:
            return True
        free = [atom for atom in lin.atoms() if isinstance(atom, Free)]
        if len(free) == 1 and lin == Lin.of(free[0]) - Lin.of(K):
            if self.truncate not in (None, free[0]):
                raise Refusal(Code.SEQUENCE_LENGTH, f"two sequence lengths, `{self.truncate.text}` and "
                                                    f"`{free[0].text}`, neither provably the logits'")
            self.truncate = free[0]
            return True
        return False

    def render(self, view: View) -> str:
        """The whole tensor as the call receives it: cut to the loop's length, with the view's value operations."""
        text = self._cut(view)
        for op in view.ops:
            if op.kind == "fill":  # an argument needs no parentheses of its own
                condition = cst.parse_expression(self.render(op.condition)).with_changes(lpar=(), rpar=())
                text = f"{text}.masked_fill({code(condition)}, {op.operand})"
            elif op.kind != "precision":
                text = op.apply(text)
        return text

    def _cut(self, view: View) -> str:
        """The view's tensor, cut to ``[:, :T]`` where the loop reads it only up to ``T``: a length taken from
        another tensor (so the loop tolerates a longer one and the call must not see it), or ``truncate``."""
        text = view.base.atom
        if self.truncate is not None:
            return f"{text}[:, :{self.truncate.text}]"
        own = self.ev.facts.same_shape(view.base.node)
        for atom in sorted(view.stop.atoms() if view.stop is not None else (), key=repr):
            if isinstance(atom, Dim) and atom.base not in own and self.resolve(Lin.of(atom)) == Lin.of(S):
                return f"{text}[:, :{self.ev.dimension_names.get(atom, f'{atom.base}.shape[{atom.axis}]')}]"
        return text

    def logits(self) -> str:
        """The logits as the call receives them: cut like the rest, and in fp64 where the loop computes in fp64."""
        text = self._cut(self.ce.logits)
        if self.ce.gathered:  # gather takes an index smaller than its input: the loop reads logits where labels are
            labels = self.ce.labels.base.atom
            text = f"{text}[:{labels}.shape[0], :{labels}.shape[1]]"
        if self.computes_in_fp64:
            for op in self.ce.logits.ops:
                if op.dtypes is not None:
                    text = op.apply(text)
        return text

    @property
    def ce_dtypes(self) -> tuple[DType, ...]:
        logits = self.ce.logits
        casts = [op.dtypes for op in logits.ops if op.dtypes is not None]
        return casts[-1] if casts else (DType.of_tensor(logits.base.atom, floating=True),)

    @property
    def computes_in_fp64(self) -> bool:
        """The loop casts the logits to fp64 before the cross-entropy (``.double()``)."""
        return Promotion.of(self.ce_dtypes).floor == FLOAT64

    def dtypes(self, ratio: Ratio) -> list[DType]:
        """The dtypes whose promotion is the ratio's: the cross-entropy's and every factor's."""
        found = []
        for total in (ratio.numerator, ratio.denominator):
            for factor in total.factors:
                if isinstance(factor, CrossEntropy):
                    found += self.ce_dtypes
                elif any(op.dtypes for op in factor.ops):
                    found += factor.dtypes
                else:  # a tensor the loop does not cast: the dtypes its definition names, or its own
                    found += self.ev.facts.dtypes(factor.base.node) or factor.dtypes
        return [d for dtype in found for d in (self.ce_dtypes if dtype == OF_CROSS_ENTROPY else (dtype,))]

    def _length(self, view: View) -> Lin:
        return _stop(self.resolve(view.stop) if view.stop is not None else None) - self.resolve(view.start)

    def _check_shape(self, check) -> None:
        _, (rows, columns), text = check
        rows = None if rows is None else self.resolve(rows)
        columns = None if columns is None else self.resolve(columns)
        if (rows, columns) == (None, None) or rows not in (None, Lin.of(B)) or not (
                columns is None or self._is_length(columns)):
            raise Refusal(Code.LAYOUT, f"`{text}` is not [batch, S-k]: it regroups the tokens")

    def factor(self, view: View) -> Factor:
        if view.ellipsis:
            raise Refusal(Code.HEAD_INDEXING, f"`{view.base.text}[..., h, :]` indexes the axis before its last, "
                                              "which is the heads' only for the 4-D logits")
        if not self._is_length(self._length(view)):
            raise Refusal(Code.POSITIONS, f"the slice of `{view.base.text}` does not cover the S-k positions of head k")
        start = self.resolve(view.start)
        alignments: dict[Lin, WeightAlignment] = {Lin.of(K): "target", Lin.of(K, 1, -1): "previous", Lin(): "input"}
        alignment = alignments.get(start)
        if alignment is None:
            raise Refusal(Code.POSITIONS, f"`{view.base.text}` is aligned at an offset the utility has no option for")
        per_head = view.head is not None
        if per_head and (self.resolve(view.head) != Lin.of(K, 1, -1) or alignment != "input"):
            raise Refusal(Code.HEAD_INDEXING, f"per-head `{view.base.text}` must be `[:, :S-k, k-1]`")
        return Factor(view, alignment, per_head, self._is_valid(view, alignment))

    def _is_valid(self, view: View, alignment: WeightAlignment) -> bool:
        """``labels != ignore_index`` at the targets, as cross_entropy ignores them."""
        ops = [op for op in view.ops if op.kind != "precision"]
        # What the call receives may be the labels filled (`clamp_min(0)`, `masked_fill`): only that, compared,
        # is its mask.
        fills = [op for op in self.ce.labels.ops
                 if op.kind == "fill" or (op.kind == "value" and op.dtypes is None)]
        if view.base.text != self.ce.labels.base.text or alignment != "target" or ops[:len(fills)] != fills:
            return False
        ops = ops[len(fills):]
        if not ops or any(op.kind == "fill" for op in ops):
            return False
        compare, rest = ops[0], ops[1:]
        if compare.kind != "compare" or compare.operator != "!=" or not _same_constant(compare.operand,
                                                                                       self.ce.ignore_text):
            return False
        return all(op.kind in ("value", "bool") for op in rest)


def _same_constant(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return ast.literal_eval(a) == ast.literal_eval(b)
    except (ValueError, SyntaxError):
        return False


@dataclass
class _Ratio:
    name: str
    numerator: Counter  # factors besides the cross-entropy, without the label-validity factor
    denominator: Counter
    valid: bool  # the denominator masks ignored labels
    scale: HeadScale | None = None

    @property
    def plain(self) -> bool:
        return self.numerator == self.denominator


def _ratio(classifier: Classifier, name: str, ratio: Ratio, guard: Total | None) -> _Ratio:
    ce = classifier.ce
    numerator = list(ratio.numerator.factors)
    if numerator.count(ce) != 1 or ce in ratio.denominator.factors:
        raise Refusal(Code.REDUCTION, f"`{name}` is not a cross-entropy over a sum of mask values")
    numerator.remove(ce)
    if any(isinstance(f, CrossEntropy) for f in numerator):
        raise Refusal(Code.REDUCTION, f"`{name}` multiplies two cross-entropies")
    if guard is None or Counter(guard.factors) != Counter(ratio.denominator.factors):
        raise Refusal(Code.GUARD, f"`{name}` divides by a sum that is not guarded by `> 0` "
                                  "(the loop gives NaN or a value where the utility gives 0)")
    for check in (*ratio.numerator.shape_checks, *ratio.denominator.shape_checks):
        classifier._check_shape(check)
    num = [classifier.factor(f) for f in numerator]
    den = [classifier.factor(f) for f in ratio.denominator.factors]
    valid = any(f.valid for f in den)
    return _Ratio(name, Counter(f for f in num if not f.valid), Counter(f for f in den if not f.valid), valid,
                  ratio.scale)


def _expression(classifier: Classifier, factors: Counter, what: str) -> tuple[str, str, bool]:
    """``(product expression, alignment, per-head)`` of one group of factors."""
    items = sorted(factors.elements(), key=lambda f: classifier.render(f.view))
    alignments = {f.alignment for f in items}
    per_head = {f.per_head for f in items}
    if len(alignments) > 1 or len(per_head) > 1 or (True in per_head and len(items) > 1):
        raise Refusal(Code.MASK_AND_WEIGHTS, f"the {what} mixes tensors aligned differently")
    return " * ".join(classifier.render(f.view) for f in items), alignments.pop(), per_head.pop()


def classify(ev: LoopEvaluator, averages: list[Average], counters: set[str],
             inits: dict[str, cst.BaseExpression]) -> LoopSpec:
    """Classify the accumulated ratios into the utility's options, or refuse.

    ``inits`` holds the zero each accumulator and head-0 metric starts from."""
    classifier = Classifier(ev)
    if ev.zipped and not _all_heads(ev, classifier.resolve):
        raise Refusal(Code.LOOP_HEADER, f"`zip` pairs the heads with a range of `{code(ev.head_count)}`, not provably "
                                        "logits.shape[2]: where it is more, zip walks fewer heads than the call")
    by_name: dict[str, list] = {}
    for accumulation in ev.accumulations:
        if accumulation.name not in counters:
            by_name.setdefault(accumulation.name, []).append(accumulation)
    ratios = []
    for name, accumulations in by_name.items():
        if len(accumulations) != 1:
            raise Refusal(Code.ACCUMULATOR, f"`{name}` is accumulated more than once per head")
        (accumulation,) = accumulations
        ratios.append(_ratio(classifier, name, accumulation.value, accumulation.guard))
    if not ratios:
        raise Refusal(Code.REDUCTION, "the loop accumulates no per-head loss")
    if len({r.valid for r in ratios}) != 1:
        raise Refusal(Code.MASK_AND_WEIGHTS, "the ratios disagree on masking ignored labels")
    average = {a.accumulator: a for a in averages}
    for r in ratios:
        if r.name not in average:
            raise Refusal(Code.HEAD_AVERAGE, f"`{r.name}` is not averaged over the heads right after the loop")
    scaled = [r for r in ratios if r.scale is not None]
    plains = [r for r in ratios if r.plain and r.scale is None]
    weighted = [r for r in ratios if not r.plain and r.scale is None]
    if any(not (r.denominator <= r.numerator) for r in weighted):
        raise Refusal(Code.MASK_AND_WEIGHTS, "a ratio whose denominator has factors its numerator lacks")
    if len(weighted) > 1 or len(plains) > 2 or (weighted and len(plains) > 1):
        raise Refusal(Code.MASK_AND_WEIGHTS, "more than one weighted or unweighted accumulator")

    normalize, weights, mask, unweighted_ratio, weighted_ratio = "mask", Counter(), None, None, None
    if weighted:
        (weighted_ratio,) = weighted
        mask = weighted_ratio.denominator
        weights = weighted_ratio.numerator - mask
        if plains:
            (unweighted_ratio,) = plains
            if unweighted_ratio.denominator != mask:
                raise Refusal(Code.MASK_AND_WEIGHTS, "the weighted and unweighted losses use different masks")
    elif not plains:  # only scaled per-head means: their mask is the call's
        mask = scaled[0].denominator
    else:
        split = sorted(plains, key=lambda r: sum(r.denominator.values()))
        if len(split) == 2:
            unweighted_ratio, weighted_ratio = split
            mask = unweighted_ratio.denominator
            if not mask <= weighted_ratio.denominator or mask == weighted_ratio.denominator:
                raise Refusal(Code.MASK_AND_WEIGHTS, "two per-head means over masks the utility cannot relate")
            weights, normalize = weighted_ratio.denominator - mask, "weights"
        else:
            (only,) = split
            mask = Counter({f: n for f, n in only.denominator.items() if f.alignment == "target" and not f.per_head})
            weights = only.denominator - mask
            valid_average = average[only.name].divisor.kind == "valid"
            if weights or valid_average or ev.head0:
                weighted_ratio, normalize = only, "weights" if weights else "mask"
            else:
                unweighted_ratio = only
    for r in scaled:
        if by_name[r.name][0].where:
            raise Refusal(Code.GUARD, f"`{r.name}` adds a scaled `torch.where(...)` on every head")
        if not r.plain or r.denominator != mask:
            raise Refusal(Code.MASK_AND_WEIGHTS, f"`{r.name}` scales a per-head loss that is not the call's "
                                                 "per_head_ce_loss (an unweighted mean over the call's mask)")
        if average[r.name].divisor.kind != "heads":
            raise Refusal(Code.HEAD_AVERAGE, f"`{r.name}` is divided by `{average[r.name].divisor.text}`, not by "
                                             "the number of heads")
    if any(f.alignment != "target" or f.per_head for f in mask):
        raise Refusal(Code.MASK_AND_WEIGHTS, "the mask is not aligned with the targets (t + k)")
    valid = ratios[0].valid

    if mask:
        mask_text, _, _ = _expression(classifier, mask, "mask")
    elif valid:
        labels = classifier.ce.labels
        mask_text = f"{classifier.render(labels)} != {classifier.ce.ignore_text}"
    else:
        raise Refusal(Code.MASK_AND_WEIGHTS, "the loss has no mask the call could receive")
    weights_text, alignment, per_head = (None, "target", False)
    if weights:
        weights_text, alignment, per_head = _expression(classifier, weights, "weights")

    head_average = "all"
    for r in (weighted_ratio, unweighted_ratio):
        if r is None:
            continue
        divisor = average[r.name].divisor
        if divisor.kind == "valid":
            if r is not weighted_ratio:
                raise Refusal(Code.HEAD_AVERAGE, f"`{r.name}` is averaged over the valid heads only")
            _check_counter(ev, divisor.counter, r.name)
            head_average = "valid"
        elif divisor.kind != "heads":
            raise Refusal(Code.HEAD_AVERAGE, f"`{r.name}` is divided by `{divisor.text}`, not by the number of "
                                             "heads")

    head0_output, head0_item = None, False
    for metric in ev.head0:
        head0 = _ratio(classifier, metric.name, metric.ratio, metric.guard)
        if not head0.plain or head0.denominator != mask or head0.valid != valid or head0_output is not None:
            raise Refusal(Code.HEAD0_METRIC, f"the head-0 metric `{metric.name}` is not per_head_ce_loss[0]")
        if weighted_ratio is None:
            raise Refusal(Code.HEAD0_METRIC, f"the head-0 metric `{metric.name}` needs the weighted call")
        head0_output, head0_item = metric.name, metric.item

    ignore = None if _same_constant(classifier.ce.ignore_text, "-100") else classifier.ce.ignore_text
    logits_dtype = DType.of(FLOAT64) if classifier.computes_in_fp64 else classifier.ce_dtypes[0]
    counts: dict[str, Count] = {"weighted": "heads_with_weight" if normalize == "weights" else "heads_with_tokens",
              "unweighted": "heads_with_tokens"}
    results = {}
    for kind, r in (("weighted", weighted_ratio), ("unweighted", unweighted_ratio)):
        if r is not None:
            (accumulation,) = by_name[r.name]
            if accumulation.where and zero_dtypes(inits[r.name], ev.qualified) is None:
                raise Refusal(Code.GUARD, f"`{r.name}` adds `torch.where(...)` on every head, a tensor even where "
                                          "no head has tokens: start it at a tensor zero to migrate")
            results[kind] = accumulator_result(inits[r.name], accumulation, average[r.name],
                                               classifier.dtypes(accumulation.value), counts[kind], ev.qualified)
    scaled_outputs = tuple(_scaled_output(ev, r, inits[r.name], average[r.name],
                                          classifier.dtypes(by_name[r.name][0].value)) for r in scaled)
    if head0_output is not None:
        (metric,) = ev.head0
        results["head0"] = head0_result(metric, inits[metric.name], classifier.dtypes(metric.ratio),
                                        all(f.nonnegative for f in metric.ratio.denominator.factors), ev.qualified)
    return LoopSpec(
        logits=classifier.logits(), labels=classifier.render(classifier.ce.labels), attention_mask=mask_text,
        weights=weights_text,
        n_future=None if _all_heads(ev, classifier.resolve) else code(ev.head_count), ignore_index=ignore,
        weight_alignment=alignment, mask_ignored_labels=valid, normalize=normalize, head_average=head_average,
        weighted_output=average[weighted_ratio.name].output if weighted_ratio else None,
        unweighted_output=average[unweighted_ratio.name].output if unweighted_ratio else None,
        head0_output=head0_output, head0_item=head0_item, per_head_weights=per_head,
        call_dtype=Promotion.utility(logits_dtype), weighted_result=results.get("weighted", Result()),
        unweighted_result=results.get("unweighted", Result()), head0_result=results.get("head0", Result()),
        scaled_outputs=scaled_outputs,
    )


def _scaled_output(ev: LoopEvaluator, r: _Ratio, zero: cst.BaseExpression, average: Average,
                   dtypes: list[DType]) -> ScaledOutput:
    """How the call gives ``sum_k scale_k * ratio_k / n``: the loop's own product on each per-head loss."""
    if literal_number(zero) is None:
        raise Refusal(Code.ACCUMULATOR, f"`{r.name}` sums scaled per-head losses into a tensor zero, whose dtype "
                                        "the scale may promote: start it at 0.0")
    counted = m.matches(ev.head_count, m.Name() | m.Attribute()) and ev.count_name is None
    return ScaledOutput(average.output, r.scale.template, ev.loop_name, 1 - ev.head_offset,
                        Promotion.of(dtypes), code(ev.head_count) if counted else None)


def _check_counter(ev: LoopEvaluator, counter: str, weighted: str) -> None:
    increments = [a for a in ev.accumulations if a.name == counter]
    guards = [a.guard for a in ev.accumulations if a.name == weighted]
    if len(increments) != 1 or increments[0].value != 1 or increments[0].guard != guards[0]:
        raise Refusal(Code.HEAD_AVERAGE, f"`{counter}` does not count exactly the heads `{weighted}` accumulates")


def _all_heads(ev: LoopEvaluator, resolve) -> bool:
    """Whether the loop's head count is provably ``logits.shape[2]``."""
    fact = ev.facts.expression(ev.head_count, ev.facts.point)
    if fact is None:
        return False
    try:
        return resolve(fact) == Lin.of(H)
    except Refusal:
        return False

