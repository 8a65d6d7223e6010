"""The verified program is the code that really runs (issue 19): what wraps the site, what
rebinds its names, what changes what it reads, and what happens after it.

Each trap is verified with the recognizer's own checks bypassed (the rewrite is forced
through where the recognizer refuses it): the verifier alone must refuse it, with the code
that names the cause. The same traps are in the adversarial suite, end to end.
"""

from dataclasses import replace
from pathlib import Path

import libcst as cst
import pytest
from libcst.codemod import CodemodContext

from mtp_migrate.commands.rewrite_mtp_loop import RewriteMTPLoopCommand
from mtp_migrate.cst_utils import code
from mtp_migrate.flow.dataflow import FlowIndex, Level, Point
from mtp_migrate.mtp_loop.plan import edit, plan, utility_import
from mtp_migrate.mtp_loop.spec import Action
from mtp_migrate.refusals import Code, Refusal
from mtp_migrate.vendoring import SHIPPED_UTILITY
from mtp_migrate.verify import verify_sites
from mtp_migrate.verify.program import build
from mtp_migrate.verify.worker import verify

TRAPS = Path(__file__).parents[1] / "fixtures" / "adversarial" / "unsound"
CANONICAL = '''import torch.nn.functional as F


def mtp_loss(logits, labels, attention_mask):
    _, seq_len, n_future, vocab_size = logits.shape
    total = 0.0
    for k in range(1, n_future + 1):
        valid_len = seq_len - k
        if valid_len <= 0:
            continue
        ce = F.cross_entropy(logits[:, :valid_len, k - 1].reshape(-1, vocab_size), labels[:, k:].reshape(-1),
                             reduction="none")
        mask = attention_mask[:, k:].reshape(-1).float() * (labels[:, k:].reshape(-1) != -100).float()
        denom = mask.sum()
        if denom > 0:
            total += (ce * mask).sum() / denom
    return total / n_future
'''


def forced_verdict(source: str):
    """The verifier's verdict on the site of ``source``, rewritten as the canonical loop would be."""
    module = cst.parse_module(source)
    (decision,) = plan(module, rho1="rewrite")
    if decision.action is not Action.REWRITTEN:
        (good,) = plan(cst.parse_module(CANONICAL), rho1="rewrite")
        decision = replace(good, site=replace(decision.site, spec=good.site.spec))
    written = RewriteMTPLoopCommand(CodemodContext()).cleanup(edit(module, [decision], mark=True), [decision],
                                                               utility_import(module))
    (verdict,) = verify_sites(module, written, [decision], utility_import(module), str(SHIPPED_UTILITY)).values()
    return verdict


def judged(original: str, rewritten: str):
    """The verifier alone on two versions of a one-function module: what follows their common first
    statements is the site and its replacement (no recognizer involved at all)."""
    regions = []
    old, new = cst.parse_module(original), cst.parse_module(rewritten)
    bodies = [next(s for s in module.body if isinstance(s, cst.FunctionDef)) for module in (old, new)]
    start = 0
    while code(bodies[0].body.body[start]) == code(bodies[1].body.body[start]):
        start += 1
    for module, function in zip((old, new), bodies, strict=True):
        block = tuple(function.body.body)
        regions.append((Point(function, (Level(block, start, function, "body"),), len(block)), FlowIndex(), module))
    utility = {"weighted_mtp.utils": str(SHIPPED_UTILITY)}
    try:
        verdict = verify(build(regions[0], regions[1], 1, utility=utility))
    except Refusal as refusal:
        return refusal
    return None if verdict.ok else verdict.reason


def trap(name: str) -> str:
    return (TRAPS / f"{name}.py").read_text()


@pytest.mark.parametrize(("name", "code", "words"), [
    ("with_block_label_smoothing", Code.CONTEXT, "`with label_smoothing()`"),
    ("decorator_label_smoothing", Code.CONTEXT, "`@smoothed`"),
    ("decorator_rebinds_globals", Code.CONTEXT, "`@rebound_globals`"),
    ("except_index_error_fallback", Code.REWRITE_RAISES, "ValueError"),
    ("globals_rebinds_F", Code.DYNAMIC_NAMES, "globals()"),
    ("exec_imports_F", Code.DYNAMIC_NAMES, "exec("),
    ("star_import_rebinds_utility", Code.DYNAMIC_NAMES, "from legacy_losses import *"),
    ("getframe_reads_temporaries", Code.DYNAMIC_NAMES, "f_locals"),
    ("logits_zeroed_after_loss", Code.REWRITE_RAISES, "modified by an inplace operation"),
])
def test_the_verifier_alone_refuses_the_trap(name, code, words):
    verdict = forced_verdict(trap(name))
    assert verdict is not None, f"{name} verified"
    assert verdict.code is code and words in str(verdict), verdict


def _unweighted_call(mask: str) -> str:
    """The rewrite of an unweighted loop whose sum starts as ``0.0`` (a float where no head has tokens)."""
    return (f"    ce_losses = compute_mtp_ce_loss(logits=logits, labels=labels, attention_mask={mask})\n"
            "    return ce_losses['unweighted_ce_loss'] if ce_losses['heads_with_tokens'] else 0.0\n")


def test_a_mask_changed_in_place_before_the_loop_is_in_the_program():
    """``mask[:, 4] = 1.0`` after ``mask = attention_mask.float()``: passing the mask as it was made
    differs; passing ``mask`` is equivalent (the recognizer itself now writes that)."""
    original = trap("mask_changed_in_place_before_loop")
    head, _, _ = original.partition("    total = 0.0\n")
    head = head.replace("import torch.nn.functional as F\n", "import torch.nn.functional as F\n\n"
                        "from weighted_mtp.utils import compute_mtp_ce_loss\n")
    reason = judged(original, head + _unweighted_call("attention_mask.float()"))
    assert reason is not None and str(reason).startswith("MTP201") and "differs" in str(reason), reason
    assert judged(original, head + _unweighted_call("mask")) is None


def test_an_attribute_store_on_a_name_the_loop_reads_is_in_the_program():
    """``criterion.label_smoothing = 0.1`` after ``criterion = nn.CrossEntropyLoss(...)``: the slice
    must hold the store, not only the definition (the recognizer finds no site here at all)."""
    original = trap("criterion_attribute_store")
    head, _, _ = original.partition("    _, seq_len, n_future, vocab_size")
    naive = head + _unweighted_call("attention_mask.float()")
    naive = naive.replace("import torch.nn as nn\n", "import torch.nn as nn\n\n"
                          "from weighted_mtp.utils import compute_mtp_ce_loss\n")
    reason = judged(original, naive)
    assert reason is not None and str(reason).startswith("MTP201") and "differs" in str(reason), reason
    assert judged(original, naive.replace("    criterion.label_smoothing = 0.1\n", "")) is not None


def test_a_project_function_given_the_logits_after_the_loss_is_refused():
    source = CANONICAL.replace("import torch.nn.functional as F\n", "import torch.nn.functional as F\n"
                               "from metrics import accuracy\n").replace(
        "    return total / n_future\n", "    loss = total / n_future\n    accuracy(logits, labels)\n    return loss\n")
    verdict = forced_verdict(source)
    assert verdict.code is Code.CONTINUATION and "`accuracy(logits, labels)`" in str(verdict), verdict


@pytest.mark.parametrize("wrapped", [
    # torch's own context managers run around the site
    ("    with torch.no_grad():\n", "import torch\n"),
    ("    with torch.autocast('cpu', enabled=False):\n", "import torch\n"),
    # a handler that re-raises is transparent
    ("    try:\n", ""),
])
def test_what_the_verifier_can_run_around_the_site_is_run(wrapped):
    header, extra_import = wrapped
    lines = CANONICAL.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("    total = 0.0"))
    body = [header, *("    " + line for line in lines[start:])]
    if header.strip() == "try:":
        body += ["    except IndexError:\n", "        print('bad labels')\n", "        raise\n"]
    source = extra_import + "".join(lines[:start] + body)
    (decision,) = plan(cst.parse_module(source), rho1="rewrite")
    assert decision.action is Action.REWRITTEN
    assert forced_verdict(source) is None


def test_later_code_that_does_not_touch_the_logits_is_not_a_concern():
    source = CANONICAL.replace(
        "    return total / n_future\n",
        "    loss = total / n_future\n    report(loss.item(), labels.shape)\n    logits = None\n"
        "    reset(logits)\n    return loss\n")
    assert forced_verdict(source) is None
