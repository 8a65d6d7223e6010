"""Inputs of a verification program: the access paths left free, how the programs bind them, and
what kind of value each one is, read off how the code uses it (never off the recognizer)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import libcst as cst
import libcst.matchers as m
from libcst.metadata import MetadataWrapper, ParentNodeProvider

from mtp_migrate.cst_utils import code, literal_int, string_value
from mtp_migrate.flow.names import TENSOR_IN_PLACE, TENSOR_READ_ONLY

# Attribute names that read a tensor rather than an object's field: a path stops before them.
TENSOR_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "T", "mT", "is_cuda", "requires_grad", "grad", "data",
                     "layout", "is_floating_point", "dim", "size", "numel", "item", "tolist"}
# Method names that only a tensor (among the values slots can take) has.
TENSOR_METHODS = TENSOR_READ_ONLY | TENSOR_IN_PLACE
SLOT_PREFIX = "mtp_slot_"


@dataclass
class Slot:
    """One input of both programs: ``path`` as written, passed as parameter ``param``."""

    param: str
    path: str
    kind: str  # "tensor", "scalar", "dtype", "device", "sized" (a collection whose length is read)
    rank: int | None = None  # for tensors: the rank the code implies (exactly, or at least)
    rank_is_exact: bool = False
    hint: str = ""  # the path's last name: orders candidate values, never restricts them
    weights: bool = False  # passed as it is (cast, cut) as the utility's weights: also tried as [B, S, 1]


class Paths(cst.CSTVisitor):
    """Find each maximal access path rooted at a free name (``batch["labels"]``, ``self.n_future``)."""

    METADATA_DEPENDENCIES = (ParentNodeProvider,)

    def __init__(self, roots: set[str], objects: set[str] = frozenset()):
        super().__init__()
        self.roots = roots
        self.objects = objects  # roots known to be objects: `self.device` is a field, not a tensor's device
        self.whole: set[str] = set()  # roots used as a whole somewhere
        self.fielded: set[str] = set()  # roots with a field that only an object has
        self.nodes: dict[str, list[cst.CSTNode]] = {}  # path -> its occurrences

    def _extends(self, node: cst.CSTNode, attributes_only: bool, root: str) -> cst.CSTNode | None:
        parent = self.get_metadata(ParentNodeProvider, node, None)
        if isinstance(parent, cst.Attribute) and parent.value is node:
            name = parent.attr.value
            tensorish = name in TENSOR_ATTRIBUTES or name in TENSOR_METHODS
            called = isinstance(self.get_metadata(ParentNodeProvider, parent, None), cst.Call)
            if not tensorish or (root in self.objects and attributes_only and not called):
                return parent
        if isinstance(parent, cst.Subscript) and parent.value is node and len(parent.slice) == 1 and \
                isinstance(parent.slice[0].slice, cst.Index) and string_value(parent.slice[0].slice.value) is not None:
            return parent
        return None

    def visit_Name(self, node: cst.Name) -> None:
        if node.value not in self.roots or not self._is_load(node):
            return
        path, attributes_only = node, True
        while (parent := self._extends(path, attributes_only, node.value)) is not None:
            attributes_only &= isinstance(parent, cst.Attribute)
            if not (isinstance(parent, cst.Attribute) and (
                    parent.attr.value in TENSOR_ATTRIBUTES or parent.attr.value in TENSOR_METHODS)):
                self.fielded.add(node.value)
            path = parent
        if path is node:
            self.whole.add(node.value)
        self.nodes.setdefault(code(path), []).append(path)

    def _is_load(self, node: cst.Name) -> bool:
        parent = self.get_metadata(ParentNodeProvider, node, None)
        if isinstance(parent, cst.Attribute) and parent.attr is node:
            return False
        if isinstance(parent, cst.Arg) and parent.keyword is node:
            return False
        return not isinstance(parent, cst.AssignTarget | cst.Param | cst.ImportAlias | cst.AsName | cst.FunctionDef)

    def mixed(self) -> set[str]:
        """Roots used both whole and through fields: no single value can stand for them."""
        return self.whole & {root_of(text) for text in self.nodes if root_of(text) != text}


class Replace(cst.CSTTransformer):
    """Each path occurrence becomes its slot's parameter (a view of the program for reading kinds off)."""

    def __init__(self, params: dict[int, str]):
        self.params = params

    def on_leave(self, original, updated):
        param = self.params.get(id(original))
        return cst.Name(param) if param is not None else updated


class Returns(cst.CSTTransformer):
    """A ``return`` of the program's own body reports the outputs and the returned value."""

    def __init__(self):
        self.depth = 0  # nested functions and lambdas keep their own returns

    def visit_FunctionDef(self, node) -> None:
        self.depth += 1

    def leave_FunctionDef(self, original, updated):
        self.depth -= 1
        return updated

    def leave_Return(self, original, updated):
        if self.depth > 1:
            return updated
        value = updated.value if updated.value is not None else cst.Name("None")
        if isinstance(value, cst.Tuple) and not value.lpar:
            value = value.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
        call = cst.parse_expression("_mtp_outputs(locals(), 0)")
        return updated.with_changes(value=call.with_changes(args=[call.args[0], cst.Arg(value)]))


def prologue(slots: dict[str, Slot]) -> list[cst.BaseStatement]:
    """Bind every free root before the program runs: ``batch = {"labels": slot, ...}``, ``n = slot``.

    Binding (rather than replacing each read) keeps Python's semantics when the program
    rebinds a root later.
    """
    trees: dict[str, dict] = {}
    for path, slot in slots.items():
        steps = re.findall(r"\.([A-Za-z_][A-Za-z_0-9]*)|\[(.+?)\](?=\.|\[|$)", path[len(root_of(path)):])
        node = trees.setdefault(root_of(path), {})
        for attribute, key in steps:
            node = node.setdefault(("attr", attribute) if attribute else ("item", key), {})
        node[None] = slot.param
    return [cst.parse_statement(f"{root} = {_construct(tree)}\n") for root, tree in sorted(trees.items())]


def _construct(tree: dict) -> str:
    if None in tree:
        return tree[None]
    attrs = ", ".join(f"{name!r}: {_construct(child)}" for (kind, name), child in tree.items() if kind == "attr")
    items = ", ".join(f"{key}: {_construct(child)}" for (kind, key), child in tree.items() if kind == "item")
    return f"_mtp_box({{{attrs}}}, {{{items}}})"


_PASS_THROUGH = {"float", "double", "half", "bfloat16", "long", "int", "bool", "to", "type_as", "detach", "contiguous"}
_TENSOR_ARGUMENTS = ("logits", "labels", "attention_mask", "weights")


def weight_paths(program: cst.Module, module_imports, utility: dict[str, str]) -> set[str]:
    """Slot parameters the rewrite passes, as they are (cast, cut), as the utility's ``weights`` and
    as no other tensor argument.

    Weights may be a reward head's ``[B, S, 1]`` output, which the utility reads as ``[B, S]``;
    a loop may read it too, so such a slot is also tried with that shape (an attention mask
    passed as the weights too is a mask, which comes ``[B, S]``).
    """
    locals_ = set()
    for statement in module_imports:
        node = statement.body[0]
        if isinstance(node, cst.ImportFrom) and node.module is not None and code(node.module) in utility and \
                not isinstance(node.names, cst.ImportStar):
            locals_ |= {alias.asname.name.value if alias.asname else alias.evaluated_name for alias in node.names}
    aliases = {a.targets[0].target.value: a.value for a in m.findall(program, m.Assign(targets=[m.AssignTarget(m.Name())]))}
    found: dict[str, set[str]] = {}  # slot parameter -> the arguments it is passed as
    for call in m.findall(program, m.Call(func=m.Name())):
        if call.func.value not in locals_:
            continue
        for position, arg in enumerate(call.args):
            name = arg.keyword.value if arg.keyword else (_TENSOR_ARGUMENTS[position] if position < 4 else None)
            if name not in _TENSOR_ARGUMENTS:
                continue
            value, depth = arg.value, 0
            while depth < 8:
                depth += 1
                if isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute) and \
                        value.func.attr.value in _PASS_THROUGH:
                    value = value.func.value
                elif isinstance(value, cst.Subscript):
                    value = value.value  # `x[:, :seq_len]`: the loop's own cut
                elif isinstance(value, cst.Name) and value.value in aliases:
                    value = aliases[value.value]
                else:
                    break
            if isinstance(value, cst.Name) and value.value.startswith(SLOT_PREFIX):
                found.setdefault(value.value, set()).add(name)
    return {param for param, arguments in found.items() if arguments == {"weights"}}


def root_of(path: str) -> str:
    return re.match(r"[A-Za-z_][A-Za-z_0-9]*", path).group(0)


def hint(path: str) -> str:
    return re.findall(r"[A-Za-z_][A-Za-z_0-9]*", path)[-1].lower()


def read_kinds(module: cst.Module, slots: dict[str, Slot], priors: dict[str, str] | None = None) -> None:
    """Set each slot's kind and rank from how the program uses it (and names bound to it).

    ``priors`` (path -> kind) come from what the code declares: annotations and defaults. A
    keyword (``device=``, ``dtype=``) outweighs them; ``.to(x)`` alone is a dtype unless the
    declaration or the name says device (a device input is tried as ``cpu``)."""
    wrapper = MetadataWrapper(module, unsafe_skip_copy=True)
    parents = wrapper.resolve(ParentNodeProvider)
    by_param = {slot.param: slot for slot in slots.values()}
    aliases: dict[str, str] = {}  # local name -> slot param, for `x = slot` and `x = slot.float()`
    for assign in m.findall(module, m.Assign(targets=[m.AssignTarget(m.Name())])):
        value = assign.value
        while isinstance(value, cst.Call) and isinstance(value.func, cst.Attribute) and \
                value.func.attr.value in TENSOR_METHODS - {"sum", "mean", "item", "size", "dim", "numel"}:
            value = value.func.value
        if isinstance(value, cst.Name) and value.value in by_param:
            aliases[assign.targets[0].target.value] = value.value
    evidence: dict[str, dict] = {p: {"tensor": 0, "rank": 0, "exact": None, "dtype": 0, "device": 0, "scalar": 0,
                                     "to": 0, "sized": 0} for p in by_param}
    for name in m.findall(module, m.Name()):
        param = name.value if name.value in by_param else aliases.get(name.value)
        if param is None:
            continue
        _observe(name, parents, evidence[param])
    for param, seen in evidence.items():
        slot = by_param[param]
        prior = (priors or {}).get(slot.path)
        if seen["tensor"] or (prior == "tensor" and not (seen["device"] or seen["dtype"])):
            slot.kind = "tensor"
            slot.rank = seen["exact"] or (seen["rank"] or None)
            slot.rank_is_exact = bool(seen["exact"])
        elif seen["device"] or (prior == "device" and not seen["dtype"]):
            slot.kind = "device"
        elif seen["dtype"] or prior == "dtype":
            slot.kind = "dtype"
        elif seen["to"]:
            slot.kind = "device" if "device" in slot.hint else "dtype"
        elif seen["sized"] and not seen["scalar"]:
            slot.kind = "sized"
        else:
            slot.kind = "scalar"


def _observe(node: cst.Name, parents, seen: dict) -> None:
    parent = parents.get(node)
    if isinstance(parent, cst.Attribute) and parent.value is node:
        attribute = parent.attr.value
        grand = parents.get(parent)
        called = isinstance(grand, cst.Call) and grand.func is parent
        if attribute in ("type", "index") and not called:
            seen["device"] += 1  # `device.type == "cuda"`: a tensor's `type` is a method
        elif attribute == "is_floating_point" and not called:
            seen["dtype"] += 1  # a dtype's property, where a tensor's is a method
        elif attribute in TENSOR_ATTRIBUTES or attribute in TENSOR_METHODS:
            seen["tensor"] += 1
        if attribute == "shape":
            if isinstance(grand, cst.Subscript) and len(grand.slice) == 1 and isinstance(grand.slice[0].slice,
                                                                                         cst.Index):
                axis = literal_int(grand.slice[0].slice.value)
                if axis is not None:
                    seen["rank"] = max(seen["rank"], axis + 1 if axis >= 0 else -axis)
            assign = parents.get(grand) if isinstance(grand, cst.AssignTarget) else None
            if isinstance(grand, cst.Assign) or isinstance(assign, cst.Assign):
                target = (grand if isinstance(grand, cst.Assign) else assign).targets[0].target
                if isinstance(target, cst.Tuple) and not any(isinstance(e, cst.StarredElement)
                                                             for e in target.elements):
                    seen["exact"] = len(target.elements)
        return
    if isinstance(parent, cst.Subscript) and parent.value is node:
        seen["tensor"] += 1
        count = sum(1 for e in parent.slice if not m.matches(e.slice, m.Index(value=m.Ellipsis())))
        if any(m.matches(e.slice, m.Index(value=m.Ellipsis())) for e in parent.slice):
            count += 1
            grand = parents.get(parent)
            if isinstance(grand, cst.Subscript) and grand.value is parent:
                # `w[..., 0][:, k:]`: what the first subscript leaves must take the second's elements
                dropped = sum(1 for e in parent.slice if isinstance(e.slice, cst.Index) and not m.matches(
                    e.slice, m.Index(value=m.Ellipsis())))
                count = max(count, dropped + len(grand.slice))
        seen["rank"] = max(seen["rank"], count)
        return
    if isinstance(parent, cst.Arg) and parent.value is node:
        if m.matches(parents.get(parent), m.Call(func=m.Name("len"), args=[m.Arg()])):
            seen["sized"] += 1  # `len(model.heads)`: a collection, only its length read
        elif parent.keyword is not None and parent.keyword.value == "dtype":
            seen["dtype"] += 1
        elif parent.keyword is not None and parent.keyword.value == "device":
            seen["device"] += 1
        call = parents.get(parent)
        if isinstance(call, cst.Call) and m.matches(call.func, m.Attribute(attr=m.Name("to"))) and \
                parent.keyword is None:
            seen["to"] += 1  # a dtype or a device
        if isinstance(call, cst.Call) and m.matches(call.func, m.Attribute(attr=m.Name("type_as"))):
            seen["tensor"] += 1
        return
    if isinstance(parent, cst.BinaryOperation):
        seen["scalar"] += 1
