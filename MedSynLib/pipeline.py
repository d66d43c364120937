"""MedSynPipeline: radiology report -> 3D chest CT + anatomy, in two diffusion stages.

A model is a folder (see `save_pretrained`):
    model_index.json                 ModelConfig + library version
    stage1/config.json, model.safetensors   text-conditioned 64^3 generator
    stage2/config.json, model.safetensors   super-resolution to the output size
      (config.json's "architecture": "medsyn" = our UNet3D, "reference" = the reference's
       layout, see reference_networks.py and convert.py)
    text_encoder/medsyn_text_encoder.json   which report encoder (and its settings)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .anatomy import masks_to_label_map
from .channels import ChannelLayout, masks_to_numpy
from .configuration import config_from_dict, config_to_dict, publish, read_json, write_json
from .diffusion import DiffusionConfig, prediction_to_x0
from .errors import MedSynError, require_path
from .geometry import Geometry
from .inferers import Tiling, apply_network
from .networks import UNet3D, UNet3DConfig
from .reference_networks import ReferenceUNet3D, ReferenceUNetConfig
from .samplers import classifier_free_guidance, denoise_loop, make_sampler
from .text_encoder import ReportEncoder, TextEncoderConfig, TextFeatures, check_report

MODEL_INDEX = "model_index.json"
WEIGHTS = "model.safetensors"
TEXT_ENCODER_CONFIG = "medsyn_text_encoder.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ProgressCallback = Callable[[str, int, int], None]

# architecture name -> (network config class, network class)
ARCHITECTURES = {"medsyn": (UNet3DConfig, UNet3D), "reference": (ReferenceUNetConfig, ReferenceUNet3D)}


# The trained demonstration model shipped inside the package (its README is the model card).
EMBEDDED_MODEL = Path(__file__).parent / "models" / "default"

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

    @property
    def layout(self) -> ChannelLayout:
        return ChannelLayout(self.structures, self.channel_encoding)


@dataclass
class GenerationResult:
    ct_hu: np.ndarray  # int16 (z, y, x)
    masks: dict[str, np.ndarray]  # bool (z, y, x) per structure
    geometry: Geometry
    metadata: dict = field(default_factory=dict)

    @property
    def label_map(self) -> np.ndarray:
        return masks_to_label_map(self.masks)


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without it is an input error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise MedSynError(f"unknown device {device!r}; use auto, cpu or cuda") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedSynError("CUDA was asked for but no CUDA device is available; use --device cpu")
    return device


def stage_config_from_dict(data: dict, *, source: str) -> StageConfig:
    """A StageConfig whose network config class follows its `architecture` (default "medsyn")."""
    architecture = data.get("architecture", "medsyn")
    if architecture not in ARCHITECTURES:
        raise MedSynError(f"{source}: architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    network = data.get("network")
    if isinstance(network, dict):
        network = config_from_dict(ARCHITECTURES[architecture][0], network, source=f"{source}.network")
    return config_from_dict(StageConfig, {**data, "network": network}, source=source)


def load_weights(network: torch.nn.Module, weights_path: Path, *, source: str, may_lack: tuple[str, ...] = ()) -> None:
    """Load a safetensors file into `network`; every key and shape must fit, except that
    keys under the module prefixes `may_lack` may be absent (they keep their initial values)."""
    if not weights_path.is_file():
        raise MedSynError(f"missing weights {weights_path}")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise MedSynError(f"cannot read {weights_path}: {error}") from error
    expected = network.state_dict()
    missing = {k for k in expected.keys() - state.keys() if not k.startswith(may_lack)}
    unexpected = state.keys() - expected.keys()
    mismatched = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        details = [f"{len(missing)} missing (e.g. {sorted(missing)[:2]})" if missing else "",
                   f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})" if unexpected else "",
                   f"{len(mismatched)} with other shapes (e.g. {mismatched[:2]})" if mismatched else ""]
        raise MedSynError(f"{weights_path} does not fit {source}: " + "; ".join(d for d in details if d))
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:  # it would generate an empty (all-NaN, written as 0 HU) volume
        raise MedSynError(f"{weights_path} holds NaN or infinite weights (e.g. {broken}); the model is broken")
    network.load_state_dict(state, strict=False)


def _load_stage(folder: Path) -> tuple[StageConfig, UNet3D]:
    config = stage_config_from_dict(read_json(folder / "config.json"), source=str(folder / "config.json"))
    network = config.build_network()
    load_weights(network, folder / WEIGHTS, source=str(folder / "config.json"))
    return config, network.eval().requires_grad_(False)


def _save_stage(folder: Path, config: StageConfig, network: UNet3D) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config_to_dict(config))
    tmp = folder / f".{WEIGHTS}.tmp"
    tensors, seen = {}, set()
    for name, value in network.state_dict().items():
        value = value.detach().cpu().contiguous()
        if value.data_ptr() in seen:  # shared weights (the reference's middle attention): safetensors wants copies
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[name] = value
    save_file(tensors, tmp)
    publish(tmp, folder / WEIGHTS)


def place_network(network: torch.nn.Module, device: torch.device) -> None:
    """Move to `device`; on CPU, 3D kernels go channels-last (oneDNN's 3D convolutions run
    1.3-1.5x faster so, benchmarks/README.md). Other parameters keep their layout."""
    network.to(device)
    if device.type == "cpu":
        for parameter in network.parameters():
            if parameter.dim() == 5:
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last_3d)


def nearest_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of (b, c, d, h, w) to size^3: the reference's x4 / x0.25."""
    return F.interpolate(x, size=(size, size, size), mode="nearest")


class MedSynPipeline:
    """Two-stage text-to-CT generator; see the module docstring for the folder layout."""

    def __init__(
        self,
        config: ModelConfig,
        stage1: tuple[StageConfig, UNet3D],
        stage2: tuple[StageConfig, UNet3D],
        text_encoder_config: TextEncoderConfig,
        *,
        source: str = "",
    ):
        self.config = config
        self.stage1_config, self.stage1 = stage1
        self.stage2_config, self.stage2 = stage2
        self.text_encoder_config = text_encoder_config
        self.source = source
        self._text_encoder: ReportEncoder | None = None
        self._check_consistency()

    def _check_consistency(self) -> None:
        channels = self.config.layout.num_channels
        s1, s2 = self.stage1_config, self.stage2_config
        if (s1.network.in_channels, s1.network.out_channels) != (channels, channels) or not s1.network.text_dim:
            raise MedSynError(f"stage 1 must be a text-conditioned network with {channels} channels in and out")
        if (s2.network.in_channels, s2.network.cond_channels, s2.network.out_channels) != (channels,) * 3:
            raise MedSynError(f"stage 2 must take {channels} noisy + {channels} low-res channels and give {channels}")
        if s2.size % s1.size:
            raise MedSynError(f"stage-2 size {s2.size} must be a multiple of the stage-1 size {s1.size}")

    # ----------------------------------------------------------------- folders
    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MedSynPipeline:
        folder = require_path(folder, "folder", "model folder")
        index = read_json(folder / MODEL_INDEX)
        if index.pop("_class_name", None) != cls.__name__:
            raise MedSynError(f"{folder / MODEL_INDEX} does not describe a {cls.__name__}")
        index.pop("medsyn_version", None)
        config = config_from_dict(ModelConfig, index, source=str(folder / MODEL_INDEX))
        text_config = config_from_dict(
            TextEncoderConfig, read_json(folder / "text_encoder" / TEXT_ENCODER_CONFIG), source="text encoder config"
        )
        if text_config.model == ".":  # the encoder's files live in the model folder itself
            text_config = replace(text_config, model=str(folder / "text_encoder"))
        return cls(config, _load_stage(folder / "stage1"), _load_stage(folder / "stage2"), text_config, source=str(folder))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the model folder; each file is written to a temporary name and renamed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _save_stage(folder / "stage1", self.stage1_config, self.stage1)
        _save_stage(folder / "stage2", self.stage2_config, self.stage2)
        (folder / "text_encoder").mkdir(exist_ok=True)
        write_json(folder / "text_encoder" / TEXT_ENCODER_CONFIG, config_to_dict(self.text_encoder_config))
        write_json(folder / MODEL_INDEX, {"_class_name": type(self).__name__, "medsyn_version": __version__,
                                          **config_to_dict(self.config)})

    @property
    def text_encoder(self) -> ReportEncoder:
        if self._text_encoder is None:
            self._text_encoder = ReportEncoder(self.text_encoder_config)
            if self._text_encoder.hidden_size != self.stage1_config.network.text_dim:
                raise MedSynError(
                    f"text encoder {self.text_encoder_config.model!r} gives {self._text_encoder.hidden_size}-d "
                    f"features but stage 1 expects {self.stage1_config.network.text_dim}"
                )
        return self._text_encoder

    # -------------------------------------------------------------- generation
    def encode_report(self, report: str) -> TextFeatures:
        """The report's token features for stage 1, shape (1, tokens, hidden)."""
        return self.text_encoder.encode([check_report(report)])

    def _to_network_axes(self, volume: torch.Tensor) -> torch.Tensor:
        """Reverse the model's `flip_axes` in the last three (z, y, x) dimensions; its own inverse."""
        return volume.flip([axis - 3 for axis in self.config.flip_axes]) if self.config.flip_axes else volume

    def _check_features(self, features: TextFeatures) -> TextFeatures:
        expected = (1, self.stage1_config.network.text_tokens, self.stage1_config.network.text_dim)
        if tuple(features.features.shape) != expected or tuple(features.mask.shape) != expected[:2]:
            raise MedSynError(f"report features must have shape {expected} (mask {expected[:2]}), "
                              f"got {tuple(features.features.shape)}")
        if not torch.isfinite(features.features).all():
            raise MedSynError("report features hold NaN or infinite values")
        return features

    def check_inputs(self, report: str, anatomy: dict[str, np.ndarray] | None, tiling: Tiling | None = None) -> None:
        """Refuse what `generate` could not use, before any work."""
        check_report(report)
        size = self.stage2_config.size
        if tiling is not None and max(tiling.size) > size:  # a larger tile only pads the volume, at any cost
            raise MedSynError(f"tile size {tiling.size} is larger than the stage-2 volume ({size}^3)")
        if anatomy is None:
            return
        unknown = [n for n in anatomy if n not in self.config.structures]
        if unknown:
            raise MedSynError(f"this model does not generate {unknown}; it generates {list(self.config.structures)}")
        for name, mask in anatomy.items():
            if mask.shape != (size,) * 3:
                raise MedSynError(f"anatomy mask {name!r} has shape {mask.shape}; expected {(size,) * 3}")
        if not any(mask.any() for mask in anatomy.values()):
            raise MedSynError("the given anatomy is empty")

    @torch.no_grad()
    def generate(
        self,
        report: str,
        *,
        seed: int = 0,
        steps: int | None = None,
        stage2_steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        anatomy: dict[str, np.ndarray] | None = None,
        geometry: Geometry | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        tiling: Tiling | None = None,
        progress: ProgressCallback | None = None,
        report_features: TextFeatures | None = None,
    ) -> GenerationResult:
        """Generate one CT and its anatomy.

        anatomy: boolean masks on the output grid (stage-2 size cubed) that the result must keep;
            structures left out (or empty) are generated freely.
        geometry: physical grid of the output (default: the model's nominal spacing, centred).
        report_features: the report already encoded (`encode_report`), as when sampling many
            seeds of one report; the text encoder is then not run (nor loaded).
        """
        # 1. Check inputs.
        self.check_inputs(report, anatomy, tiling)
        if dtype not in DTYPES:
            raise MedSynError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        device = resolve_device(device)
        place_network(self.stage1, device)
        place_network(self.stage2, device)
        guidance = self.stage1_config.diffusion.guidance_scale if guidance is None else guidance
        steps = steps or self.stage1_config.diffusion.num_steps
        stage2_steps = stage2_steps or self.stage2_config.diffusion.num_steps
        layout, timings = self.config.layout, {}
        generator = torch.Generator().manual_seed(seed)  # CPU noise: the same seed gives the same noise on any device

        # 2. Encode the report: c = E(report), token features (1, 192, hidden).
        start = time.perf_counter()
        text = self.encode_report(report) if report_features is None else self._check_features(report_features)
        text_features, text_mask = text.features.to(device), text.mask.to(device)
        timings["text_encoder_s"] = time.perf_counter() - start

        # 3. Anatomy to impose, as model channels at both resolutions.
        anatomy_high = anatomy_low = None
        if anatomy is not None:
            given = {n: self._to_network_axes(torch.from_numpy(np.asarray(m, dtype=bool)))
                     for n, m in anatomy.items() if m.any()}
            imposed = layout.channels_of(tuple(given))
            anatomy_high = layout.encode_anatomy(given).unsqueeze(0).to(device)
            anatomy_low = nearest_resize(anatomy_high, self.stage1_config.size)
            anatomy_high, anatomy_low = ((imposed, a) for a in (anatomy_high, anatomy_low))

        # 4. Stage 1: x_T ~ N(0, I) at 64^3 -> x_0 (CT + anatomy), text-guided.
        start = time.perf_counter()
        s1 = self.stage1_config
        x_T = torch.randn((1, layout.num_channels) + (s1.size,) * 3, generator=generator).to(device)

        stage1_output = text_guided_output(self.stage1, text_features, text_mask, guidance)
        low = run_sampler("stage1", stage1_output, x_T, s1, steps, sampler, anatomy_low, dtype, progress)
        timings["stage1_s"] = time.perf_counter() - start

        # 5. Stage 2: x_T at the output size, conditioned on the nearest-upsampled stage-1 volume.
        start = time.perf_counter()
        s2 = self.stage2_config
        condition = nearest_resize(low.clamp(-1, 1), s2.size)
        x_T = torch.randn((1, layout.num_channels) + (s2.size,) * 3, generator=generator).to(device)
        stage2_output = super_resolution_output(self.stage2, condition, tiling)
        high = run_sampler("stage2", stage2_output, x_T, s2, stage2_steps, sampler, anatomy_high, dtype, progress)
        timings["stage2_s"] = time.perf_counter() - start

        # 6. Decode: CT channel -> HU, anatomy channels -> masks.
        ct_hu, masks = layout.decode(self._to_network_axes(high[0].float().cpu()))
        geometry = geometry or Geometry.centered((s2.size,) * 3, self.config.spacing_mm)
        metadata = {
            "synthetic": True,
            "report": report,
            "seed": seed,
            "steps": {"stage1": steps, "stage2": stage2_steps},
            "guidance": guidance,
            "sampler": sampler or s1.diffusion.sampler,
            "anatomy_given": sorted(n for n, m in (anatomy or {}).items() if m.any()),
            "model": self.source,
            "model_trained": self.config.trained,
            "structures": list(self.config.structures),
            "device": str(device),
            "dtype": dtype,
            "tiling": None if tiling is None else {"size": list(tiling.size), "overlap": tiling.overlap},
            "timings": timings,
        }
        return GenerationResult(ct_hu.numpy(), masks_to_numpy(masks), geometry, metadata)



def text_guided_output(network: UNet3D, text: torch.Tensor, text_mask: torch.Tensor, guidance: float):
    """Stage-1 network output with classifier-free guidance: out_null + w (out_text - out_null)."""

    def output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return network(x, t, text=text, text_mask=text_mask)
        # One batch holds the conditional and the null-text pass.
        doubled = network(
            torch.cat([x, x]), torch.cat([t, t]), text=text.expand(2, -1, -1), text_mask=text_mask.expand(2, -1),
            drop_text=torch.tensor([False, True], device=x.device),
        )
        conditional, unconditional = doubled.chunk(2)
        return classifier_free_guidance(conditional, unconditional, guidance)

    return output


def super_resolution_output(network: UNet3D, condition: torch.Tensor, tiling: Tiling | None):
    """Stage-2 network output given the upsampled low-res volume, whole or tile by tile."""
    channels = condition.shape[1]

    def output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        def tile_output(tile: torch.Tensor) -> torch.Tensor:
            return network(tile[:, :channels], t, cond=tile[:, channels:])

        return apply_network(tile_output, torch.cat([x, condition], dim=1), tiling)

    return output


def run_sampler(
    stage: str,
    output_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    config: StageConfig,
    steps: int,
    sampler_name: str | None = None,
    anatomy: tuple[list[int], torch.Tensor] | None = None,
    dtype: str = "float32",
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Run one stage's sampler; x0 is clipped and, if given, anatomy channels are imposed.

    anatomy: None or (channel indices, their values as anatomy channels (1, C-1, D, H, W)).
    """
    diffusion = config.diffusion
    schedule = diffusion.make_schedule()
    sampler = make_sampler(sampler_name or diffusion.sampler, schedule, steps)
    autocast = torch.autocast(x_T.device.type, dtype=DTYPES[dtype], enabled=dtype != "float32")
    if anatomy is not None:
        channels, values = anatomy
        keep = torch.zeros(1, x_T.shape[1], 1, 1, 1, dtype=torch.bool, device=x_T.device)
        keep[:, channels] = True
        target = torch.cat([torch.zeros_like(values[:, :1]), values], dim=1)

    def x0_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast:
            output = output_fn(x, t)
        x0 = prediction_to_x0(output.float(), x, t, schedule, diffusion.prediction_type)
        if diffusion.clip_x0:
            x0 = x0.clamp(-1, 1)
        return x0 if anatomy is None else torch.where(keep, target, x0)

    def impose_anatomy(x: torch.Tensor, index: int) -> torch.Tensor:
        # Replace the given channels by a draw of q(x_s | anatomy) = N(alpha_s a, sigma_s^2), with x_T's noise.
        if sampler.is_last(index):
            return x
        alpha, sigma = schedule.alpha_sigma(sampler.times[index + 1 : index + 2])
        return torch.where(keep, alpha.item() * target + sigma.item() * x_T, x)

    def report_progress(step: int, total: int) -> None:
        if progress is not None:
            progress(stage, step, total)

    return denoise_loop(
        x0_fn, x_T, sampler, after_step=impose_anatomy if anatomy is not None else None, progress=report_progress
    )
