"""Run checkpoints: model, EMA and optimizer as safetensors + JSON, written atomically, the last K kept; starting a run from a model folder."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from MedSynLib.configuration import (
    publish,
    read_json,
)
from MedSynLib.errors import (
    MedSynError,
)
from MedSynLib.networks.unet import UNet3D, UNet3DConfig
from MedSynLib.pipeline.channels import ChannelLayout
from MedSynLib.pipeline.model_folder import (
    WEIGHTS,
    load_state,
    load_weights,
    read_model_config,
    stage_config_from_dict,
)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(index), {})[name] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict] = {int(k): dict(v) for k, v in scalars["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(run: Path, step: int, model: UNet3D, ema: UNet3D, optimizer, scaler, keep: int) -> Path:
    """Write checkpoints/step_N atomically (temporary folder, fsync, rename) and keep the last `keep`."""
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    optimizer_tensors, optimizer_scalars = _flatten_optimizer(optimizer.state_dict())
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    save_file(optimizer_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({
        "step": step, "optimizer": optimizer_scalars,
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
    }))
    for path in tmp.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())
    if final.exists():
        shutil.rmtree(final)
    publish(tmp, final)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    for old in sorted(folder.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path, model: UNet3D, ema: UNet3D, optimizer, scaler) -> int:
    """Load the newest readable checkpoint; return its step (0 when there is none)."""
    candidates = sorted((run / "checkpoints").glob("step_*"), reverse=True)
    for folder in candidates:
        try:
            state = json.loads((folder / "state.json").read_text())
            model.load_state_dict(load_file(folder / "model.safetensors"))
            ema.load_state_dict(load_file(folder / "ema.safetensors"))
            optimizer.load_state_dict(_unflatten_optimizer(load_file(folder / "optimizer.safetensors"), state["optimizer"]))
            if state["scaler"] is not None:
                scaler.load_state_dict(state["scaler"])
            return int(state["step"])
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, json.JSONDecodeError) as error:
            print(f"medsyn: warning: checkpoint {folder} is unreadable ({type(error).__name__}: "
                  f"{str(error).splitlines()[0][:200]}); trying the previous one", file=sys.stderr)
    return 0


def start_from_model(model: UNet3D, stage: str, folder: Path, layout: ChannelLayout) -> None:
    """Initialise `model` (whose channels are `layout`'s) with the `stage` weights of an exported
    model folder (fine-tuning).

    The networks must match, except that modules which start as a no-op (`pooled_text`)
    may be new, and that the CT window channel may be added or dropped: a released model
    can be fine-tuned with them.
    """
    source = folder / stage / "config.json"
    if not source.is_file():
        raise MedSynError(f"init_weights: {folder} is not a model folder (no {stage}/config.json)")
    saved = stage_config_from_dict(read_json(source), source=str(source)).network
    if not isinstance(saved, UNet3DConfig):
        raise MedSynError(f"init_weights: the {stage} network of {folder} is a converted reference network; "
                          f"training builds MedSynLib's own networks only")
    channels = {"in_channels": model.config.in_channels, "out_channels": model.config.out_channels,
                "cond_channels": model.config.cond_channels, "pooled_text": model.config.pooled_text}
    if replace(saved, **channels) != model.config:
        raise MedSynError(f"init_weights: the {stage} network of {folder} differs from this run's (preset and network "
                          f"settings must match it)")
    saved_layout = read_model_config(folder).layout
    if saved_layout.channel_names == layout.channel_names:
        load_weights(model, folder / stage / WEIGHTS, source=str(source), may_lack=("text_to_time.",))
        return
    unknown = (set(layout.channel_names) ^ set(saved_layout.channel_names)) - {"ct_window"}
    if unknown:
        raise MedSynError(f"init_weights: {folder} generates other channels than this run ({sorted(unknown)}); "
                          f"fine-tuning may only add or drop the CT window channel (ct_window)")
    network = UNet3D(saved)
    load_weights(network, folder / stage / WEIGHTS, source=str(source))
    state = remap_channels(network.state_dict(), saved_layout, layout)
    load_state(model, state, source=str(source), may_lack=("text_to_time.",))


def remap_channels(state: dict[str, torch.Tensor], saved: ChannelLayout, target: ChannelLayout) -> dict[str, torch.Tensor]:
    """A UNet3D state of `saved`'s channels rearranged for `target`'s (same names; "ct_window" may differ).

    A new channel starts with zero input and output weights: the network ignores it and
    predicts 0 for it (a residual one: the condition), so the other channels keep what they
    learnt. (The CT output mapped linearly into the window would be a worse start: outside
    the window it lands far beyond [-1, 1]; measured, the first loss was 400x the trained one.)
    """
    names = saved.channel_names

    def pick(weight: torch.Tensor, dim: int, blocks: int) -> torch.Tensor:
        """Each of `blocks` consecutive groups of len(names) channels along `dim`, in target's order."""
        parts = [block.narrow(dim, names.index(name), 1) if name in names else torch.zeros_like(block.narrow(dim, 0, 1))
                 for block in weight.chunk(blocks, dim) for name in target.channel_names]
        return torch.cat(parts, dim)

    remapped = dict(state)
    remapped["init_conv.weight"] = pick(state["init_conv.weight"], 1, state["init_conv.weight"].shape[1] // len(names))
    remapped["final_conv.weight"] = pick(state["final_conv.weight"], 0, 1)
    remapped["final_conv.bias"] = pick(state["final_conv.bias"], 0, 1)
    return remapped
