"""`python -m MedSynLib.generate`: the command in MedSynLib/cli/generate.py."""

from MedSynLib.cli import run_module

run_module(__name__, "generate")
