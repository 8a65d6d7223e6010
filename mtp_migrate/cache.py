"""Results cached by a hash of everything they depend on (like ruff's cache).

Two kinds of entry: a file's whole migration result, keyed by its bytes, the options and
the target's utility status; and a site's verification verdict, keyed by the two
programs (not where they sit in the file), their inputs, the outputs compared and the
bytes of the utility they call. Both keys include the tool's own code and version and
torch's version, so any change to the tool or its input domain starts afresh.

The cache lives in ``.mtp_migrate_cache/`` at the repository root, with its own
``.gitignore``; ``--no-cache`` bypasses it. Writes are atomic, so parallel workers may
share it, and a cache that cannot be read or written only costs time.

Its keys can be computed and it lives in the checkout, so a pull request can commit
entries: every entry is signed with a key kept outside any repository, in the user's
cache folder, and must fit its schema. An entry that fails either check is a miss. No
symlink is followed, neither to the cache nor to the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from mtp_migrate import project
from mtp_migrate.config import SHIPPED_UTILITY
from mtp_migrate.mtp_loop.spec import Action
from mtp_migrate.refusals import Code

DIRECTORY = ".mtp_migrate_cache"
VERSION = "v2"  # v2: signed entries
_PACKAGES = (Path(__file__).parent, SHIPPED_UTILITY.parent)
_MARKERS = {".gitignore": "# Created by mtp-migrate: nothing here is source.\n*\n",
            "CACHEDIR.TAG": "Signature: 8a477f597d28d172789f06886806bc55\n"}
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
KEY_BYTES = 32
MAX_ENTRY_BYTES = 16 << 20  # a file entry holds a file of at most 1 MiB, in base64

# Each entry's shape: a type, a literal, a tuple of alternatives, a list of one shape, a dict of exactly these keys.
_CODE = tuple(code.code for code in Code)
_SITE_REPORT = ({"line": int, "action": tuple(action.value for action in Action), "code": None, "reason": None,
                 "verified": bool},
                {"line": int, "action": tuple(action.value for action in Action), "code": _CODE, "reason": str,
                 "verified": bool})
SCHEMAS = {
    "files": {"output": str, "sha256": str, "sites": [_SITE_REPORT]},
    "sites": ({"line": int, "ok": True, "code": None, "reason": None, "cases": int, "compared": [str]},
              {"line": int, "ok": False, "code": _CODE, "reason": str, "cases": int, "compared": [str]}),
}


def fits(value, schema) -> bool:
    """``value`` has the shape ``schema`` describes (see ``SCHEMAS``)."""
    if isinstance(schema, type):
        return type(value) is schema
    if isinstance(schema, tuple):
        return any(fits(value, alternative) for alternative in schema)
    if isinstance(schema, list):
        return type(value) is list and all(fits(item, schema[0]) for item in value)
    if isinstance(schema, dict):
        return type(value) is dict and value.keys() == schema.keys() and all(
            fits(value[name], shape) for name, shape in schema.items())
    return type(value) is type(schema) and value == schema


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


def key_folder() -> Path:
    """The user's own cache folder for mtp-migrate (``$XDG_CACHE_HOME/mtp-migrate``, else ``~/.cache/mtp-migrate``)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "mtp-migrate"


@lru_cache(maxsize=8)
def signing_key(folder: Path) -> tuple[bytes | None, str | None]:
    """``(key, None)``: the key entries are signed with, made on first use; else ``(None, why not)``."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = folder.lstat()
        if stat.S_ISLNK(status.st_mode):
            return None, f"{folder} is a symlink (not followed)"
        if status.st_uid != os.geteuid() or status.st_mode & 0o022:
            return None, f"{folder} is not the user's own (its owner or mode)"
        path = folder / "key"
        if not path.exists() and not path.is_symlink():
            handle, temporary = tempfile.mkstemp(dir=folder)  # 0600
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(secrets.token_bytes(KEY_BYTES))
                    stream.flush()
                    os.fsync(stream.fileno())
                try:
                    os.link(temporary, path)  # never over the key a parallel run made first
                except FileExistsError:
                    pass
            finally:
                os.unlink(temporary)
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(handle, "rb") as stream:
            status, key = os.fstat(handle), stream.read(KEY_BYTES + 1)
    except (OSError, RuntimeError) as error:  # RuntimeError: no home folder
        return None, f"cannot keep its key in {folder}: {getattr(error, 'strerror', None) or error}"
    if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid() or status.st_mode & 0o077 \
            or len(key) != KEY_BYTES:
        return None, f"{path} is not a key mtp-migrate made (its type, owner, mode or size)"
    return key, None


class Cache:
    def __init__(self, root: Path):
        self.directory = root / DIRECTORY
        self.key, problem = signing_key(key_folder())
        if problem is None and self.directory.is_symlink():
            problem = f"{self.directory} is a symlink (not followed)"
        self.problem = f"nothing is cached: {problem}" if problem else None

    @staticmethod
    def of(path: Path) -> Cache:
        """The cache of the project holding ``path``; outside any project, where the command runs
        (not one in every folder)."""
        return Cache(project.project_root(path.parent) or Path.cwd())

    def _sign(self, kind: str, key: str, payload: bytes) -> bytes:
        message = b"\0".join((VERSION.encode(), kind.encode(), key.encode(), payload))
        return hmac.new(self.key, message, hashlib.sha256).hexdigest().encode()

    def _folder(self, kind: str, key: str, create: bool) -> int:
        """An open descriptor of the entry's folder, reached without following a symlink."""
        handle = os.open(self.directory.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in (DIRECTORY, VERSION, kind, key[:2]):
                made = False
                if create:
                    try:
                        os.mkdir(part, dir_fd=handle)
                        made = True
                    except FileExistsError:
                        pass
                inner = os.open(part, _FOLDER, dir_fd=handle)
                os.close(handle)
                handle = inner
                if made and part == DIRECTORY:
                    for name, text in _MARKERS.items():
                        _write(handle, name, text.encode())
        except BaseException:
            os.close(handle)
            raise
        return handle

    def get(self, kind: str, key: str) -> dict | None:
        """The entry, if it is signed with the user's key and fits its schema; else ``None`` (a miss)."""
        if self.problem is not None:
            return None
        try:
            folder = self._folder(kind, key, create=False)
            try:
                handle = os.open(f"{key}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
            finally:
                os.close(folder)
            with os.fdopen(handle, "rb") as stream:
                if not stat.S_ISREG(os.fstat(handle).st_mode):
                    return None
                data = stream.read(MAX_ENTRY_BYTES + 1)
        except OSError:
            return None
        signature, _, payload = data.partition(b"\n")
        if len(data) > MAX_ENTRY_BYTES or not hmac.compare_digest(signature, self._sign(kind, key, payload)):
            return None
        try:
            value = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        return value if fits(value, SCHEMAS[kind]) else None

    def put(self, kind: str, key: str, value: dict) -> None:
        if self.problem is not None:
            return
        payload = json.dumps(value).encode()
        try:
            folder = self._folder(kind, key, create=True)
            try:
                _write(folder, f"{key}.json", self._sign(kind, key, payload) + b"\n" + payload)
            finally:
                os.close(folder)
        except OSError:
            pass


def _write(folder: int, name: str, data: bytes) -> None:
    """``name`` in the folder open as ``folder``, atomically, never through a symlink."""
    temporary = f".{name}.{secrets.token_hex(4)}.tmp"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        os.unlink(temporary, dir_fd=folder)
        raise
