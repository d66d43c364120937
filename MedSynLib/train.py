"""`python -m MedSynLib.train`: the command in MedSynLib/cli/train.py."""

from MedSynLib.cli import run_module

run_module(__name__, "train")
