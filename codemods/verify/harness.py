"""Per-site verification: run the original site and its replacement on synthetic inputs.

``program`` turns a site and its replacement into two functions of the same free names:
the logits, labels, mask and weights expressions become parameters, and the shape
ints, constants and dtypes the site reads are bound from the enclosing code. Both run in
a subprocess (``python -m codemods.verify.harness``) with a timeout, so a hanging or
crashing snippet cannot take the tool down, on these cases:

- ``random`` (fp64), ``empty_head`` (the last head has no valid token), ``all_masked``:
  outputs and the gradients of logits and weights within 1e-9;
- ``bf16``: against an fp64 run on the same bf16 values, the replacement's error must be
  no worse than the original's.

A case on which the original raises is reported and does not count.
"""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from dataclasses import asdict, dataclass

import libcst as cst

from codemods.mtp_loop.recognize import _exposed_reads, code
from codemods.mtp_loop.spec import Site

PLACEHOLDERS = {"logits": "mtp_logits", "labels": "mtp_labels", "attention_mask": "mtp_mask", "weights": "mtp_weights"}
MODULES = {"F": "torch.nn.functional", "torch": "torch", "nn": "torch.nn", "math": "math"}
SHAPE = (3, 7, 3, 11)  # batch, seq, heads, vocab
TIMEOUT_S = 120


class Unverifiable(Exception):
    """The site reads a name the harness cannot bind; ``str(self)`` says which."""


@dataclass
class SiteProgram:
    original: str
    replacement: str
    outputs: list[str]
    # name -> ["tensor", role] | ["dim", role, axis] | ["int", value] | ["dtype"] | ["module", m] | ["from", m, name]
    bindings: dict[str, list]
    per_head_weights: bool
    line: int


class _Substitute(cst.CSTTransformer):
    """Replace the site's tensor expressions by placeholder names."""

    def __init__(self, expressions: dict[str, str]):
        self.expressions = expressions
        self.labels: set[int] = set()  # keyword and attribute names: not expressions

    def visit_Arg(self, node: cst.Arg) -> None:
        if node.keyword is not None:
            self.labels.add(id(node.keyword))

    def visit_Attribute(self, node: cst.Attribute) -> None:
        self.labels.add(id(node.attr))

    def on_leave(self, original_node, updated_node):
        if isinstance(original_node, cst.BaseExpression) and id(original_node) not in self.labels:
            name = self.expressions.get(code(original_node))
            if name is not None:
                return cst.Name(name)
        return updated_node


def _function(name: str, statements, parameters, outputs) -> str:
    returned = ", ".join(f'"{output}": {output}' for output in outputs)
    body = [*statements, cst.parse_statement(f"return {{{returned}}}\n")]
    function = cst.FunctionDef(
        name=cst.Name(name),
        params=cst.Parameters(params=[cst.Param(cst.Name(p)) for p in parameters]),
        body=cst.IndentedBlock(body=body),
    )
    return cst.Module(body=[function]).code


def program(site: Site, replacement_statements, imports: dict[str, str]) -> SiteProgram:
    """The two functions and their bindings; raises ``Unverifiable`` for an unknown free name.

    ``imports`` maps a name the replacement calls to the module it comes from.
    """
    spec = site.spec
    expressions = {}
    for role, node in (("logits", spec.logits), ("labels", spec.labels), ("attention_mask", spec.attention_mask),
                       ("weights", spec.weights)):
        if node is None:
            continue
        if isinstance(node, cst.Call) and _is_detach(node):
            node = node.func.value
        expressions[code(node)] = PLACEHOLDERS[role]
    substitute = _Substitute(expressions)
    original = [s.visit(substitute) for s in site.body[site.start:site.stop]]
    replacement = [s.visit(substitute) for s in replacement_statements]
    outputs = [o for o in (spec.weighted_output, spec.unweighted_output, spec.head0_output) if o]
    free = sorted((_exposed_reads(original, set()) | _exposed_reads(replacement, set()))
                  - set(PLACEHOLDERS.values()) - set(dir(builtins)))
    function_facts, module_facts = site.facts
    bindings: dict[str, list] = {p: ["tensor", role] for role, p in PLACEHOLDERS.items() if p in expressions.values()}
    for name in free:
        dim = function_facts.dim_of(name) or module_facts.dim_of(name)
        constant = function_facts.constant(name)
        if constant is None:
            constant = module_facts.constant(name)
        if name in imports:
            bindings[name] = ["from", imports[name], name]
        elif name in MODULES:
            bindings[name] = ["module", MODULES[name]]
        elif dim:  # shapes agree across the site's tensors: B and S as the labels', heads and V as the logits'
            default = "labels" if dim[1] in (0, 1, -2) else "logits"
            role = next((r for r, p in PLACEHOLDERS.items() if p == expressions.get(dim[0])), default)
            bindings[name] = ["dim", role, dim[1]]
        elif constant is not None:
            bindings[name] = ["int", constant]
        elif name in function_facts.dtypes or name in module_facts.dtypes:
            bindings[name] = ["dtype"]
        else:
            raise Unverifiable(f"cannot bind `{name}`")
    parameters = list(bindings)
    return SiteProgram(
        original=_function("original", original, parameters, outputs),
        replacement=_function("replacement", replacement, parameters, outputs),
        outputs=outputs, bindings=bindings,
        per_head_weights=spec.per_head_weights,
        line=site.line,
    )


def _is_detach(node) -> bool:
    return isinstance(node.func, cst.Attribute) and node.func.attr.value == "detach" and not node.args


def verify_programs(programs: list[SiteProgram], timeout: float = TIMEOUT_S) -> list[dict]:
    """Run the programs in one subprocess; one ``{"line", "ok", "reason", "cases"}`` per program."""
    if not programs:
        return []
    payload = json.dumps([asdict(p) for p in programs])
    try:
        # -P: the target tree may have its own weighted_mtp package; the numbers use ours.
        done = subprocess.run([sys.executable, "-P", "-m", "codemods.verify.worker"], input=payload, text=True,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"line": p.line, "ok": False, "reason": f"verification timed out after {timeout:.0f}s", "cases": {}}
                for p in programs]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"line": p.line, "ok": False, "reason": f"verifier crashed: {last}", "cases": {}} for p in programs]
    return json.loads(done.stdout)
