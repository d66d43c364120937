"""`python -m MedSynLib.convert`: the command in MedSynLib/cli/convert.py."""

from MedSynLib.cli import run_module

run_module(__name__, "convert")
