"""Training both stages on phantoms: learning, export, exact resume, torchrun, crash safety, bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from MedSynLib.cli.train import main as train_main
from MedSynLib.errors import MedSynError, run_command
from MedSynLib.pipeline.generation import MedSynPipeline
from MedSynLib.training import checkpoints
from MedSynLib.training.config import resolve_config
from MedSynLib.training.export import export

FAST = ["preset=tiny", "num_workers=0", "warmup_steps=0", "grad_accumulation=1", "batch_size=2", "log_every=1",
        "sample_every=0", "ema_start=0", "ema_decay=0.9", "patch=[16,16,16]"]


def run_train(*args):
    return run_command(train_main, [str(a) for a in args])


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def latest_weights(run, name="model"):
    return load_file(sorted((run / "checkpoints").glob("step_*"))[-1] / f"{name}.safetensors")


@pytest.fixture(scope="module")
def trained_runs(phantom_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for stage in ("stage1", "stage2"):
        assert run_train(stage, "--data", phantom_dataset, "--out", root / stage, *FAST, "steps=40",
                         "learning_rate=0.002", "checkpoint_every=20") == 0
    return root


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_short_training_lowers_the_loss(trained_runs, stage):
    values = losses(trained_runs / stage)
    assert len(values) == 40 and all(np.isfinite(values))
    assert np.mean(values[-8:]) < 0.6 * np.mean(values[:4]), values


def test_a_residual_stage_2_trains_from_the_condition_and_exports(trained_runs, phantom_dataset, tmp_path):
    """network={"residual": true}: the loss starts at what the upsampled volume alone scores and
    falls from there; the exported model keeps the setting and generates."""
    run = tmp_path / "residual"
    assert run_train("stage2", "--data", phantom_dataset, "--out", run, *FAST, "steps=20", "learning_rate=0.002",
                     'network={"residual": true}') == 0
    assert json.loads((run / "run.json").read_text())["stage_config"]["network"]["residual"] is True
    residual, plain = losses(run), losses(trained_runs / "stage2")
    assert residual[0] < 0.5 * plain[0], (residual[:3], plain[:3])  # an upsampled volume is already close
    pipeline = MedSynPipeline.from_pretrained(export([trained_runs / "stage1", run], tmp_path / "model"))
    assert pipeline.stage2.config.network.residual
    result = pipeline.generate("Small left pleural effusion.", seed=1, steps=2, stage2_steps=2)
    assert result.ct_hu.shape == (pipeline.stage2.config.size,) * 3


def test_run_folder_keeps_config_checkpoints_and_metrics(trained_runs):
    run = trained_runs / "stage1"
    info = json.loads((run / "run.json").read_text())
    assert info["stage"] == "stage1" and info["train"]["steps"] == 40 and info["train"]["preset"] == "tiny"
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == ["step_00000020", "step_00000040"]
    assert set(os.listdir(run / "checkpoints" / "step_00000040")) == {
        "model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"}


def test_export_makes_a_model_that_generate_uses(trained_runs, tmp_path):
    model = tmp_path / "model"
    assert run_train("export", "--run", trained_runs / "stage1", "--run", trained_runs / "stage2", "--out", model) == 0
    pipeline = MedSynPipeline.from_pretrained(model)
    assert pipeline.config.trained and "40 steps" in pipeline.config.description
    ema = latest_weights(trained_runs / "stage1", "ema")
    assert torch.equal(pipeline.stage1.network.state_dict()["final_conv.weight"], ema["final_conv.weight"])
    from MedSynLib.cli.generate import main as generate_main

    out = tmp_path / "generated"
    assert run_command(generate_main, ["--model", str(model), "--report", "Left pleural effusion.", "--out", str(out),
                                       "--progress", "none"]) == 0
    assert (out / "ct.nii.gz").is_file()


def test_resume_continues_exactly(phantom_dataset, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train("stage1", "--data", phantom_dataset, "--out", straight, *FAST, "steps=6", "checkpoint_every=3") == 0
    assert run_train("stage1", "--data", phantom_dataset, "--out", resumed, *FAST, "steps=3", "checkpoint_every=3") == 0
    assert run_train("stage1", "--data", phantom_dataset, "--out", resumed, *FAST, "steps=6", "checkpoint_every=3",
                     "--resume") == 0
    a, b = latest_weights(straight), latest_weights(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert losses(straight) == pytest.approx(losses(resumed), abs=1e-6)


def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(phantom_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_train("stage1", "--data", phantom_dataset, "--out", run, *FAST, "steps=4", "checkpoint_every=2") == 0
    (run / "checkpoints" / "step_00000004" / "model.safetensors").write_bytes(b"torn")
    (run / "checkpoints" / ".step_00000006.tmp").mkdir()  # a save interrupted by a crash
    assert run_train("stage1", "--data", phantom_dataset, "--out", run, *FAST, "steps=6", "checkpoint_every=2",
                     "--resume") == 0
    assert "step_00000004 is unreadable" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000006").is_dir()


def test_a_failed_save_keeps_the_previous_checkpoint(phantom_dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save, calls = checkpoints.save_file, []

    def save_until_disk_full(tensors, path):
        calls.append(path)
        if "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoints, "save_file", save_until_disk_full)
    with pytest.raises(OSError):
        train_main(["stage1", "--data", str(phantom_dataset), "--out", str(run), *FAST, "steps=4",
                           "checkpoint_every=2"])
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000002"]
    assert load_file(run / "checkpoints" / "step_00000002" / "model.safetensors")


def test_sigkill_during_training_resumes_from_an_intact_checkpoint(phantom_dataset, tmp_path):
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "MedSynLib.train", "stage1", "--data", str(phantom_dataset), "--out", str(run),
               *FAST, "steps=100000", "checkpoint_every=1", "keep_checkpoints=2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run / "checkpoints").glob("step_*"))) < 2:
        time.sleep(0.2)
    time.sleep(0.3)  # likely in the middle of a step or a save
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert run_train("stage1", "--data", phantom_dataset, "--out", run, *FAST, "steps=1",
                     "checkpoint_every=1", "--resume") == 0  # already past step 1: loads and stops cleanly
    step = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert run_train("stage1", "--data", phantom_dataset, "--out", run, *FAST, f"steps={step + 1}",
                     "checkpoint_every=1", "keep_checkpoints=2", "--resume") == 0
    assert (run / "checkpoints" / f"step_{step + 1:08d}" / "model.safetensors").is_file()


def test_torchrun_two_processes_keep_identical_parameters(phantom_dataset, tmp_path):
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "MedSynLib.train", "stage1", "--data", str(phantom_dataset), "--out", str(run),
               *[a if not a.startswith("batch_size") else "batch_size=1" for a in FAST], "steps=3",
               "checkpoint_every=3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    sums = json.loads((run / "replicas.json").read_text())
    assert len(sums["parameter_checksums"]) == 2 and len(set(sums["parameter_checksums"])) == 1
    # Two processes with batch 1 see exactly the samples of one process with batch 2.
    single = tmp_path / "single"
    assert run_train("stage1", "--data", phantom_dataset, "--out", single, *FAST, "steps=3", "checkpoint_every=3") == 0
    a, b = latest_weights(run), latest_weights(single)
    differences = [(a[k] - b[k]).abs().max().item() for k in a]
    # Equal up to the order of the gradient sum; Adam can turn that rounding into up to lr per step
    # for parameters whose gradient is ~0 (conv biases before GroupNorm), and only for those.
    assert max(differences) < 3 * 1e-4
    assert np.mean(np.array(differences) < 1e-5) > 0.9


def _nan_dataset(phantom_dataset, tmp_path):
    broken = tmp_path / "nan"
    shutil.copytree(phantom_dataset, broken)
    for path in (broken / "cases").glob("*.npz"):
        with np.load(path) as data:
            arrays = dict(data)
        arrays["text_features"] = np.full_like(arrays["text_features"], np.nan)
        np.savez_compressed(path, **arrays)
    return broken


def test_bad_inputs_give_clear_errors(phantom_dataset, tmp_path, capsys):
    assert run_train("stage1", "--data", tmp_path / "missing", "--out", tmp_path / "r1", *FAST) == 2
    (tmp_path / "empty").mkdir()
    assert run_train("stage1", "--data", tmp_path / "empty", "--out", tmp_path / "r2", *FAST) == 2
    assert run_train("stage1", "--data", phantom_dataset, "--out", tmp_path / "r3", *FAST, "learning_rat=1") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not a prepared dataset" in err and "learning_rat" in err

    assert run_train("stage1", "--data", _nan_dataset(phantom_dataset, tmp_path), "--out", tmp_path / "r4", *FAST,
                     "steps=5", "checkpoint_every=1") == 2
    assert "loss became nan" in capsys.readouterr().err

    run = tmp_path / "r5"
    assert run_train("stage1", "--data", phantom_dataset, "--out", run, *FAST, "steps=1") == 0
    assert run_train("stage1", "--data", phantom_dataset, "--out", run, *FAST, "steps=2") == 2  # no --resume
    assert run_train("stage2", "--data", phantom_dataset, "--out", run, *FAST, "steps=2", "--resume") == 2
    # A dataset with another structure set does not fit the run's network.
    lungs = tmp_path / "lungs"
    shutil.copytree(phantom_dataset, lungs)
    index = json.loads((lungs / "dataset.json").read_text())
    index["structures"] = ["left_lung", "right_lung", "airway", "vessels"]
    (lungs / "dataset.json").write_text(json.dumps(index))
    assert run_train("stage1", "--data", lungs, "--out", run, *FAST, "steps=2", "--resume") == 2
    assert "differ" in capsys.readouterr().err
    with pytest.raises(MedSynError, match="mixed_precision"):
        resolve_config(None, ["mixed_precision=fp8"])


def test_time_limit_checkpoints_and_stops_and_resume_continues(phantom_dataset, tmp_path, capsys):
    run = tmp_path / "limited"
    # A limit of zero-ish minutes: the first step already passes it.
    assert run_train("stage1", "--data", phantom_dataset, "--out", run, *FAST, "steps=50",
                     "time_limit_minutes=0.000001") == 0
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000001"]
    assert "time limit" in capsys.readouterr().err
    assert run_train("stage1", "--data", phantom_dataset, "--out", run, *FAST, "steps=3", "--resume") == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*"))[-1] == "step_00000003"


def test_export_takes_the_output_spacing_from_the_stage2_dataset(trained_runs, tmp_path, phantom_dataset):
    index = json.loads((phantom_dataset / "dataset.json").read_text())
    model = export([trained_runs / "stage1", trained_runs / "stage2"], tmp_path / "model")
    spacing = json.loads((model / "model_index.json").read_text())["spacing_mm"]
    assert spacing == pytest.approx(index.get("spacing_mm") or [320.0 / index["size"]] * 3)


def test_export_refuses_runs_on_datasets_of_different_structures(trained_runs, tmp_path, phantom_dataset):
    other = tmp_path / "other_data"
    shutil.copytree(phantom_dataset, other)
    index = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**index, "structures": index["structures"][:-1]}))
    run = tmp_path / "stage2"
    shutil.copytree(trained_runs / "stage2", run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "data": str(other)}))
    with pytest.raises(MedSynError, match="different structures"):
        export([trained_runs / "stage1", run], tmp_path / "model")


def test_stage2_condition_is_the_whole_volume_degradation_cropped(phantom_dataset):
    """The slab-only degradation equals nearest x1/f then x f of the whole volume, then the crop."""
    import torch.nn.functional as F

    from MedSynLib.data.datasets import DiffusionSamples, sample_generator
    from MedSynLib.data.prepared import PreparedDataset
    from MedSynLib.pipeline.channels import ChannelLayout

    dataset = PreparedDataset(phantom_dataset)
    layout = ChannelLayout(dataset.structures)
    samples = DiffusionSamples(dataset, stage="stage2", layout=layout,
                               seed=5, patch=(12, 16, 16), lowres_noise_max=0.0, augmentation=None)
    for k in range(6):
        item = samples[k]
        case = dataset.load(samples.case_index(k))
        full = layout.encode(torch.from_numpy(case.ct_hu), {n: torch.from_numpy(m) for n, m in case.masks.items()})
        low = F.interpolate(F.interpolate(full[None], scale_factor=0.5, mode="nearest"), size=full.shape[-3:],
                            mode="nearest")[0]
        generator = sample_generator(5, k)  # the draws of _stage2_patch, in its order
        z0, y0, x0 = (int(torch.randint(0, 32 - p + 1, (1,), generator=generator)) for p in (12, 16, 16))
        crop = (slice(None), slice(z0, z0 + 12), slice(y0, y0 + 16), slice(x0, x0 + 16))
        torch.testing.assert_close(item["cond"], low[crop])
        torch.testing.assert_close(item["x0"], full[crop])


def test_stage2_augmentation_resamples_both_ct_channels_as_images_and_the_masks_as_labels(phantom_dataset):
    import torch.nn.functional as F

    from MedSynLib.data.datasets import Augmentation, DiffusionSamples
    from MedSynLib.data.prepared import PreparedDataset
    from MedSynLib.pipeline.channels import ChannelLayout

    dataset = PreparedDataset(phantom_dataset)
    layout = ChannelLayout(dataset.structures, ct_window=(-150, 150))
    samples = DiffusionSamples(dataset, stage="stage2", layout=layout, seed=5, patch=(12, 16, 16), lowres_noise_max=0.0,
                               augmentation=Augmentation(zoom=(0.8, 1.2), rotate_degrees=20))
    scale, shift = layout.window_affine()
    for k in range(4):
        for volume in (samples[k]["x0"], samples[k]["cond"]):
            anatomy = volume[layout.ct_channels:]
            assert ((anatomy == 1) | (anatomy == -1)).all()  # labels: nearest
            full, window = volume[0], volume[1]
            # Where every in-plane neighbour is inside the window, bilinear resampling of both keeps window = affine(full).
            inside = ((scale * full + shift).abs() < 0.9).float()[:, None]
            inside = F.pad(-F.max_pool2d(-inside, 5, stride=1)[:, 0], (2, 2, 2, 2)) > 0.5
            assert inside.sum() > 20
            torch.testing.assert_close(window[inside], scale * full[inside] + shift, atol=0.02, rtol=0)


@pytest.mark.parametrize("mode", ["shrink", "additive"])
def test_the_condition_noise_shrinks_the_condition_only_as_the_reference_does(phantom_dataset, mode):
    """"shrink" (the reference's) is (1 - a) x + a N(0, 1): the condition comes scaled toward 0;
    "additive" is x + a N(0, 1): its densities are kept, only noise is added."""
    from MedSynLib.data.datasets import DiffusionSamples
    from MedSynLib.data.prepared import PreparedDataset
    from MedSynLib.pipeline.channels import ChannelLayout

    dataset = PreparedDataset(phantom_dataset)
    kwargs = {"stage": "stage2", "layout": ChannelLayout(dataset.structures), "seed": 3, "patch": (16, 32, 32),
              "augmentation": None}
    clean = DiffusionSamples(dataset, lowres_noise_max=0.0, **kwargs)
    noised = DiffusionSamples(dataset, lowres_noise_max=0.8, lowres_noise=mode, **kwargs)
    ratios = []
    for k in range(8):
        x, y = clean[k]["cond"][0].flatten(), noised[k]["cond"][0].flatten()  # the CT channel
        ratios.append(float((x * y).sum() / (x * x).sum()))  # least-squares scale of y on x: noise averages out
    if mode == "additive":
        assert np.mean(ratios) == pytest.approx(1.0, abs=0.05)
    else:
        assert np.mean(ratios) < 0.8  # E[1 - a] = 0.6 for a ~ U[0, 0.8)
    with pytest.raises(MedSynError, match="lowres_noise must be one of shrink, additive"):
        resolve_config(None, ["lowres_noise=multiplicative"])


def test_fine_tuning_starts_from_a_model_folder_with_a_new_pooled_text_path(trained_runs, phantom_dataset, tmp_path,
                                                                            capsys):
    model = export([trained_runs / "stage1", trained_runs / "stage2"], tmp_path / "model")
    run = tmp_path / "finetune"
    assert run_train("stage1", "--data", phantom_dataset, "--out", run, *FAST, "steps=1", "learning_rate=0",
                     "ema_decay=0", f"init_weights={model}", 'network={"pooled_text": true}') == 0
    start, before = latest_weights(run), load_file(model / "stage1" / "model.safetensors")
    assert all(torch.equal(start[k], v) for k, v in before.items())  # lr 0: still the exported weights
    assert not start["text_to_time.3.weight"].any()
    # Only the stage without a run comes from --base; the fine-tuned stage 1 replaces the model's.
    out = tmp_path / "tuned"
    assert run_train("export", "--run", run, "--base", model, "--out", out) == 0
    tuned = MedSynPipeline.from_pretrained(out)
    assert tuned.stage1.config.network.pooled_text and "from model" in tuned.config.description
    assert all(torch.equal(v, load_file(model / "stage2" / "model.safetensors")[k]) for k, v in tuned.stage2.network.state_dict().items())
    # A dataset indexed before a text-encoder setting existed still matches the base model's encoder.
    older = tmp_path / "older_data"
    shutil.copytree(phantom_dataset, older)
    index = json.loads((older / "dataset.json").read_text())
    index["text_encoder"].pop("keep_padding_states", None)
    (older / "dataset.json").write_text(json.dumps(index))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "data": str(older)}))
    assert export([run], tmp_path / "tuned_again", base=model).is_dir()
    capsys.readouterr()
    assert run_train("stage1", "--data", phantom_dataset, "--out", tmp_path / "wider", *FAST, "steps=1",
                     f"init_weights={model}", 'network={"dim": 16}') == 2
    assert "differs from this run's" in capsys.readouterr().err and not (tmp_path / "wider").exists()
    assert run_train("stage1", "--data", phantom_dataset, "--out", tmp_path / "nowhere", *FAST, "steps=1",
                     f"init_weights={tmp_path}") == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert run_train("export", "--base", model, "--out", tmp_path / "nothing") == 2
    assert "at least one --run" in capsys.readouterr().err and not (tmp_path / "nothing").exists()


def test_fine_tuning_adds_a_ct_window_channel_that_starts_unused_and_unpredicted(trained_runs, phantom_dataset,
                                                                                 tmp_path, capsys):
    model = export([trained_runs / "stage1", trained_runs / "stage2"], tmp_path / "model")
    for stage in ("stage1", "stage2"):
        assert run_train(stage, "--data", phantom_dataset, "--out", tmp_path / stage, *FAST, "steps=1",
                         "learning_rate=0", "ema_decay=0", f"init_weights={model}", "ct_window=[-150,150]") == 0
    windowed = MedSynPipeline.from_pretrained(export([tmp_path / "stage1", tmp_path / "stage2"], tmp_path / "windowed"))
    original = MedSynPipeline.from_pretrained(model)
    assert windowed.config.ct_window == (-150.0, 150.0) and windowed.config.layout.ct_channels == 2
    kept = [windowed.config.layout.channel_names.index(n) for n in original.config.layout.channel_names]
    generator = torch.Generator().manual_seed(0)
    for stage in ("stage1", "stage2"):
        old, new = getattr(original, stage).network, getattr(windowed, stage).network
        x = torch.randn((1, new.config.in_channels) + (16,) * 3, generator=generator)
        cond = torch.randn(x.shape, generator=generator) if new.config.cond_channels else None
        t = torch.tensor([0.4])
        with torch.no_grad():
            before = old(x[:, kept], t, cond=None if cond is None else cond[:, kept])
            after = new(x, t, cond=cond)
        torch.testing.assert_close(after[:, kept], before)
        assert not after[:, 1].any()  # the window channel: predicted 0 until trained
    given = np.zeros((windowed.stage2.config.size,) * 3, dtype=bool)
    given[2:6, 3:9, 4:12] = True
    name = windowed.config.structures[-1]
    volume = windowed.generate("Left pleural effusion.", seed=1, steps=2, stage2_steps=1, anatomy={name: given})
    assert volume.ct_hu.shape == given.shape and np.array_equal(volume.masks[name], given)  # imposed after 2 CT channels
    # Runs of different CT channels do not make one model.
    with pytest.raises(MedSynError, match="different CT channels"):
        export([tmp_path / "stage1", trained_runs / "stage2"], tmp_path / "mixed")
    assert run_train("stage1", "--data", phantom_dataset, "--out", tmp_path / "bad", *FAST, "steps=1",
                     "ct_window=[150,-150]") == 2
    assert "ct_window" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_timestep_range_bounds_the_training_times(phantom_dataset):
    from MedSynLib.data.datasets import DiffusionSamples
    from MedSynLib.data.prepared import PreparedDataset
    from MedSynLib.pipeline.channels import ChannelLayout

    dataset = PreparedDataset(phantom_dataset)
    samples = DiffusionSamples(dataset, stage="stage1", layout=ChannelLayout(dataset.structures),
                               seed=0, timestep_range=(0.4, 1.0))
    times = [float(samples[k]["t"]) for k in range(12)]
    assert min(times) >= 0.4 and max(times) <= 1.0
    with pytest.raises(MedSynError, match="timestep_range"):
        resolve_config(None, ["timestep_range=[0.5, 0.2]"])


def test_focus_weights_weigh_the_thin_structures_and_their_border_only():
    from MedSynLib.diffusion.objective import focus_weights, weighted_mse

    x0 = -torch.ones(1, 3, 8, 8, 8)
    x0[0, 2, 4, 4, 4] = 1.0  # one voxel of the structure in channel 2
    weights = focus_weights(x0, [2], 9.0)
    assert weights.shape == (1, 1, 8, 8, 8)
    assert weights[0, 0, 3:6, 3:6, 3:6].eq(10.0).all() and weights.sum() == 8**3 + 9.0 * 27
    assert focus_weights(x0, [1], 9.0).eq(1.0).all()  # channel 1 holds nothing
    assert focus_weights(x0, [2], 0.0) is None
    output, target = torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 8, 8, 8)
    assert torch.allclose(weighted_mse(output, target, torch.ones(1, 1, 8, 8, 8)), weighted_mse(output, target))
    error = torch.zeros_like(target)
    error[0, :, 4, 4, 4] = 1.0  # an error at the structure counts 10x as much as one elsewhere
    far = torch.zeros_like(target)
    far[0, :, 0, 0, 0] = 1.0
    assert weighted_mse(error, torch.zeros_like(target), weights) == pytest.approx(
        10 * weighted_mse(far, torch.zeros_like(target), weights))


def test_ct_weight_makes_a_ct_error_count_that_much_more_than_an_anatomy_error():
    from MedSynLib.diffusion.objective import DiffusionObjective
    from MedSynLib.diffusion.schedules import CosineSchedule

    x0, noise, t = torch.zeros(1, 4, 4, 4, 4), torch.zeros(1, 4, 4, 4, 4), torch.tensor([0.0])
    ct_error, mask_error = torch.zeros_like(x0), torch.zeros_like(x0)
    ct_error[:, 0] = 1.0
    mask_error[:, 1] = 1.0

    def loss(weight, error):
        objective = DiffusionObjective(CosineSchedule(), "x0", ct_weight=weight)
        return objective.loss(lambda x, t: x0 + error, x0, noise, t).item()

    assert loss(1.0, ct_error) == pytest.approx(loss(1.0, mask_error))
    assert loss(8.0, ct_error) == pytest.approx(8 * loss(8.0, mask_error))
    assert loss(8.0, ct_error) + 3 * loss(8.0, mask_error) == pytest.approx(1.0)  # a weighted mean: (8 + 3) / 11


def test_focus_weight_trains_and_needs_a_thin_structure_in_the_dataset(phantom_dataset, tmp_path, capsys):
    run = tmp_path / "focus"
    assert run_train("stage2", "--data", phantom_dataset, "--out", run, *FAST, "steps=2", "focus_weight=8") == 0
    assert all(np.isfinite(losses(run)))
    code = run_train("stage2", "--data", phantom_dataset, "--out", tmp_path / "none", *FAST, "steps=2",
                     "focus_weight=8", 'focus_structures=["heart"]')
    assert code != 0 and "focus_weight needs one of" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
