"""The CLI run in-process from a folder, as the CLI tests run it."""

import os
from pathlib import Path

from click.testing import CliRunner

from mtp_migrate.cli import main


def invoke(*args, cwd):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, [*args, "--color", "never"], catch_exceptions=False)
    finally:
        os.chdir(old)
