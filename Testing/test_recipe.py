"""The demonstration-model recipe: its configs are valid TrainConfigs, and packed datasets unpack unchanged."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from MedSynLib.configuration import config_from_dict
from MedSynLib.data.prepared import PreparedDataset
from MedSynLib.pipeline.presets import PRESETS
from MedSynLib.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo_model"


def _recipe_module(name: str):
    spec = importlib.util.spec_from_file_location(name, RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_configs_are_valid_train_configs_of_the_demo_preset():
    for name in ("stage1", "stage2"):
        config = config_from_dict(TrainConfig, json.loads((RECIPE / f"{name}.json").read_text()), source=name)
        assert config.preset == "demo" and config.preset in PRESETS


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


def test_the_gpu_suite_runs_every_measurement_end_to_end(tmp_path):
    """The script a session lent a GPU runs at once: the same steps, small and on the CPU, must all work."""
    env = {**os.environ, "PRESET": "tiny", "DEVICE": "cpu", "SIZE2": "32", "TILE": "16", "RUNS": "0",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    results = (tmp_path / "results.txt").read_text()
    assert done.returncode == 0 and "FAILED" not in results, results + (tmp_path / "errors.txt").read_text()[-2000:]
    steps = [json.loads(line) for line in results.splitlines() if line.startswith("{")]
    assert {(s["stage"], s["dtype"], s["tile"]) for s in steps} == {
        (1, d, None) for d in ("float32", "bfloat16")} | {(2, d, t) for d in ("float32", "bfloat16") for t in (None, "16")}
    assert all(s["peak_memory_GB"] > 0 and s["step_s_min"] > 0 for s in steps)
    assert "| " in results.split("end to end")[-1]  # the preset's end-to-end row
