"""The loss registry (`mtp_loop/losses.py`), and the utility output keys the emitter writes."""

from typing import get_args

import libcst as cst
import pytest

from mtp_migrate.mtp_loop.find import find_sites
from mtp_migrate.mtp_loop.losses import LOSSES, PREFILTER, Form, LossSpelling, spelling
from mtp_migrate.mtp_loop.spec import OutputKey
from weighted_mtp.utils.loss_utils import MTPLoss


def _use(loss: LossSpelling, name: str) -> str:
    """A minimal file using ``loss`` through its qualified name ``name``."""
    module, _, attribute = name.rpartition(".")
    call = f"{attribute}(logits[:, :-k].flatten(0, 1), labels[:, k:].flatten(), reduction='none')"
    if loss.form is Form.WRITTEN_OUT:
        x, y = "logits[:, :-k, k - 1]", "labels[:, k:].clamp_min(0).unsqueeze(-1)"
        call = f"-{attribute}({x}, dim=-1).gather(-1, {y}).squeeze(-1)" if loss.reads == "log_probs" else \
            f"{attribute}({x}, dim=-1) - {x}.gather(-1, {y}).squeeze(-1)"
    if loss.form is Form.MODULE:
        return (f"from {module} import {attribute}\ncriterion = {attribute}(reduction='none')\n"
                "for k in range(1, 3):\n    loss = criterion(logits[:, :-k].flatten(0, 1), labels[:, k:].flatten())\n")
    return f"from {module} import {attribute}\nfor k in range(1, 3):\n    loss = {call}\n"


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: min(loss.qualified))
def test_prefilter_matches_every_spelling(loss):
    """A file using a registered spelling by any of its names passes the prefilter (else: "no site found")."""
    for name in loss.qualified:
        assert any(marker in _use(loss, name).encode() for marker in PREFILTER), name


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: min(loss.qualified))
def test_finder_sees_every_spelling(loss):
    """The head-loop finder takes a loop using each registered spelling for a site."""
    for name in loss.qualified:
        assert len(find_sites(cst.parse_module(_use(loss, name)))) == 1, name


def test_spellings_resolve_to_themselves():
    for loss in LOSSES:
        assert spelling(set(loss.qualified), loss.form) is loss
        assert spelling(set(loss.qualified), next(f for f in Form if f is not loss.form)) is None
    assert spelling(set(), Form.FUNCTION) is None


def test_output_keys_are_the_utilitys():
    """The keys the emitter writes (``spec.OutputKey``) are those ``compute_mtp_ce_loss`` returns (``MTPLoss``)."""
    assert set(get_args(OutputKey)) == set(MTPLoss.__annotations__)
