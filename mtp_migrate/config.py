"""Product settings: the utility's import path and names, and the options a migration can take.

``OPTION_DEFAULTS`` mirrors the keyword defaults of ``compute_mtp_ce_loss``; a test checks
that they agree, so the emitter can leave out every option equal to its default.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal, get_args

DEFAULT_UTILITY_MODULE = "weighted_mtp.utils"  # the package a target of ours usually has (vendoring.py)
VENDORED_MODULE = "mtp_loss_utils"  # else the module written beside each pipeline
DEFAULT_LINE_LENGTH = 88  # when the target sets none (black's and ruff's default)
WEIGHTED = "compute_mtp_ce_loss"
UNWEIGHTED = "compute_mtp_ce_loss_unweighted"
UTILITY_NAMES = (WEIGHTED, UNWEIGHTED)

Rho1Mode = Literal["del", "rewrite", "skip"]
WeightAlignment = Literal["target", "previous", "input"]
Normalize = Literal["mask", "weights"]
HeadAverage = Literal["all", "valid"]
Count = Literal["heads_with_tokens", "heads_with_weight"]  # the utility's head counts

RHO1_MODES: tuple[str, ...] = get_args(Rho1Mode)
DEFAULT_RHO1: Rho1Mode = "del"

OPTION_DEFAULTS = {
    "n_future": None,
    "ignore_index": -100,
    "weight_alignment": "target",
    "mask_ignored_labels": True,
    "normalize": "mask",
    "head_average": "all",
}


def _shipped_utility() -> Path:
    # Found, never imported (that imports torch). The wheel ships the utility as mtp_migrate.loss;
    # an editable install maps that name onto the checkout's weighted_mtp/utils/.
    spec = importlib.util.find_spec("mtp_migrate.loss")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("mtp_migrate.loss is missing: install mtp-migrate (`pip install -e .` in a checkout)")
    return Path(spec.submodule_search_locations[0]) / "loss_utils.py"


SHIPPED_UTILITY = _shipped_utility()  # the loss_utils.py every migration vendors, byte for byte
