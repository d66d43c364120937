"""MedSynPipeline: folders, determinism, anatomy conditioning and tiled stage 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from MedSynLib.diffusion.consistency import LowFrequencyConsistency, gaussian_blur, interpolate_samples
from MedSynLib.errors import MedSynError
from MedSynLib.pipeline import sampling
from MedSynLib.pipeline.generation import MedSynPipeline
from MedSynLib.pipeline.sampling import resolve_device, resolve_dtype, super_resolve
from MedSynLib.pipeline.tiling import DEFAULT_TILING, Tiling, apply_network, automatic_tiling

REPORT = "Small left pleural effusion. No nodules."


@pytest.fixture(scope="module")
def result(tiny_pipeline):
    return tiny_pipeline.generate(REPORT, seed=3, guidance=2.0)


def test_result_is_a_ct_with_anatomy_on_the_output_grid(tiny_pipeline, result):
    size = tiny_pipeline.stage2.config.size
    assert result.ct_hu.shape == (size,) * 3 and result.ct_hu.dtype == np.int16
    assert result.ct_hu.min() >= -1024 and result.ct_hu.max() <= 600
    assert set(result.masks) == set(tiny_pipeline.config.structures)
    assert all(m.shape == (size,) * 3 and m.dtype == bool for m in result.masks.values())
    assert result.metadata["synthetic"] is True and result.metadata["model_trained"] is False
    assert result.geometry.shape == (size,) * 3


def test_same_seed_same_volume_other_seed_other_volume(tiny_pipeline, result):
    again = tiny_pipeline.generate(REPORT, seed=3, guidance=2.0)
    assert np.array_equal(again.ct_hu, result.ct_hu)
    assert all(np.array_equal(again.masks[n], result.masks[n]) for n in result.masks)
    other = tiny_pipeline.generate(REPORT, seed=4, guidance=2.0)
    assert not np.array_equal(other.ct_hu, result.ct_hu)


def test_the_report_and_the_guidance_change_the_volume(tiny_pipeline, result):
    other_report = tiny_pipeline.generate("Enlarged heart.", seed=3, guidance=2.0)
    unguided = tiny_pipeline.generate(REPORT, seed=3, guidance=1.0)
    assert not np.array_equal(other_report.ct_hu, result.ct_hu)
    assert not np.array_equal(unguided.ct_hu, result.ct_hu)


def test_save_and_load_give_identical_outputs(tiny_pipeline, tiny_model_dir, result):
    loaded = MedSynPipeline.from_pretrained(tiny_model_dir)
    assert loaded.config == tiny_pipeline.config
    assert loaded.stage1.config == tiny_pipeline.stage1.config and loaded.stage2.config == tiny_pipeline.stage2.config
    again = loaded.generate(REPORT, seed=3, guidance=2.0)
    assert np.array_equal(again.ct_hu, result.ct_hu)


def _blob_anatomy(structures, size, seed=0):
    """Disjoint random boxes per structure: an anatomy the untrained model would never produce."""
    rng = np.random.default_rng(seed)
    masks = {}
    for name in structures:
        mask = np.zeros((size,) * 3, bool)
        z, y, x = rng.integers(0, size - 8, 3)
        mask[z : z + 8, y : y + 6, x : x + 5] = True
        masks[name] = mask
    return masks


def test_anatomy_conditioning_keeps_the_given_masks_at_both_stages(tiny_pipeline, result):
    size = tiny_pipeline.stage2.config.size
    anatomy = _blob_anatomy(tiny_pipeline.config.structures, size)
    conditioned = tiny_pipeline.generate(REPORT, seed=3, guidance=2.0, anatomy=anatomy)
    for name, mask in anatomy.items():
        assert np.array_equal(conditioned.masks[name], mask), name
    assert conditioned.metadata["anatomy_given"] == sorted(anatomy)
    # The CT is generated for that anatomy: it differs from the unconditioned one of the same seed.
    assert np.abs(conditioned.ct_hu.astype(float) - result.ct_hu).mean() > 1


def test_partial_anatomy_imposes_only_the_given_structures(tiny_pipeline, result):
    size = tiny_pipeline.stage2.config.size
    airway = _blob_anatomy(["airway"], size, seed=1)
    conditioned = tiny_pipeline.generate(REPORT, seed=3, guidance=2.0, anatomy=airway)
    assert np.array_equal(conditioned.masks["airway"], airway["airway"])
    assert conditioned.metadata["anatomy_given"] == ["airway"]
    free = [n for n in tiny_pipeline.config.structures if n != "airway"]
    assert any(not np.array_equal(conditioned.masks[n], np.zeros_like(airway["airway"])) for n in free)


def test_anatomy_inputs_are_checked(tiny_pipeline):
    size = tiny_pipeline.stage2.config.size
    anatomy = _blob_anatomy(tiny_pipeline.config.structures, size)
    with pytest.raises(MedSynError, match="does not generate"):
        tiny_pipeline.generate(REPORT, anatomy={"left_lung": anatomy["airway"]})
    with pytest.raises(MedSynError, match="shape"):
        tiny_pipeline.generate(REPORT, anatomy={k: v[:-1] for k, v in anatomy.items()})
    with pytest.raises(MedSynError, match="empty"):
        tiny_pipeline.generate(REPORT, anatomy={k: np.zeros_like(v) for k, v in anatomy.items()})


def test_tiling_stitches_exactly_for_a_pointwise_function():
    x = torch.randn(1, 3, 24, 20, 20)
    for tiling in (Tiling((8, -1, -1), 0.5), Tiling((8, 8, 8), 0.25, "constant")):
        assert torch.allclose(apply_network(lambda v: 2 * v + 1, x, tiling), 2 * x + 1, atol=1e-5)


def test_tiled_stage2_agrees_with_the_whole_volume(tiny_pipeline):
    network, channels = tiny_pipeline.stage2.network, tiny_pipeline.config.layout.num_channels
    x = torch.randn(1, 2 * channels, 64, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])

    def run(tile):
        return network(tile[:, :channels], t, cond=tile[:, channels:])

    with torch.no_grad():
        whole = run(x)
        tiled = apply_network(run, x, Tiling((32, -1, -1), 0.5))
    # Slabs see other GroupNorm statistics and lose depth context at their ends, so they agree
    # only approximately; a stitching error would be of the order of the output's spread.
    error = (tiled - whole).abs()
    assert error.mean() < 0.1 * whole.std()
    assert error[:, :, 8:-8].mean() <= error.mean() * 1.5


def test_automatic_tiling_tiles_only_a_pass_that_would_not_fit():
    gib = 2**30
    # The paper preset's stage 2 (dim 56) at 256^3 does not fit in 24 GiB whole; the demo's (dim 8) at 128^3 does.
    assert automatic_tiling(56, 256, 24 * gib) == DEFAULT_TILING
    assert automatic_tiling(8, 128, 24 * gib) is None
    assert automatic_tiling(8, 128, gib // 2) == DEFAULT_TILING
    assert automatic_tiling(56, 64, gib // 100) is None  # one tile would be the whole volume
    assert automatic_tiling(56, 256, None) is None  # memory unknown: the user decides with --tile


def test_the_pipeline_picks_tiling_from_its_stage2_network(tiny_pipeline):
    assert tiny_pipeline.automatic_tiling("cpu") is None  # 32^3 is smaller than one tile


@pytest.mark.parametrize(("bf16", "amx", "expected"), [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                        (False, False, "float32")])
def test_auto_dtype_is_bfloat16_only_on_cpus_doing_it_in_hardware(monkeypatch, bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("auto", torch.device("cuda")) == "float32"  # not measured on a GPU
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"
    with pytest.raises(MedSynError, match="dtype must be"):
        resolve_dtype("int8", torch.device("cpu"))


def test_generation_records_the_dtype_it_ran_in(tiny_pipeline):
    result = tiny_pipeline.generate(REPORT, seed=0, steps=1, stage2_steps=1, dtype="auto")
    assert result.metadata["dtype"] == resolve_dtype("auto", torch.device("cpu"))


def test_loading_errors_are_one_line_medsyn_errors(tiny_model_dir, tmp_path):
    import shutil

    with pytest.raises(MedSynError, match="does not exist"):
        MedSynPipeline.from_pretrained(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "stage2" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(MedSynError, match="cannot read"):
        MedSynPipeline.from_pretrained(broken)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_model_dir, mismatched)
    config_path = mismatched / "stage1" / "config.json"
    config = json.loads(config_path.read_text())
    config["network"]["dim"] = 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(MedSynError, match="does not fit") as error:
        MedSynPipeline.from_pretrained(mismatched)
    assert "\n" not in str(error.value)

    config["network"]["dimension"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(MedSynError, match="unknown key"):
        MedSynPipeline.from_pretrained(mismatched)


def test_devices_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(MedSynError, match="CUDA"):
        resolve_device("cuda")
    with pytest.raises(MedSynError, match="unknown device"):
        resolve_device("tpu9")


def test_stage2_consistency_is_wired_deterministic_recorded_and_checked(tiny_pipeline, result, monkeypatch):
    made = []

    def recorded(*args, **kwargs):
        made.append(LowFrequencyConsistency(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sampling, "LowFrequencyConsistency", recorded)
    kept = tiny_pipeline.generate(REPORT, seed=3, guidance=2.0, stage2_consistency=1.5)
    layout = tiny_pipeline.config.layout
    assert [(c.channels, c.exempt, c.tissue, c.sigma) for c in made] == [
        (list(range(layout.ct_channels)), layout.thin_structure_channels, layout.lung_channels, 1.5)]
    assert layout.thin_structure_channels == layout.channels_of(["airway", "vessels"])
    assert layout.lung_channels == layout.channels_of([s for s in layout.structures if s not in ("airway", "vessels")])
    assert kept.metadata["stage2_consistency"] == 1.5 and result.metadata["stage2_consistency"] == 0.0
    assert np.array_equal(kept.ct_hu, tiny_pipeline.generate(REPORT, seed=3, guidance=2.0, stage2_consistency=1.5).ct_hu)
    with pytest.raises(MedSynError, match="consistency"):
        tiny_pipeline.generate(REPORT, seed=3, stage2_consistency=-1.0)


def test_stage2_consistency_keeps_the_low_frequencies_of_the_low_res_volume(tiny_pipeline):
    stage2, layout = tiny_pipeline.stage2, tiny_pipeline.config.layout
    size, low_size = stage2.config.size, tiny_pipeline.stage1.config.size
    generator = torch.Generator().manual_seed(0)
    low = (0.5 * gaussian_blur(torch.randn(1, layout.num_channels, *(low_size,) * 3, generator=generator), 1.0)).clamp(-1, 1)
    x_T = torch.randn(1, layout.num_channels, *(size,) * 3, generator=generator)
    target = gaussian_blur(interpolate_samples(low[:, :1], size // low_size), 1.5)

    def low_frequency_error(consistency):
        with torch.inference_mode():
            high = super_resolve(stage2.network, stage2.config, low, x_T, 2, ct_channels=layout.ct_channels,
                                 consistency=consistency)
        return (gaussian_blur(high[:, :1], 1.5) - target).abs().mean().item()

    free, kept = low_frequency_error(0.0), low_frequency_error(1.5)
    assert kept < 0.3 * free and kept < 0.02  # the untrained network's output is its own; the band is stage 1's
