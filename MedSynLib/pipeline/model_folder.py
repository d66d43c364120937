"""The model folder: what a trained MedSyn model is on disk, and the stages it holds.

    model_index.json                        ModelConfig + library version
    stage1/config.json, model.safetensors   text-conditioned low-resolution generator
    stage2/config.json, model.safetensors   super-resolution to the output size
      (config.json's "architecture": "medsyn" = our UNet3D, "reference" = the reference's
       layout, see networks/reference.py and pipeline/convert.py)
    text_encoder/medsyn_text_encoder.json   which report encoder (and its settings)

Weights are safetensors only: nothing here unpickles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from MedSynLib.configuration import config_from_dict, config_to_dict, publish, read_json, write_json
from MedSynLib.diffusion.schedules import DiffusionConfig
from MedSynLib.errors import MedSynError
from MedSynLib.networks.reference import ReferenceUNet3D, ReferenceUNetConfig
from MedSynLib.networks.unet import UNet3D, UNet3DConfig
from MedSynLib.pipeline.channels import ChannelLayout, check_ct_window

MODEL_INDEX = "model_index.json"
STAGE_CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TEXT_ENCODER_CONFIG = "medsyn_text_encoder.json"

# architecture name -> (network config class, network class)
ARCHITECTURES = {"medsyn": (UNet3DConfig, UNet3D), "reference": (ReferenceUNetConfig, ReferenceUNet3D)}

# The trained demonstration model shipped inside the package (its README is the model card).
EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "pretrained" / "default"


@dataclass(frozen=True)
class StageConfig:
    network: UNet3DConfig  # a ReferenceUNetConfig when architecture == "reference"
    diffusion: DiffusionConfig
    size: int  # the stage's cube side, in voxels
    architecture: str = "medsyn"  # "reference": the reference implementation's layout (released checkpoints)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {self.architecture!r}")
        if not isinstance(self.network, ARCHITECTURES[self.architecture][0]):
            raise ValueError(f"the {self.architecture!r} architecture needs a {ARCHITECTURES[self.architecture][0].__name__}")
        if getattr(self.network, "residual", False) and self.diffusion.prediction_type != "x0":
            raise ValueError("a residual network predicts x0 (the condition plus a correction); "
                             f"prediction_type is {self.diffusion.prediction_type!r}")

    def build_network(self) -> UNet3D | ReferenceUNet3D:
        return ARCHITECTURES[self.architecture][1](self.network)


@dataclass(frozen=True)
class ModelConfig:
    structures: tuple[str, ...]
    channel_encoding: str = "binary"
    spacing_mm: tuple[float, float, float] = (1.25, 1.25, 1.25)  # nominal output voxel (x, y, z)
    trained: bool = False
    description: str = ""
    # Array axes (0 = z, 1 = y, 2 = x) that the network's volumes hold reversed relative to LPS
    # (the reference's outputs are flipped along y before they are anatomically right).
    flip_axes: tuple[int, ...] = ()
    ct_window: Optional[tuple[float, float]] = None  # HU of the soft-tissue window channel (ChannelLayout)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ct_window", check_ct_window(self.ct_window))

    @property
    def layout(self) -> ChannelLayout:
        return ChannelLayout(self.structures, self.channel_encoding, self.ct_window)


def read_model_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a model folder (its model_index.json)."""
    index = read_json(folder / MODEL_INDEX)
    if index.pop("_class_name", None) != "MedSynPipeline":
        raise MedSynError(f"{folder / MODEL_INDEX} does not describe a MedSynPipeline")
    index.pop("medsyn_version", None)
    return config_from_dict(ModelConfig, index, source=str(folder / MODEL_INDEX))


def stage_config_from_dict(data: dict, *, source: str) -> StageConfig:
    """A StageConfig whose network config class follows its `architecture` (default "medsyn")."""
    architecture = data.get("architecture", "medsyn")
    if architecture not in ARCHITECTURES:
        raise MedSynError(f"{source}: architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    network = data.get("network")
    if isinstance(network, dict):
        network = config_from_dict(ARCHITECTURES[architecture][0], network, source=f"{source}.network")
    return config_from_dict(StageConfig, {**data, "network": network}, source=source)


def state_dict_misfit(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *,
                      required: Iterable[str] | None = None, optional: Iterable[str] = ()) -> str:
    """How `state` fails to fit `expected` ("" when it fits): the missing keys (of `required`,
    default every expected key), the unexpected ones (except `optional`) and those of other shapes."""
    required, optional = list(expected if required is None else required), set(optional)
    missing = [k for k in required if k not in state]
    unexpected = sorted(k for k in state if k not in expected and k not in optional)
    mismatched = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
             f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]})" if mismatched else ""]
    return "; ".join(p for p in parts if p)


def load_weights(network: torch.nn.Module, weights_path: Path, *, source: str, may_lack: tuple[str, ...] = ()) -> None:
    """Load a safetensors file into `network`; every key and shape must fit, except that
    keys under the module prefixes `may_lack` may be absent (they keep their initial values)."""
    if not weights_path.is_file():
        raise MedSynError(f"missing weights {weights_path}")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise MedSynError(f"cannot read {weights_path}: {error}") from error
    load_state(network, state, source=source, may_lack=may_lack, name=str(weights_path))


def load_state(network: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
               may_lack: tuple[str, ...] = (), name: str = "the weights") -> None:
    """`load_weights` for a state already in memory (`name` says where it came from in errors)."""
    expected = network.state_dict()
    misfit = state_dict_misfit(expected, state, required=[k for k in expected if not k.startswith(may_lack)])
    if misfit:
        raise MedSynError(f"{name} does not fit {source}: {misfit}")
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:  # it would generate an empty (all-NaN, written as 0 HU) volume
        raise MedSynError(f"{name} holds NaN or infinite weights (e.g. {broken}); the model is broken")
    network.load_state_dict(state, strict=False)


@dataclass(frozen=True)
class Stage:
    """One diffusion stage: its settings and its network (in eval mode, no gradients, once loaded)."""

    config: StageConfig
    network: UNet3D | ReferenceUNet3D

    @classmethod
    def load(cls, folder: Path) -> Stage:
        config = stage_config_from_dict(read_json(folder / STAGE_CONFIG), source=str(folder / STAGE_CONFIG))
        network = config.build_network()
        load_weights(network, folder / WEIGHTS, source=str(folder / STAGE_CONFIG))
        return cls(config, network.eval().requires_grad_(False))

    def save(self, folder: Path) -> None:
        """config.json and the weights, each written to a temporary name and renamed."""
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / STAGE_CONFIG, config_to_dict(self.config))
        tmp = folder / f".{WEIGHTS}.tmp"
        tensors, seen = {}, set()
        for name, value in self.network.state_dict().items():
            value = value.detach().cpu().contiguous()
            if value.data_ptr() in seen:  # shared weights (the reference's middle attention): safetensors wants copies
                value = value.clone()
            seen.add(value.data_ptr())
            tensors[name] = value
        save_file(tensors, tmp)
        publish(tmp, folder / WEIGHTS)
