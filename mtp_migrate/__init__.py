"""mtp-migrate: LibCST codemods that move MTP training loops onto a vendored compute_mtp_ce_loss."""

import warnings

# torch warns at import where numpy is missing (a pre-commit environment has none); nothing here
# uses numpy. Set here, so that every process that imports torch for us has it: workers included.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
