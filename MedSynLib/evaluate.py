"""`python -m MedSynLib.evaluate`: the command in MedSynLib/cli/evaluate.py."""

from MedSynLib.cli import run_module

run_module(__name__, "evaluate")
