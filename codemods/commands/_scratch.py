"""Keys under ``CodemodContext.scratch`` through which the commands hand work to each other."""

SITES = "mtp_migrate.sites"  # list of per-site report dicts: line, action, reason
FREED_NAMES = "mtp_migrate.freed_names"  # names that only removed code read
NEEDED_IMPORTS = "mtp_migrate.needed_imports"  # (module, set of names)
DEFAULT_UTILITY_MODULE = "weighted_mtp.utils"


def report(context, line: int, action: str, reason: str | None = None, verified: bool = False) -> None:
    context.scratch.setdefault(SITES, []).append({"line": line, "action": action, "reason": reason,
                                                  "verified": verified})
