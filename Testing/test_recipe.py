"""The demonstration-model recipe: its configs are valid TrainConfigs, and packed datasets unpack unchanged."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from MedSynLib.configuration import config_from_dict
from MedSynLib.data import PreparedDataset
from MedSynLib.errors import MedSynError
from MedSynLib.evaluation.findings import asks_for
from MedSynLib.networks import UNet3D
from MedSynLib.pipeline import EMBEDDED_MODEL
from MedSynLib.presets import PRESETS, stage_configs
from MedSynLib.train import TrainConfig, start_from_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo_model"


def _recipe_module(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_configs_are_valid_train_configs_of_the_demo_preset():
    for name in ("stage1", "stage2", "stage1_finetune"):
        config = config_from_dict(TrainConfig, json.loads((RECIPE / f"{name}.json").read_text()), source=name)
        assert config.preset == "demo" and config.preset in PRESETS


def test_finetune_config_starts_from_the_shipped_stage1_with_a_pooled_text_path():
    config = config_from_dict(TrainConfig, json.loads((RECIPE / "stage1_finetune.json").read_text()), source="finetune")
    assert (RECIPE.parents[1] / config.init_weights).resolve() == EMBEDDED_MODEL.resolve()
    s1, _ = stage_configs(config.preset, channels=8, text_dim=384)
    model = UNet3D(replace(s1.network, **config.network))
    start_from_model(model, "stage1", EMBEDDED_MODEL)
    shipped = load_file(EMBEDDED_MODEL / "stage1" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shipped.items())
    assert model.config.pooled_text and not model.text_to_time[-1].weight.any()


def test_effusion_subset_keeps_every_effusion_case_and_as_many_without(phantom_dataset, tmp_path):
    counts = _recipe_module("effusion_subset").effusion_subset(phantom_dataset, tmp_path / "subset")
    subset, whole = PreparedDataset(tmp_path / "subset"), PreparedDataset(phantom_dataset)
    asked = [c.case_id for c in map(whole.load, range(len(whole))) if asks_for(c.report, "effusion")]
    assert counts == {"with_effusion": len(asked), "without": min(len(asked), len(whole) - len(asked))}
    assert set(asked) <= set(subset.case_ids) and len(subset) == sum(counts.values())
    assert subset.load(0).report == whole.load(whole.case_ids.index(subset.case_ids[0])).report
    with pytest.raises(MedSynError, match="asking for an effusion"):  # a cap of 1 leaves no effusion case
        _recipe_module("effusion_subset").effusion_subset(phantom_dataset, tmp_path / "capped", 1)
    # Packing the view packs its cases only.
    pack_dataset = _recipe_module("pack_dataset")
    pack_dataset.pack(tmp_path / "subset", tmp_path / "subset.tar.xz")
    pack_dataset.unpack(tmp_path / "subset.tar.xz", tmp_path / "unpacked")
    assert sorted(p.stem for p in (tmp_path / "unpacked" / "cases").iterdir()) == sorted(subset.case_ids)


def test_packed_dataset_unpacks_to_the_same_cases(phantom_dataset, tmp_path):
    pack_dataset = _recipe_module("pack_dataset")
    pack_dataset.pack(phantom_dataset, tmp_path / "data.tar.xz")
    pack_dataset.unpack(tmp_path / "data.tar.xz", tmp_path / "unpacked")
    original, unpacked = PreparedDataset(phantom_dataset), PreparedDataset(tmp_path / "unpacked")
    assert original.case_ids == unpacked.case_ids
    for i in range(len(original)):
        a, b = original.load(i), unpacked.load(i)
        np.testing.assert_array_equal(a.ct_hu, b.ct_hu)
        assert all(np.array_equal(a.masks[n], b.masks[n]) for n in a.masks) and a.report == b.report


def test_recipe_refuses_an_unknown_step(tmp_path):
    result = subprocess.run(["bash", str(RECIPE / "make_demo_model.sh"), str(tmp_path)], env={"STEPS": "bake",
                            "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown step bake" in result.stderr
