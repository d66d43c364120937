"""User-facing errors and the command-line wrapper that turns them into one line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class MedSynError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


def run_command(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's main; a MedSynError or bad-input OSError becomes one line on stderr and exit 2."""
    try:
        return main(argv) or 0
    except MedSynError as error:
        print(f"medsyn: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsyn: interrupted", file=sys.stderr)
        return 130
