"""``python -m mtp_migrate``: the mtp-migrate command line."""

import os
import sys

# `python -m` puts the working directory first on sys.path; run inside a target repository,
# its own `weighted_mtp` (or any module) would shadow ours. The console script has no such entry.
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]

from mtp_migrate.entry import main  # noqa: E402

main()
