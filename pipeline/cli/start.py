"""The ``pipeline`` program's entry point: the command line is imported here, so that Ctrl-C while it
imports (torch takes a second or two) ends the program with exit status 130 and no traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from pipeline.cli.main import main as run
    except KeyboardInterrupt:
        sys.exit(130)
    run()
