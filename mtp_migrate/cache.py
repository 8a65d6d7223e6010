"""Results cached by a hash of everything they depend on (like ruff's cache).

Two kinds of entry: a file's whole migration result, keyed by its bytes, the options and
the target's utility status; and a site's verification verdict, keyed by the two
programs (not where they sit in the file), their inputs, the outputs compared and the
bytes of the utility they call. Both keys include the tool's own code and version and
torch's version, so any change to the tool or its input domain starts afresh.

The cache lives in ``.mtp_migrate_cache/`` at the repository root, with its own
``.gitignore``; ``--no-cache`` bypasses it. Writes are atomic, so parallel workers may
share it, and a cache that cannot be read or written only costs time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from mtp_migrate.config import SHIPPED_UTILITY

DIRECTORY = ".mtp_migrate_cache"
VERSION = "v1"
_PACKAGES = (Path(__file__).parent, SHIPPED_UTILITY.parent)


@lru_cache(maxsize=1)
def environment() -> str:
    """A digest of the tool's own sources and of the versions results depend on."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted(package.rglob("*.py")):
            digest.update(path.read_bytes())
    for name in ("mtp-migrate", "torch", "libcst"):
        try:
            digest.update(metadata.version(name).encode())
        except metadata.PackageNotFoundError:
            digest.update(b"?")
    return digest.hexdigest()


@lru_cache(maxsize=256)
def file_digest(path: str, mtime: float) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digest(*parts) -> str:
    payload = json.dumps([environment(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class Cache:
    def __init__(self, root: Path):
        self.directory = root / DIRECTORY

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / VERSION / kind / key[:2] / f"{key}.json"

    def get(self, kind: str, key: str) -> dict | None:
        try:
            return json.loads(self._path(kind, key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, kind: str, key: str, value: dict) -> None:
        path = self._path(kind, key)
        try:
            if not self.directory.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                (self.directory / ".gitignore").write_text("# Created by mtp-migrate: nothing here is source.\n*\n")
                (self.directory / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(handle, "w") as stream:
                json.dump(value, stream)
            os.replace(temporary, path)
        except OSError:
            pass
