"""Write the adversarial files of a new spelling from templates (CONTRIBUTING.md, steps 3 and 4).

    python scripts/new_case.py --spelling range_step1 --trap range_step2

``--spelling NAME`` writes ``equivalent/NAME.py`` and ``reference/NAME.py``; ``--trap NAME``
writes ``unsound/NAME.py`` and ``naive/NAME.py``. Each file is the plain loop (or its call)
with TODOs saying what to change; ``tests/test_adversarial.py::test_every_case_is_complete``
fails until none is left. An existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CORPUS = Path(__file__).parents[1] / "fixtures" / "adversarial"

LOOP = '''
import torch.nn.functional as F


def mtp_loss(logits, labels, attention_mask):
    _, seq_len, n_future, vocab_size = logits.shape
    total = 0.0
    for k in range(1, n_future + 1):
        valid_len = seq_len - k
        if valid_len <= 0:
            continue
        ce = F.cross_entropy(logits[:, :valid_len, k - 1].reshape(-1, vocab_size), labels[:, k:].reshape(-1),
                             reduction="none")
        mask = (attention_mask[:, k:] != 0).reshape(-1) & (labels[:, k:].reshape(-1) != -100)
        denom = mask.sum()
        if denom > 0:
            total += (ce * mask).sum() / denom
    return total / n_future
'''

CALL = '''
from weighted_mtp.utils import compute_mtp_ce_loss


def mtp_loss(logits, labels, attention_mask):
    ce_losses = compute_mtp_ce_loss(logits=logits, labels=labels, attention_mask=attention_mask != 0)
    # the loop returns a float where no head has a token
    return ce_losses["unweighted_ce_loss"].to(logits.dtype) if ce_losses["heads_with_tokens"] else 0.0
'''

TEMPLATES = {
    "equivalent": '"""Spelling: TODO say what this loop spells differently from the usual one, and why it is\n'
                  'still the utility\'s computation."""\n' + LOOP.replace("    for k", "    # TODO: write the spelling\n"
                                                                         "    for k", 1),
    "reference": '"""Correct rewrite of equivalent/{name}.py."""\n' + CALL.replace(
        "    ce_losses", "    # TODO: the call that computes what equivalent/{name}.py computes\n    ce_losses", 1),
    "unsound": '"""Trap: TODO say what makes this loop, which looks like the spelling, not equivalent, and\n'
               'on which inputs."""\n' + LOOP.replace("    for k", "    # TODO: write the look-alike\n    for k", 1),
    "naive": '"""Naive rewrite: TODO say what a careless tool would miss."""\n' + CALL.replace(
        "    ce_losses", "    # TODO: the wrong call a careless tool would write for unsound/{name}.py\n    ce_losses", 1),
}
KINDS = {"spelling": ("equivalent", "reference"), "trap": ("unsound", "naive")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spelling", help="the equivalent spelling's case name")
    parser.add_argument("--trap", help="the look-alike trap's case name")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the adversarial folder (default: %(default)s)")
    args = parser.parse_args(argv)
    names = {role: getattr(args, role) for role in KINDS if getattr(args, role)}
    if not names:
        parser.error("give --spelling, --trap or both")
    for name in names.values():
        if not name.isidentifier():
            parser.error(f"{name!r} is not a module name")
    files = {args.corpus / kind / f"{name}.py": TEMPLATES[kind].replace("{name}", name)
             for role, name in names.items() for kind in KINDS[role]}
    existing = [path for path in files if path.exists()]
    if existing:  # checked before anything is written: no half-made case
        print(f"error: {existing[0]} exists; pick another name", file=sys.stderr)
        return 1
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
