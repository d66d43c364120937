"""Control evaluation: prompts x settings -> generated volumes -> finding detectors -> rates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from MedSynLib.errors import MedSynError, run_command
from MedSynLib.evaluation import control
from MedSynLib.evaluation.findings import requested_findings
from MedSynLib.pipeline.generation import MedSynPipeline


def test_default_prompts_each_ask_for_one_finding_and_deny_the_others():
    asked = []
    for prompt in control.DEFAULT_PROMPTS:
        request = requested_findings(prompt)
        assert all(r is not None for r in request.values()), prompt  # every kind is asked for or denied
        asked.append(sorted(kind for kind, r in request.items() if r.present))
    assert asked == [["effusion"], ["effusion"], ["nodule"], ["nodule"], ["cardiomegaly"], []]
    locations = [r.location for p in control.DEFAULT_PROMPTS for r in requested_findings(p).values() if r.present]
    assert locations == ["left", "right", "right_upper_lobe", "left_lower_lobe", None]


def test_settings_grid_and_labels():
    grid = control.settings_grid([1.0, None], [5])
    assert grid == [control.Setting(1.0, 5), control.Setting(None, 5)]
    assert grid[1].label() == "guidance default, 5 steps"


def test_text_control_counts_every_sample_and_reports_rates(tiny_model_dir, tmp_path):
    pipeline = MedSynPipeline.from_pretrained(tiny_model_dir)
    prompts = list(control.DEFAULT_PROMPTS[:2])
    settings = [control.Setting(1.0, 2), control.Setting(3.0, 2)]
    result = control.text_control(pipeline, prompts, settings, samples=1, progress=False)
    assert [s["samples"] for s in result["settings"]] == [2, 2]
    assert len(result["records"]) == 4 and set(result["examples"]) == set(prompts)
    rates = result["settings"][0]["rates"]
    assert rates["effusion"]["n_requested"] == 2 and rates["nodule"]["n_denied"] == 2
    for entry in result["settings"]:
        for kind_rates in entry["detected_rate_per_prompt"].values():
            assert all(0.0 <= v <= 1.0 for v in kind_rates.values())
    control.write_report(tmp_path / "report", result, None)
    saved = json.loads((tmp_path / "report" / "control.json").read_text())
    assert len(saved["text_control"]["records"]) == 4
    assert "| effusion |" in (tmp_path / "report" / "table.md").read_text()
    assert (tmp_path / "report" / "examples.png").stat().st_size > 0


def test_precomputed_report_features_give_the_same_volume(tiny_model_dir, tmp_path):
    pipeline = MedSynPipeline.from_pretrained(tiny_model_dir)
    prompt = control.DEFAULT_PROMPTS[0]
    encoder = {"model": "x"}
    control.save_report_features(tmp_path / "f.safetensors", {prompt: pipeline.encode_report(prompt)}, encoder)
    features = control.load_report_features(tmp_path / "f.safetensors", [prompt], encoder)
    direct = pipeline.generate(prompt, seed=3, steps=2, stage2_steps=2)
    given = pipeline.generate(prompt, seed=3, steps=2, stage2_steps=2, report_features=features[prompt])
    np.testing.assert_array_equal(direct.ct_hu, given.ct_hu)
    with pytest.raises(MedSynError, match="another text encoder"):
        control.load_report_features(tmp_path / "f.safetensors", [prompt], {"model": "y"})
    with pytest.raises(MedSynError, match="no features"):
        control.load_report_features(tmp_path / "f.safetensors", ["another report"], encoder)


def test_generate_refuses_report_features_of_the_wrong_shape_or_with_nan(tiny_pipeline):
    features = tiny_pipeline.encode_report("Small left pleural effusion.")
    wrong = type(features)(features.features[:, :10], features.mask[:, :10])
    with pytest.raises(MedSynError, match="must have shape"):
        tiny_pipeline.generate("x", steps=1, stage2_steps=1, report_features=wrong)
    nan = type(features)(torch.full_like(features.features, float("nan")), features.mask)
    with pytest.raises(MedSynError, match="NaN"):
        tiny_pipeline.generate("x", steps=1, stage2_steps=1, report_features=nan)


def test_anatomy_control_scores_lungs_and_airway(tiny_model_dir):
    pipeline = MedSynPipeline.from_pretrained(tiny_model_dir)
    result = control.anatomy_control(pipeline, samples=1, prompt=control.DEFAULT_PROMPTS[-1], progress=False)
    for part in ("consistency", "conditioned_on_phantom_anatomy"):
        assert set(result[part]) <= set(control.CONSISTENCY_STRUCTURES)
        assert all(0.0 <= v["mean"] <= 1.0 for v in result[part].values())


def test_command_line_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    assert run_command(control.main, ["--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                                      "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_command(control.main, ["--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                                      "--guidance", "two"]) == 2
