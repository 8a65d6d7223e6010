"""Vendoring: a target repo with its own ``weighted_mtp/utils`` package gets our loss_utils.py.

DESIGN §5: when the migrated tree *is* weighted_mtp, the import the rewrite adds must
resolve inside it, so ``loss_utils.py`` is written there byte-identical to the shipped
one and ``utils/__init__.py`` exports it.
"""

from __future__ import annotations

from pathlib import Path

import libcst as cst
from libcst.codemod import CodemodContext

import weighted_mtp
from codemods.commands.export_utility import ExportUtilityCommand

_CANDIDATES = (Path("weighted_mtp", "utils"), Path("src", "weighted_mtp", "utils"))
# Located, not imported: importing it would import torch, which the CLI does not need.
SHIPPED_UTILITY = Path(weighted_mtp.__file__).parent / "utils" / "loss_utils.py"


def vendor_target(root: Path) -> Path | None:
    """The target tree's own ``weighted_mtp/utils`` package, if it has one (and it is not ours)."""
    for candidate in _CANDIDATES:
        package = root / candidate
        if (package / "__init__.py").is_file() and package.resolve() != SHIPPED_UTILITY.parent.resolve():
            return package
    return None


def plan_vendoring(root: Path) -> dict[Path, tuple[bytes, bytes]]:
    """``{path: (old bytes, new bytes)}`` for the files vendoring would change under ``root``."""
    package = vendor_target(root)
    if package is None:
        return {}
    changes = {}
    utility = package / "loss_utils.py"
    new_utility = SHIPPED_UTILITY.read_bytes()
    old_utility = utility.read_bytes() if utility.exists() else b""
    if old_utility != new_utility:
        changes[utility] = (old_utility, new_utility)
    init = package / "__init__.py"
    old_init = init.read_bytes()
    context = CodemodContext(filename=str(init))
    new_init = ExportUtilityCommand(context).transform_module(cst.parse_module(old_init)).bytes
    if new_init != old_init:
        changes[init] = (old_init, new_init)
    return changes
