"""weighted_mtp: multi-token-prediction training utilities shipped by mtp-migrate."""
