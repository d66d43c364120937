"""`python -m MedSynLib.init_model`: the command in MedSynLib/cli/init_model.py."""

from MedSynLib.cli import run_module

run_module(__name__, "init_model")
