"""The command-line tools, one module per command.

Each runs as `python -m MedSynLib.COMMAND ...` (the Slicer module and scripts call them so) or
as `medsyn COMMAND ...` (the console script `pyproject.toml` installs); both end in the
command's `main`, run by `errors.run_command` so that bad input is one line and exit 2.
"""

from __future__ import annotations

import importlib
import sys

from MedSynLib.errors import run_command

COMMANDS = {
    "generate": "a CT and its anatomy from a report",
    "prepare": "chest CTs + reports -> a training set",
    "train": "train a stage, or export runs as a model folder",
    "evaluate": "FID / MMD, anatomy and report adherence of generated volumes",
    "convert": "import the reference's released checkpoints",
    "init_model": "an untrained model folder of a preset",
    "phantom_cases": "phantom CTs with anatomy and reports, for training without data",
}


def run_module(name: str, command: str) -> None:
    """`python -m MedSynLib.COMMAND`: run the command when its top-level module is the main one."""
    if name == "__main__":
        sys.exit(run_command(importlib.import_module(f"MedSynLib.cli.{command}").main))


def main(argv: list[str] | None = None) -> int:
    """`medsyn COMMAND [ARGS]`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items())
        print(f"usage: medsyn COMMAND [ARGS]  (medsyn COMMAND --help for its arguments)\n\ncommands:\n{listing}",
              file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        if argv[:1] in (["-h"], ["--help"]):
            return 0
        if argv:
            print(f"medsyn: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    return run_command(importlib.import_module(f"MedSynLib.cli.{argv[0]}").main, argv[1:])
