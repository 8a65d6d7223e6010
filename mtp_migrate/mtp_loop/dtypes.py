"""The dtypes a loop's results take, by torch's type promotion, and the cast that gives a call's
output the same one.

A ``DType`` is a torch dtype the code names (``torch.float32``, the dtype of ``.float()``) or
one read at run time (``model_dtype``, ``weights.dtype``). A product or a ratio of tensors
takes the promotion of their dtypes, which ``Promotion`` keeps in a canonical form: the named
floating dtypes folded into one, the run-time ones as written (named integer and bool
dtypes never raise a floating one). The utility returns ``promote(logits.dtype, float32)``:
fp32 for 16- and 32-bit logits, fp64 for fp64 ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FLOAT16, BFLOAT16, FLOAT32, FLOAT64 = "torch.float16", "torch.bfloat16", "torch.float32", "torch.float64"
BOOL = "torch.bool"
# Every spelling of a torch dtype, by its canonical name.
CANONICAL = {
    "torch.float": FLOAT32, "torch.float32": FLOAT32, "torch.double": FLOAT64, "torch.float64": FLOAT64,
    "torch.half": FLOAT16, "torch.float16": FLOAT16, "torch.bfloat16": BFLOAT16, "torch.bool": BOOL,
    "torch.long": "torch.int64", "torch.int64": "torch.int64", "torch.int": "torch.int32",
    "torch.int32": "torch.int32", "torch.short": "torch.int16", "torch.int16": "torch.int16",
    "torch.uint8": "torch.uint8", "torch.int8": "torch.int8",
}
METHOD_DTYPES = {"float": FLOAT32, "double": FLOAT64, "half": FLOAT16, "bfloat16": BFLOAT16, "long": "torch.int64",
                 "int": "torch.int32", "short": "torch.int16", "byte": "torch.uint8", "char": "torch.int8", "bool": BOOL}
_CAST_METHODS = {FLOAT64: ".double()", FLOAT32: ".float()", FLOAT16: ".half()", BFLOAT16: ".bfloat16()"}


@dataclass(frozen=True)
class DType:
    """A dtype: ``named`` (canonical ``torch.*`` text) or read at run time from ``text``."""

    text: str
    named: bool = False
    floating: bool = False  # known to be a floating dtype (the logits')

    @staticmethod
    def of(name: str) -> DType:
        return DType(CANONICAL[name], True, CANONICAL[name] in _CAST_METHODS)

    @staticmethod
    def of_tensor(text: str, floating: bool = False) -> DType:
        return DType(f"{text}.dtype", floating=floating)


OF_CROSS_ENTROPY = DType("<the cross-entropy's dtype>")  # `.to(ce.dtype)`: resolved once the loop is read


def _fold(named: set[str]) -> str | None:
    """The promotion of named floating dtypes (fp16 with bf16 gives fp32)."""
    if FLOAT64 in named:
        return FLOAT64
    if FLOAT32 in named or {FLOAT16, BFLOAT16} <= named:
        return FLOAT32
    return next(iter(named), None)


@dataclass(frozen=True)
class Promotion:
    """``torch.promote_types`` over some dtypes: ``floor``, the named floating ones folded (or
    ``None``), and the run-time ones, sorted. Two equal ``Promotion``s are the same dtype on
    every input."""

    floor: str | None
    read: tuple[str, ...] = ()
    divided: bool = False  # then divided by an int: an integer dtype becomes torch's default float dtype

    @staticmethod
    def of(dtypes: Iterable[DType], divided: bool = False) -> Promotion:
        dtypes = list(dtypes)
        floor = _fold({d.text for d in dtypes if d.named and d.floating})
        if floor == FLOAT64:
            return Promotion(floor)  # nothing real promotes above fp64
        floating = floor is not None or any(d.floating for d in dtypes)
        return Promotion(floor, tuple(sorted({d.text for d in dtypes if not d.named})), divided and not floating)

    @staticmethod
    def utility(logits: DType) -> Promotion:
        """The dtype of the utility's losses for logits of dtype ``logits``."""
        return Promotion.of([logits, DType.of(FLOAT32)])

    def extends(self, call: Promotion) -> bool:
        """This is ``promote(call, other dtypes)``: the cast reads the output's own dtype."""
        return self != call and self.floor == call.floor == FLOAT32 and set(call.read) <= set(self.read)

    def cast(self, call: Promotion, output: str) -> str | None:
        """The method call that turns ``output``, of dtype ``call``, into this dtype, or ``None``
        where the two are the same dtype on every input."""
        if self == call:
            return None
        if not self.read:
            # No floating dtype at all: only an integer zero grown in place, where the loop raises.
            return _CAST_METHODS.get(self.floor)
        terms = [self.floor] if self.floor else []
        terms += self.read
        if self.extends(call):
            terms = [f"{output}.dtype", *(t for t in self.read if t not in call.read)]  # promote(call, rest)
        target = terms[0]
        for term in terms[1:]:
            target = f"torch.promote_types({target}, {term})"
        if self.divided and target != "torch.get_default_dtype()":  # that one is floating already
            target = f"{target} if {target}.is_floating_point else torch.get_default_dtype()"
        return f".to({target})"
