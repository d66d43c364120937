"""`python -m MedSynLib.phantom_cases`: the command in MedSynLib/cli/phantom_cases.py."""

from MedSynLib.cli import run_module

run_module(__name__, "phantom_cases")
