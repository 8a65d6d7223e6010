"""The lint run the emitted equivalence tests must pass, with its rules pinned: what a user's repository
realistically enables, selected explicitly so that the result does not move with the installed ruff's defaults
(ruff 0.17's added PLR0402, which flags ``import torch.nn as nn``)."""

import subprocess
import sys
from pathlib import Path

# pycodestyle, pyflakes, isort, pyupgrade, bugbear, simplify, ruff's own, and pylint's PLR0402. Not E501: the
# cases' tables are as long as their inputs, and formatters leave such lines long too. Not SIM300 or B905: the
# frozen loop is the user's code as written, and `0 < mask_sum` and `zip(range(n), logits.unbind(2))` (no
# `strict=`) are spellings the suite tests.
RULES = "E,F,W,I,UP,B,SIM,RUF,PLR0402"
IGNORED = "E501,SIM300,B905"


def ruff_emitted(folder: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache", "--target-version", "py311",
                           "--select", RULES, "--ignore", IGNORED, folder], cwd=cwd, capture_output=True, text=True)
