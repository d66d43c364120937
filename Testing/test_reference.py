"""The reference architecture and the import of the reference's checkpoints (tiny sizes)."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from MedSynLib.cli.convert import main
from MedSynLib.errors import MedSynError, run_command
from MedSynLib.networks.reference import (
    UP_ORDERS,
    ReferenceUNet3D,
    count_parameters,
    reference_stage1_config,
    reference_stage2_config,
)
from MedSynLib.pipeline.convert import (
    convert_reference,
    load_reference_network,
    match_state_dict,
    read_checkpoint,
    strip_prefixes,
)
from MedSynLib.pipeline.generation import MedSynPipeline

TEXT_DIM = 384  # the embedded MiniLM encoder (CXR-BERT's 768 is not downloadable here)
STAGE1 = reference_stage1_config(dim=8, dim_mults=(1, 2), text_dim=TEXT_DIM, attn_heads=2, attn_head_dim=8,
                                 num_middle_blocks=2, init_kernel=3)
STAGE2 = reference_stage2_config(dim=8, dim_mults=(1, 2), attn_heads=2, attn_head_dim=8, init_kernel=3)


class NotATensor:
    """A custom object: a pickle holding it must be refused."""


def random_state(config, seed: int) -> dict[str, torch.Tensor]:
    """A reference-layout state dict with random values (shared weights stay shared)."""
    torch.manual_seed(seed)
    network = ReferenceUNet3D(config)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return {k: v.clone() for k, v in network.state_dict().items()}


# ------------------------------------------------------------------ the layout
def test_released_sizes_have_the_reference_parameter_counts():
    assert count_parameters(reference_stage1_config()) == 716_215_684  # ~716.2M
    assert count_parameters(reference_stage2_config()) == 54_307_908  # ~54.3M


def test_state_dict_names_follow_the_reference():
    with torch.device("meta"):
        s1, s2 = ReferenceUNet3D(reference_stage1_config()), ReferenceUNet3D(reference_stage2_config())
    shapes1 = {k: tuple(v.shape) for k, v in s1.state_dict().items()}
    assert shapes1["init_conv.weight"] == (160, 4, 7, 7, 7)
    assert shapes1["null_cond_emb"] == (1, 192, 768)
    assert shapes1["downs.0.2.block1.proj.weight"] == (160, 160, 3, 3, 3)
    assert shapes1["downs.2.3.weight"] == (640, 640, 1, 4, 4)
    assert shapes1["mid_spatial_attn4.fn.fn.fn.to_qkv.weight"] == (768, 1280)
    assert shapes1["mid_cross_attn1.fn.fn.to_q.weight"] == (256, 1280, 1, 1)
    assert shapes1["mid_cross_attn1.fn.fn.to_kv.weight"] == (512, 768)
    assert shapes1["mid_temporal_attn3.mlp.1.weight"] == (2560, 640)
    assert shapes1["ups.0.0.block1.proj.weight"] == (640, 2560, 1, 3, 3)
    assert shapes1["ups.2.3.weight"] == (160, 160, 1, 4, 4) and "ups.3.3.weight" not in shapes1
    assert shapes1["final_conv.0.block1.proj.weight"] == (160, 320, 1, 3, 3)
    assert "final_conv.0.mlp.1.weight" not in shapes1 and shapes1["final_conv.1.weight"] == (4, 160, 1, 1, 1)
    shapes2 = {k: tuple(v.shape) for k, v in s2.state_dict().items()}
    assert shapes2["init_conv0.weight"] == (56, 8, 7, 7, 7)
    assert shapes2["downs.0.4.block1.proj.weight"] == (56, 56, 3, 3, 3) and shapes2["downs.0.5.weight"][2:] == (1, 4, 4)
    assert shapes2["mid_spatial_attn.fn.fn.fn.to_qkv.weight"] == (384, 448)
    assert "mid_temporal_conv.block1.proj.weight" in shapes2 and "final_conv0.1.weight" in shapes2
    assert not any(k.startswith(("null_cond_emb", "mid_cross")) for k in shapes2)


def test_the_middle_spatial_attention_is_shared_as_in_the_reference():
    network = ReferenceUNet3D(STAGE1)
    state = network.state_dict()
    names = [f"mid_spatial_attn{n}.fn.fn.fn.to_qkv.weight" for n in (1, 2)]
    assert state[names[0]].data_ptr() == state[names[1]].data_ptr()
    assert state["mid_spatial_attn1.fn.norm.gamma"].data_ptr() != state["mid_spatial_attn2.fn.norm.gamma"].data_ptr()


# ------------------------------------------- the forward, against plain functions
def _res(s, p, x, temb, kernel):
    pad = tuple(k // 2 for k in kernel)

    def block(q, h, scale_shift=None):
        h = F.conv3d(h, s[q + "proj.weight"], s[q + "proj.bias"], padding=pad)
        h = F.group_norm(h, 8, s[q + "norm.weight"], s[q + "norm.bias"])
        if scale_shift is not None:
            h = h * (scale_shift[0] + 1) + scale_shift[1]
        return F.silu(h)

    scale_shift = None
    if temb is not None:
        scale_shift = F.linear(F.silu(temb), s[p + "mlp.1.weight"], s[p + "mlp.1.bias"])[..., None, None, None].chunk(2, 1)
    h = block(p + "block2.", block(p + "block1.", x, scale_shift))
    skip = F.conv3d(x, s[p + "res_conv.weight"], s[p + "res_conv.bias"]) if p + "res_conv.weight" in s else x
    return h + skip


def _layer_norm(x, gamma):
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * gamma


def _softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _spatial_attention(s, p, x, heads):
    b, c, d, h, w = x.shape
    tokens = _layer_norm(x, s[p + "fn.norm.gamma"]).permute(0, 2, 3, 4, 1).reshape(b, d, h * w, c)
    q, k, v = (t.reshape(b, d, h * w, heads, -1).transpose(2, 3) for t in (tokens @ s[p + "fn.fn.fn.to_qkv.weight"].T).chunk(3, -1))
    out = _softmax_attention(q, k, v).transpose(2, 3).reshape(b, d, h * w, -1) @ s[p + "fn.fn.fn.to_out.weight"].T
    return x + out.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)


def _cross_attention(s, p, x, text, heads):
    b, c, d, h, w = x.shape
    normed = _layer_norm(x, s[p + "fn.norm.gamma"])
    q = torch.einsum("oc,bcdhw->bdhwo", s[p + "fn.fn.to_q.weight"][:, :, 0, 0], normed).reshape(b, d, h * w, heads, -1)
    k, v = (text @ s[p + "fn.fn.to_kv.weight"].T).chunk(2, -1)
    k, v = (t.reshape(b, 1, t.shape[1], heads, -1).transpose(2, 3) for t in (k, v))
    out = _softmax_attention(q.transpose(2, 3), k, v).transpose(2, 3).reshape(b, d, h, w, -1)
    out = torch.einsum("oi,bdhwi->bodhw", s[p + "fn.fn.to_out.weight"][:, :, 0, 0], out) + s[p + "fn.fn.to_out.bias"][:, None, None, None]
    return x + out


def reference_forward(s, config, x, t, text=None, cond=None):
    """The reference's forward (its evaluation or training scripts' up order), with torch.nn.functional only."""
    low = config.variant == "low_res"
    flat, cube = (1, 3, 3), (3, 3, 3)
    half = config.dim // 2
    angles = (t * 1000)[:, None] * torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))[None]
    temb = torch.cat([angles.sin(), angles.cos()], -1)
    temb = F.linear(F.gelu(F.linear(temb, s["time_mlp.1.weight"], s["time_mlp.1.bias"])), s["time_mlp.3.weight"], s["time_mlp.3.bias"])
    init = "init_conv" if low else "init_conv0"
    x = F.conv3d(x if low else torch.cat([cond, x], 1), s[init + ".weight"], s[init + ".bias"], padding=config.init_kernel // 2)
    r, skips, levels = x, [], len(config.dim_mults)
    i3d, idown = (2, 3) if low else (4, 5)
    for n in range(levels):
        x = _res(s, f"downs.{n}.1.", _res(s, f"downs.{n}.0.", x, temb, flat), temb, flat)
        skips.append(x)
        if n < levels - 1:
            x = F.conv3d(x, s[f"downs.{n}.{idown}.weight"], s[f"downs.{n}.{idown}.bias"], stride=(1, 2, 2), padding=(0, 1, 1))
        x = _res(s, f"downs.{n}.{i3d}.", x, temb, cube)
    x = _res(s, "mid_block1.", x, temb, flat)
    if low:
        for n in range(1, config.num_middle_blocks + 1):
            x = _spatial_attention(s, f"mid_spatial_attn{n}.", x, config.attn_heads)
            x = _cross_attention(s, f"mid_cross_attn{n}.", x, text, config.attn_heads)
            x = _res(s, f"mid_temporal_attn{n}.", x, temb, cube)
    else:
        x = _res(s, "mid_temporal_conv.", _spatial_attention(s, "mid_spatial_attn.", x, config.attn_heads), temb, cube)
    x = _res(s, "mid_block2.", x, temb, flat)
    for n in range(levels):
        def upsample(h, n=n):
            if n == levels - 1:
                return h
            return F.conv_transpose3d(h, s[f"ups.{n}.{idown}.weight"], s[f"ups.{n}.{idown}.bias"], stride=(1, 2, 2), padding=(0, 1, 1))

        x = _res(s, f"ups.{n}.0.", torch.cat([x, skips.pop()], 1), temb, flat)
        if config.up_order == "training":  # train_*.py: upsample right after the first block
            x = upsample(x)
        x = _res(s, f"ups.{n}.{i3d}.", _res(s, f"ups.{n}.1.", x, temb, flat), temb, cube)
        if config.up_order == "evaluation":  # eval_*.py: upsample last
            x = upsample(x)
    final = "final_conv" if low else "final_conv0"
    x = _res(s, final + ".0.", torch.cat([x, r], 1), None, flat)
    return F.conv3d(x, s[final + ".1.weight"], s[final + ".1.bias"])


@pytest.mark.parametrize("up_order", UP_ORDERS)
@pytest.mark.parametrize("config", [STAGE1, STAGE2], ids=["stage1", "stage2"])
def test_forward_matches_a_functional_computation(config, up_order):
    config = dataclasses.replace(config, up_order=up_order)
    state = random_state(config, seed=1)
    network = ReferenceUNet3D(config).eval()
    network.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.9])
    text = torch.randn(2, config.text_tokens, TEXT_DIM, generator=g) if config.text_dim else None
    cond = None if config.text_dim else torch.randn(2, 4, 3, 8, 8, generator=g)
    with torch.no_grad():
        ours = network(x, t, text=text, cond=cond)
        expected = reference_forward(state, config, x, t, text=text, cond=cond)
    assert ours.shape == x.shape
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()
    other = dataclasses.replace(config, up_order=next(o for o in UP_ORDERS if o != up_order))
    with torch.no_grad():  # the same weights, a different function
        assert not torch.allclose(reference_forward(state, other, x, t, text=text, cond=cond), expected, atol=1e-2)


def test_up_order_is_a_checked_config_field_defaulting_to_the_evaluation_scripts():
    assert reference_stage1_config().up_order == reference_stage2_config().up_order == "evaluation"
    with pytest.raises(ValueError, match="up_order"):
        reference_stage1_config(up_order="train")


def test_drop_text_uses_the_null_embedding():
    state = random_state(STAGE1, seed=2)
    network = ReferenceUNet3D(STAGE1).eval()
    network.load_state_dict(state)
    x, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5])
    text = torch.randn(1, 192, TEXT_DIM)
    with torch.no_grad():
        dropped = network(torch.cat([x, x]), torch.cat([t, t]), text=text.expand(2, -1, -1), drop_text=torch.tensor([False, True]))
        assert torch.allclose(dropped[1:], reference_forward(state, STAGE1, x, t, text=state["null_cond_emb"]), atol=1e-4)
        assert torch.allclose(dropped[:1], network(x, t, text=text), atol=1e-5)


# ---------------------------------------------------------------- conversion
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_ckpts")
    s1_model, s1_ema = random_state(STAGE1, 10), random_state(STAGE1, 11)
    s2 = random_state(STAGE2, 12)
    # Stage 1 as an accelerate folder: model first, EMA second, wrapped in GaussianDiffusion.
    folder = root / "stage1_ckpt"
    folder.mkdir()
    torch.save({"denoise_fn." + k: v for k, v in s1_model.items()} | {"betas": torch.rand(1000)}, folder / "pytorch_model.bin")
    save_file({"denoise_fn." + k: v.contiguous().clone() for k, v in s1_ema.items()}, folder / "model_1.safetensors")
    torch.save({"step": 3}, folder / "optimizer.bin")
    # Stage 2 as a plain .bin with DDP + EMA wrappers.
    torch.save({"module.ema_model.denoise_fn." + k: v for k, v in s2.items()}, root / "stage2.bin")
    # And as an accelerate folder of its training run: trained weights first, EMA second.
    s2_model, s2_ema = random_state(STAGE2, 13), random_state(STAGE2, 14)
    stage2_folder = root / "stage2_ckpt"
    stage2_folder.mkdir()
    torch.save({"denoise_fn." + k: v for k, v in s2_model.items()}, stage2_folder / "pytorch_model.bin")
    torch.save({"denoise_fn." + k: v for k, v in s2_ema.items()}, stage2_folder / "pytorch_model_1.bin")
    return {"root": root, "stage1": folder, "stage2": root / "stage2.bin", "s1_model": s1_model, "s1_ema": s1_ema,
            "s2": s2, "stage2_folder": stage2_folder, "s2_model": s2_model, "s2_ema": s2_ema}


def test_accelerate_folder_gives_ema_or_model_weights(checkpoints):
    ema = strip_prefixes(read_checkpoint(checkpoints["stage1"], "ema"))
    model = strip_prefixes(read_checkpoint(checkpoints["stage1"], "model"))
    assert ema.keys() == model.keys() - {"betas"} == checkpoints["s1_ema"].keys()  # prefixes stripped
    assert all(torch.equal(ema[k], checkpoints["s1_ema"][k]) for k in ema)
    assert all(torch.equal(model[k], v) for k, v in checkpoints["s1_model"].items())


def test_convert_writes_a_model_folder_that_generates(checkpoints, tmp_path):
    out = tmp_path / "model"
    convert_reference(checkpoints["stage1"], checkpoints["stage2"], out, text_encoder="embedded",
                      stage1_network=STAGE1, stage2_network=STAGE2, stage1_size=8, stage2_size=16)
    index = json.loads((out / "model_index.json").read_text())
    assert index["channel_encoding"] == "reference" and index["trained"] is True
    stage1 = json.loads((out / "stage1" / "config.json").read_text())
    assert stage1["architecture"] == "reference" and stage1["diffusion"]["num_steps"] == 50
    assert stage1["diffusion"]["prediction_type"] == "x0" and stage1["diffusion"]["schedule"] == "cosine"
    assert stage1["diffusion"]["sampler"] == "ddim_reference"
    assert json.loads((out / "stage2" / "config.json").read_text())["diffusion"]["num_steps"] == 20

    pipeline = MedSynPipeline.from_pretrained(out)
    assert isinstance(pipeline.stage1.network, ReferenceUNet3D) and pipeline.stage1.config.network == STAGE1
    loaded = pipeline.stage1.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in checkpoints["s1_ema"].items())  # every key, exactly
    assert all(torch.equal(pipeline.stage2.network.state_dict()[k], v) for k, v in checkpoints["s2"].items())
    result = pipeline.generate("Small left pleural effusion.", seed=0, steps=2, stage2_steps=2)
    assert result.ct_hu.shape == (16,) * 3 and result.ct_hu.dtype == np.int16
    assert set(result.masks) == set(pipeline.config.structures)


def _stage_state(network):
    return {k: v.clone() for k, v in network.state_dict().items()}


def test_each_stage_defaults_to_the_weights_the_authors_scripts_load(checkpoints, tmp_path):
    """Stage 1: EMA (eval_low_res samples with its EMA); stage 2: index 0 = trained (eval_super_res
    prepares one model); --weights overrides both; the report says which."""
    kwargs = {"text_encoder": "embedded", "stage1_network": STAGE1, "stage2_network": STAGE2,
              "stage1_size": 8, "stage2_size": 16}
    pipeline, report = convert_reference(checkpoints["stage1"], checkpoints["stage2_folder"], tmp_path / "a", **kwargs)
    loaded1, loaded2 = _stage_state(pipeline.stage1.network), _stage_state(pipeline.stage2.network)
    assert all(torch.equal(loaded1[k], v) for k, v in checkpoints["s1_ema"].items())
    assert all(torch.equal(loaded2[k], v) for k, v in checkpoints["s2_model"].items())
    assert report[0].startswith("stage1: EMA weights from") and "model_1.safetensors" in report[0]
    assert report[1].startswith("stage2: trained (non-EMA) weights from") and "pytorch_model.bin" in report[1]
    assert "eval_low_res_given_prompt.py" in report[0] and "eval_super_res.py" in report[1]
    pipeline, report = convert_reference(checkpoints["stage1"], checkpoints["stage2_folder"], tmp_path / "b",
                                         weights="ema", **kwargs)
    loaded2 = _stage_state(pipeline.stage2.network)
    assert all(torch.equal(loaded2[k], v) for k, v in checkpoints["s2_ema"].items())
    assert "--weights ema" in report[1] and "pytorch_model_1.bin" in report[1]


DDIM_BUFFERS = ("ddim_sigmas", "ddim_alphas", "ddim_alphas_prev", "ddim_sqrt_one_minus_alphas",
                "ddim_sigmas_for_original_num_steps")


def test_the_older_training_codes_ddim_buffers_are_ignored_and_listed(tmp_path):
    state = random_state(STAGE2, 6)
    buffers = {f"ema_model.{name}": torch.rand(50) for name in DDIM_BUFFERS}
    torch.save({f"ema_model.denoise_fn.{k}": v for k, v in state.items()} | buffers, tmp_path / "old.pt")
    network, line = load_reference_network(tmp_path / "old.pt", STAGE2, "model", stage="stage2")
    assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items())
    assert f"ignored 5 non-network entries: {', '.join(sorted(DDIM_BUFFERS))}" in line


def test_one_name_per_shared_tensor_as_accelerate_saves_safetensors_is_retied(tmp_path):
    """accelerate keeps the first name of each shared tensor: 4 middle blocks lose 3 x 2 keys."""
    config = dataclasses.replace(STAGE1, num_middle_blocks=4)
    state = random_state(config, 7)
    first_names, dropped = set(), []
    for name, value in ReferenceUNet3D(config).state_dict().items():
        if value.data_ptr() in first_names:
            dropped.append(name)
        first_names.add(value.data_ptr())
    assert len(dropped) == 6
    save_file({k: v for k, v in state.items() if k not in dropped}, tmp_path / "model_1.safetensors")
    network, line = load_reference_network(tmp_path, config, "ema", stage="stage1")
    loaded = network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert loaded[dropped[0]].data_ptr() == loaded["mid_spatial_attn1.fn.fn.fn.to_qkv.weight"].data_ptr()
    assert f"re-tied 6 shared weights stored under one name: {', '.join(dropped)}" in line
    matched = match_state_dict(ReferenceUNet3D(config), dict(state), source="full")
    assert matched.retied == [] and matched.ignored == []


def test_cli_converts_and_reports_errors_in_one_line(checkpoints, tmp_path, capsys):
    configs = {}
    for name, config in (("stage1", STAGE1), ("stage2", STAGE2)):
        configs[name] = tmp_path / f"{name}.json"
        configs[name].write_text(json.dumps({**config.__dict__, "dim_mults": list(config.dim_mults)}))
    args = ["reference", "--stage1", str(checkpoints["stage1"]), "--stage2", str(checkpoints["stage2"]),
            "--text-encoder", "embedded", "--stage1-config", str(configs["stage1"]),
            "--stage2-config", str(configs["stage2"]), "--stage1-size", "8", "--stage2-size", "16"]
    assert run_command(main, [*args, "--weights", "model", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "stage1" / "model.safetensors").is_file()
    output = capsys.readouterr().out
    assert "stage1: trained (non-EMA) weights from" in output and "--weights model" in output
    assert json.loads((tmp_path / "ok" / "stage1" / "config.json").read_text())["network"]["up_order"] == "evaluation"
    assert run_command(main, [*args, "--up-order", "training", "--out", str(tmp_path / "train")]) == 0
    for stage in ("stage1", "stage2"):
        assert json.loads((tmp_path / "train" / stage / "config.json").read_text())["network"]["up_order"] == "training"
    assert MedSynPipeline.from_pretrained(tmp_path / "train").stage2.config.network.up_order == "training"
    # The released sizes do not fit these tiny checkpoints: a clear report, exit 2, no folder left.
    capsys.readouterr()
    assert run_command(main, args[:7] + ["--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing" in error and "other shapes" in error
    assert not (tmp_path / "bad").exists()


def _convert_stage2(path, tmp_path):
    convert_reference(path, path, tmp_path / "out", text_encoder="embedded",
                      stage1_network=STAGE2, stage2_network=STAGE2, stage1_size=8, stage2_size=16)


def test_missing_unexpected_and_misshaped_keys_are_named(checkpoints, tmp_path):
    state = dict(checkpoints["s2"])
    del state["mid_block2.block1.proj.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["final_conv0.1.weight"] = torch.zeros(3, 8, 1, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    network = ReferenceUNet3D(STAGE2)
    with pytest.raises(MedSynError) as error:
        match_state_dict(network, strip_prefixes(read_checkpoint(tmp_path / "bad.pt")), source="bad.pt")
    message = str(error.value)
    assert "1 missing" in message and "mid_block2.block1.proj.weight" in message
    assert "1 unexpected" in message and "extra.weight" in message
    assert "1 with other shapes" in message and "final_conv0.1.weight (3, 8, 1, 1, 1) != (4, 8, 1, 1, 1)" in message


def test_shared_weights_that_differ_are_refused(tmp_path):
    state = random_state(STAGE1, 3)
    state["mid_spatial_attn2.fn.fn.fn.to_qkv.weight"] = state["mid_spatial_attn2.fn.fn.fn.to_qkv.weight"] + 1
    with pytest.raises(MedSynError, match="shared weight"):
        match_state_dict(ReferenceUNet3D(STAGE1), state, source="x")


def test_pickles_with_objects_are_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"init_conv0.weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(MedSynError, match="refusing .*objects other than tensors"):
        read_checkpoint(path)
    with pytest.raises(MedSynError, match="no ema weights"):
        read_checkpoint(tmp_path, "ema")


def test_nested_checkpoint_dicts_are_searched(tmp_path):
    state = random_state(STAGE2, 4)
    torch.save({"step": 5, "model": state, "ema": {"ema_model." + k: v for k, v in state.items()}}, tmp_path / "c.pt")
    assert strip_prefixes(read_checkpoint(tmp_path / "c.pt", "ema")).keys() == state.keys()
    assert read_checkpoint(tmp_path / "c.pt", "model").keys() == state.keys()


def test_flip_axes_map_the_network_arrays_to_lps_both_ways(tiny_pipeline):
    """Converted models flip y (the reference's postprocess.py): outputs flipped, given anatomy too."""
    import dataclasses

    from MedSynLib.pipeline.generation import MedSynPipeline

    flipped = MedSynPipeline(dataclasses.replace(tiny_pipeline.config, flip_axes=(1,)),
                             tiny_pipeline.stage1,
                             tiny_pipeline.stage2, tiny_pipeline.text_encoder_config)
    features = tiny_pipeline.encode_report("Small left pleural effusion.")
    plain = tiny_pipeline.generate("x", seed=4, steps=2, stage2_steps=2, report_features=features)
    mirrored = flipped.generate("x", seed=4, steps=2, stage2_steps=2, report_features=features)
    np.testing.assert_array_equal(mirrored.ct_hu, plain.ct_hu[:, ::-1, :])
    size = tiny_pipeline.stage2.config.size
    airway = np.zeros((size,) * 3, dtype=bool)
    airway[4:20, 2:9, 10:14] = True  # not symmetric in y
    given = flipped.generate("x", seed=4, steps=2, stage2_steps=2, report_features=features, anatomy={"airway": airway})
    np.testing.assert_array_equal(given.masks["airway"], airway)  # imposed where it was given, in LPS


@pytest.fixture(scope="module")
def fine_tuned_encoder(tmp_path_factory):
    """A base BERT (the embedded MiniLM stands in for CXR-BERT) extended to 2048 positions and perturbed."""
    from transformers import AutoModel

    from MedSynLib.pipeline.convert import extend_position_embeddings
    from MedSynLib.text_encoder import EMBEDDED_ENCODER, resolve_model_path

    base = resolve_model_path(EMBEDDED_ENCODER)
    model = AutoModel.from_pretrained(base)
    extend_position_embeddings(model, 2048)
    generator = torch.Generator().manual_seed(0)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("finetuned") / "pytorch_model.bin"
    torch.save(state, path)
    return base, path, state


def test_fine_tuned_text_encoder_gets_2048_positions_and_the_authors_weights(checkpoints, fine_tuned_encoder, tmp_path):
    from transformers import AutoModel

    base, weights, state = fine_tuned_encoder
    out = tmp_path / "model"
    convert_reference(checkpoints["stage1"], checkpoints["stage2"], out, text_encoder=base,
                      text_encoder_weights=weights, stage1_network=STAGE1, stage2_network=STAGE2,
                      stage1_size=8, stage2_size=16)
    saved = AutoModel.from_pretrained(out / "text_encoder")
    assert saved.config.max_position_embeddings == 2048
    for name, value in saved.state_dict().items():
        if not name.endswith(("position_ids", "token_type_ids")):
            assert torch.equal(value, state[name]), name
    pipeline = MedSynPipeline.from_pretrained(out)
    assert pipeline.text_encoder_config.keep_padding_states
    long_report = "Small left pleural effusion. " * 120  # ~840 tokens: past BERT's 512, inside 2048
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning
        features = pipeline.encode_report(long_report)
    assert features.features.shape == (1, 192, STAGE1.text_dim) and features.mask.all()


def test_fine_tuned_weights_that_do_not_fit_are_refused_by_name(checkpoints, fine_tuned_encoder, tmp_path):
    base, _, state = fine_tuned_encoder
    broken = dict(state)
    broken.pop("encoder.layer.0.attention.self.query.weight")
    torch.save(broken, tmp_path / "broken.bin")
    with pytest.raises(MedSynError, match="missing.*encoder.layer.0.attention.self.query.weight"):
        convert_reference(checkpoints["stage1"], checkpoints["stage2"], tmp_path / "model", text_encoder=base,
                          text_encoder_weights=tmp_path / "broken.bin", stage1_network=STAGE1, stage2_network=STAGE2,
                          stage1_size=8, stage2_size=16)
    assert not (tmp_path / "model").exists()


def test_the_fine_tuned_encoders_classifier_head_is_ignored_and_listed(checkpoints, fine_tuned_encoder, tmp_path):
    """The authors' state dict carries classifier.* keys that their own loader skips (strict=False)."""
    from transformers import AutoModel

    base, _, state = fine_tuned_encoder
    with_head = dict(state) | {"classifier.weight": torch.randn(2, TEXT_DIM), "classifier.bias": torch.zeros(2)}
    torch.save(with_head, tmp_path / "with_head.bin")
    _, report = convert_reference(checkpoints["stage1"], checkpoints["stage2"], tmp_path / "model", text_encoder=base,
                                  text_encoder_weights=tmp_path / "with_head.bin", stage1_network=STAGE1,
                                  stage2_network=STAGE2, stage1_size=8, stage2_size=16)
    assert "text encoder: ignored 2 entries" in report[-1] and report[-1].endswith("classifier.bias, classifier.weight")
    saved = AutoModel.from_pretrained(tmp_path / "model" / "text_encoder").state_dict()
    assert all(torch.equal(saved[k], state[k]) for k in saved if not k.endswith(("position_ids", "token_type_ids")))
