"""``--emit-tests DIR``: the equivalence-test module of every migrated file, as a file to write.

The module's text comes from ``verify/emit.py``; here it gets its path, its revision, and
the rule that protects what is there: a module at that path that mtp-migrate did not
write is never overwritten, and then its pipeline is not migrated either (a migration
whose evidence cannot be kept is not made).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mtp_migrate.report import FileReport
from mtp_migrate.since import revision_of
from mtp_migrate.verify.emit import (
    guarded_file,
    guarded_path,
    is_generated,
    module_name,
    qualified_module_name,
    render,
)


def test_modules(reports: list[FileReport], directory: Path) -> list[tuple[FileReport, FileReport]]:
    """``(module report, pipeline report)`` for every file with a rewritten, verified site."""
    guarded = [report for report in reports if report.guards and report.status == "changed"]
    stems = Counter(Path(report.path).stem for report in guarded)
    pairs = []
    for report in guarded:
        pipeline = Path(report.path)
        module = directory / (module_name(pipeline) if stems[pipeline.stem] == 1 else qualified_module_name(pipeline))
        existing, problem = _existing(module)
        if existing is not None and guarded_file(existing) not in (None, guarded_path(module, pipeline)):
            module = directory / qualified_module_name(pipeline)  # that module guards another file of this stem
            existing, problem = _existing(module)
        if problem is not None:
            pairs.append((FileReport(module.as_posix(), "error", problem), report))
            report.status, report.error = "error", f"not migrated: its equivalence tests cannot be written to " \
                                                   f"{module} ({problem})"
            continue
        text = render(module, pipeline, report.guards, report.import_root, revision_of(pipeline), existing)
        old = existing.encode("utf-8") if existing is not None else b""
        new = text.encode("utf-8")
        pairs.append((FileReport(module.as_posix(), "changed" if new != old else "unchanged", None, [], old, new),
                      report))
    return pairs


def _existing(module: Path) -> tuple[str | None, str | None]:
    """``(text, None)`` of a module mtp-migrate wrote, ``(None, None)`` if there is none, else why not to touch it."""
    try:
        text = module.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as error:
        return None, f"cannot read: {error.strerror or error}"
    except UnicodeDecodeError:
        text = ""
    if not is_generated(text):
        return None, "exists and was not written by mtp-migrate; left as it is"
    return text, None
