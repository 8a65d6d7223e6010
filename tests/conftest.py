import sys
from pathlib import Path

import pytest

# Test helpers (mtp_reference, ...) import as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _user_cache_folder(tmp_path_factory):
    """The cache's signing key lives in the user's cache folder: in tests, never the real one
    (the environment variable reaches the CLI run in child processes too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield
