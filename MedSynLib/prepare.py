"""`python -m MedSynLib.prepare`: the command in MedSynLib/cli/prepare.py."""

from MedSynLib.cli import run_module

run_module(__name__, "prepare")
