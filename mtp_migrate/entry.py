"""The ``mtp-migrate`` command's entry point: Ctrl-C and SIGTERM are handled before anything loads.

Loading the command line takes a second or more (LibCST, rich); an interrupt in that time
must end the run as any other does: ``error: interrupted``, exit 130, no traceback.
"""

import os
import signal
import sys


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        from mtp_migrate.cli import main as command

        command()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        _interrupted()
    except SystemExit as done:
        if done.code == 130:
            _interrupted()
        raise


def _interrupted() -> None:
    """Exit 130 now. Not by ``sys.exit``: once an interrupt has crossed an ``exec()`` of a string (dataclasses
    and typing run them on import), CPython 3.11 ends the process by SIGINT instead, whatever the code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not interrupt the exit
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)
