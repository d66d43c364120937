"""Shared fixtures: tiny untrained models (the same code as the full-size presets)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_pipeline():
    from MedSynLib.presets import build_pipeline

    return build_pipeline("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipeline):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_pipeline.save_pretrained(folder)
    return folder
