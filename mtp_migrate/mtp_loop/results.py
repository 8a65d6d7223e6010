"""What a site binds beyond the call's values: the dtype of each result, and where the loop's
Python zero survives.

A sum that starts as a tensor zero and grows in place (``+=``) keeps that zero's dtype; any
other sum takes the promotion of what it adds (``0.0 + r`` is ``r``'s dtype). A Python zero
is replaced by a tensor only when some head's guard fires, so where none does the loop still
binds the number: the rewrite reads that off the utility's head count (``heads_with_tokens``
for a mask sum, ``heads_with_weight`` for a weight sum).
"""

from __future__ import annotations

import libcst as cst

from mtp_migrate.config import Count
from mtp_migrate.cst_utils import code, literal_int, literal_number
from mtp_migrate.mtp_loop.dtypes import CANONICAL, DType, Promotion
from mtp_migrate.mtp_loop.spec import Average, Result
from mtp_migrate.mtp_loop.symbolic import Accumulation, Head0Metric, Outer
from mtp_migrate.refusals import Code, Refusal

DEFAULT_DTYPE = DType("torch.get_default_dtype()")


def zero_dtypes(value: cst.BaseExpression, qualified) -> tuple[DType, ...] | None:
    """The dtype of a zero initialisation (``torch.tensor(0.0, dtype=...)``, ``x.new_zeros(())``...), or
    ``None`` for a Python number."""
    if literal_number(value) is not None or isinstance(value, cst.List):  # `sum([])` is the number 0
        return None
    dtype = next((a.value for a in value.args if a.keyword is not None and a.keyword.value == "dtype"), None)
    if dtype is not None:
        names = qualified(dtype)
        if len(names) == 1 and next(iter(names)) in CANONICAL:
            return (DType.of(next(iter(names))),)
        return (DType(Outer(dtype, code(dtype)).atom),)
    if isinstance(value.func, cst.Attribute) and value.func.attr.value in ("new_zeros", "new_tensor"):
        return (DType.of_tensor(Outer(value.func.value, code(value.func.value)).atom),)
    if qualified(value.func) == {"torch.tensor"} and literal_int(value.args[0].value) is not None:
        return (DType.of("torch.int64"),)  # torch.tensor(0)
    return (DEFAULT_DTYPE,)


def accumulator_result(zero: cst.BaseExpression, accumulation: Accumulation, average: Average, added: list[DType],
                       count: Count, qualified) -> Result:
    """The ``Result`` of an accumulator averaged over heads by ``average``: it adds ratios of dtypes ``added``."""
    initial = zero_dtypes(zero, qualified)
    if initial is None:
        return Result(Promotion.of(added), "0.0", count)  # the average of an untouched 0 is 0.0
    in_place = isinstance(accumulation.node, cst.AugAssign)
    return Result(Promotion.of(initial if in_place else [*initial, *added], divided=not average.in_place))


def head0_result(metric: Head0Metric, zero: cst.BaseExpression, assigned: list[DType], zero_one_mask: bool,
                 qualified) -> Result:
    """The ``Result`` of the head-0 metric: its zero default, or a ratio of dtypes ``assigned`` when head 1
    has tokens. ``zero_one_mask``: head 1 has none exactly when no head has (the mask is 0/1)."""
    initial = zero_dtypes(zero, qualified)
    if initial is None:
        if metric.item and isinstance(literal_number(zero), float):
            return Result()  # a Python float either way
        if not zero_one_mask:
            raise Refusal(Code.HEAD0_METRIC, f"the head-0 metric `{metric.name}` stays `{code(zero)}` when head 1 "
                                             "has no tokens, which the call's head counts tell only for a 0/1 mask")
        return Result(None if metric.item else Promotion.of(assigned), code(zero), "heads_with_tokens")
    if metric.item or Promotion.of(initial) != Promotion.of(assigned):
        raise Refusal(Code.HEAD0_METRIC, f"the head-0 metric `{metric.name}` has another type or dtype when head 1 "
                                         "has no tokens than when it has")
    return Result(Promotion.of(assigned))
