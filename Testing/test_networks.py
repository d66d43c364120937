"""The stage-1 and stage-2 UNets: shapes for every preset, text handling, checkpointing, configs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from MedSynLib.configuration import config_from_dict, config_to_dict
from MedSynLib.errors import MedSynError
from MedSynLib.networks.unet import UNet3D, UNet3DConfig
from MedSynLib.pipeline.presets import PRESETS, stage_configs

CHANNELS, TEXT_DIM = 8, 384


def _text(batch=1, tokens=192, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[:, :20] = True
    return torch.randn(batch, tokens, TEXT_DIM, generator=generator) * mask[..., None], mask


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_presets_run_forward_at_their_own_size(preset):
    s1, s2 = stage_configs(preset, channels=CHANNELS, text_dim=TEXT_DIM)
    torch.manual_seed(0)
    stage1, stage2 = UNet3D(s1.network).eval(), UNet3D(s2.network).eval()
    text, mask = _text()
    with torch.no_grad():
        x = torch.randn(1, CHANNELS, *(s1.size,) * 3)
        assert stage1(x, torch.rand(1), text=text, text_mask=mask).shape == x.shape
        # Stage 2 is applied to an 8-slice slab of its output size to keep the test quick.
        y = torch.randn(1, CHANNELS, 8, s2.size, s2.size)
        assert stage2(y, torch.rand(1), cond=torch.randn_like(y)).shape == y.shape


def test_paper_preset_builds_and_runs_at_full_size_on_meta_device():
    s1, s2 = stage_configs("paper", channels=CHANNELS, text_dim=768)
    assert (s1.network.dim, s1.network.dim_mults, s1.size, s1.network.num_middle_blocks) == (160, (1, 2, 4, 8), 64, 4)
    assert (s2.network.dim, s2.size) == (56, 256)
    with torch.device("meta"):
        stage1, stage2 = UNet3D(s1.network), UNet3D(s2.network)
        out1 = stage1(torch.empty(1, CHANNELS, 64, 64, 64), torch.rand(1), text=torch.empty(1, 192, 768))
        x2 = torch.empty(1, CHANNELS, 256, 256, 256)
        out2 = stage2(x2, torch.rand(1), cond=x2)
    assert out1.shape == (1, CHANNELS, 64, 64, 64) and out2.shape == x2.shape
    params1 = sum(p.numel() for p in stage1.parameters())
    params2 = sum(p.numel() for p in stage2.parameters())
    # The reference: 716M (stage 1) and 54M (stage 2); this family is within 10 % / 15 %.
    assert 640e6 < params1 < 720e6, params1
    assert 45e6 < params2 < 60e6, params2


def test_every_preset_is_divisible_at_its_sizes():
    for name in PRESETS:
        s1, s2 = stage_configs(name, channels=CHANNELS, text_dim=TEXT_DIM)
        assert s1.size % s1.network.spatial_divisor == 0 and s2.size % s2.network.spatial_divisor == 0
        assert s2.size % s1.size == 0


@pytest.fixture(scope="module")
def stage1():
    s1, _ = stage_configs("tiny", channels=CHANNELS, text_dim=TEXT_DIM)
    torch.manual_seed(1)
    return UNet3D(s1.network).eval()


def test_text_changes_the_output_and_null_text_equals_no_text(stage1):
    x, t = torch.randn(2, CHANNELS, 16, 16, 16), torch.rand(2)
    text, mask = _text(2)
    with torch.no_grad():
        conditional = stage1(x, t, text=text, text_mask=mask)
        dropped = stage1(x, t, text=text, text_mask=mask, drop_text=torch.tensor([False, True]))
        no_text = stage1(x, t)
    assert torch.allclose(dropped[0], conditional[0], atol=1e-6)
    assert torch.allclose(dropped[1], no_text[1], atol=1e-6)
    assert not torch.allclose(conditional[1], no_text[1], atol=1e-4)


def test_padding_tokens_are_ignored(stage1):
    x, t = torch.randn(1, CHANNELS, 16, 16, 16), torch.rand(1)
    text, mask = _text()
    noisy_padding = text.clone()
    noisy_padding[:, 20:] = torch.randn_like(noisy_padding[:, 20:])
    with torch.no_grad():
        assert torch.allclose(stage1(x, t, text=text, text_mask=mask), stage1(x, t, text=noisy_padding, text_mask=mask), atol=1e-6)


def test_pooled_text_starts_as_a_no_op_and_then_carries_the_report(stage1):
    """A pooled-text path added to a trained network changes nothing until trained; then
    the report reaches the output through it (and padding tokens still do not)."""
    pooled = UNet3D(replace(stage1.config, pooled_text=True)).eval()
    missing, unexpected = pooled.load_state_dict(stage1.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("text_to_time.") for k in missing)
    x, t = torch.randn(1, CHANNELS, 16, 16, 16), torch.rand(1)
    text, mask = _text()
    with torch.no_grad():
        assert torch.equal(pooled(x, t, text=text, text_mask=mask), stage1(x, t, text=text, text_mask=mask))
        torch.nn.init.normal_(pooled.text_to_time[-1].weight)
        changed = pooled(x, t, text=text, text_mask=mask)
        noisy_padding = text.clone()
        noisy_padding[:, 20:] = torch.randn_like(noisy_padding[:, 20:])
        assert torch.allclose(pooled(x, t, text=noisy_padding, text_mask=mask), changed, atol=1e-6)
    assert not torch.allclose(changed, stage1(x, t, text=text, text_mask=mask), atol=1e-4)
    with pytest.raises(ValueError, match="pooled_text needs text_dim"):
        UNet3DConfig(in_channels=8, out_channels=8, pooled_text=True)


def test_a_residual_stage_2_starts_as_the_condition_and_learns_a_correction():
    """The untrained residual network returns the upsampled volume itself (at its densities); once
    its last layer is trained it adds a correction; it refuses what it cannot be."""
    _, stage2 = stage_configs("tiny", channels=CHANNELS, text_dim=TEXT_DIM)
    network = UNet3D(replace(stage2.network, residual=True)).eval()
    x, t, cond = torch.randn(1, CHANNELS, 16, 16, 16), torch.rand(1), torch.rand(1, CHANNELS, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(network(x, t, cond=cond), cond)
        torch.nn.init.normal_(network.final_conv.weight, std=0.1)
        corrected = network(x, t, cond=cond)
        plain = UNet3D(stage2.network).eval()
        plain.load_state_dict(network.state_dict())
        assert torch.allclose(corrected, plain(x, t, cond=cond) + cond, atol=1e-6)
    assert not torch.allclose(corrected, cond, atol=1e-3)
    with pytest.raises(ValueError, match="residual needs a condition"):
        UNet3DConfig(in_channels=8, out_channels=8, residual=True)
    with pytest.raises(ValueError, match="residual network predicts x0"):
        replace(stage2, network=replace(stage2.network, residual=True),
                diffusion=replace(stage2.diffusion, prediction_type="epsilon"))


def test_gradient_checkpointing_gives_same_values_and_gradients(stage1):
    x, t = torch.randn(1, CHANNELS, 16, 16, 16), torch.rand(1)
    text, mask = _text()
    stage1.train()
    try:
        grads = []
        for flag in (False, True):
            stage1.gradient_checkpointing = flag
            stage1.zero_grad()
            out = stage1(x, t, text=text, text_mask=mask)
            out.square().mean().backward()
            grads.append((out.detach(), stage1.init_conv.weight.grad.clone()))
        assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
        assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    finally:
        stage1.gradient_checkpointing = False
        stage1.eval()


def test_bad_inputs_are_rejected_with_clear_errors(stage1):
    with pytest.raises(ValueError, match="expected input"):
        stage1(torch.randn(1, 3, 16, 16, 16), torch.rand(1))
    with pytest.raises(ValueError, match="divisible"):
        stage1(torch.randn(1, CHANNELS, 16, 15, 15), torch.rand(1))
    with pytest.raises(ValueError, match="takes no"):
        stage1(torch.randn(1, CHANNELS, 16, 16, 16), torch.rand(1), cond=torch.randn(1, CHANNELS, 16, 16, 16))
    with pytest.raises(ValueError, match="text features"):
        stage1(torch.randn(1, CHANNELS, 16, 16, 16), torch.rand(1), text=torch.randn(1, 10, TEXT_DIM))
    with pytest.raises(ValueError, match="downsampling"):
        UNet3DConfig(in_channels=1, out_channels=1, downsampling="diagonal")


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    config = UNet3DConfig(in_channels=8, out_channels=8, dim_mults=(1, 2), text_dim=384)
    data = json.loads(json.dumps(config_to_dict(config)))
    assert config_from_dict(UNet3DConfig, data) == config
    with pytest.raises(MedSynError, match="dim_mult"):
        config_from_dict(UNet3DConfig, {**data, "dim_mult": [1, 2]})
