"""Loss utilities for multi-token-prediction training."""

from .fused_loss import compute_mtp_ce_loss_from_hidden
from .loss_utils import compute_mtp_ce_loss, compute_mtp_ce_loss_unweighted

__all__ = ["compute_mtp_ce_loss", "compute_mtp_ce_loss_from_hidden", "compute_mtp_ce_loss_unweighted"]
