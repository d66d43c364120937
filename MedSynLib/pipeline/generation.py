"""MedSynPipeline: radiology report -> 3D chest CT + anatomy, in two diffusion stages.

The model folder it loads and saves is described in `model_folder`; the sampling engine it
runs each stage with is in `sampling`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from MedSynLib import __version__
from MedSynLib.anatomy import masks_to_label_map
from MedSynLib.configuration import config_from_dict, config_to_dict, read_json, write_json
from MedSynLib.errors import MAX_LOWPASS_VOXELS, MedSynError, check_number, require_path
from MedSynLib.geometry import Geometry
from MedSynLib.pipeline.channels import masks_to_numpy
from MedSynLib.pipeline.model_folder import (
    MODEL_INDEX,
    TEXT_ENCODER_CONFIG,
    ModelConfig,
    Stage,
    read_model_config,
)
from MedSynLib.pipeline.sampling import (
    ProgressCallback,
    nearest_resize,
    place_network,
    resolve_device,
    resolve_dtype,
    run_sampler,
    super_resolve,
    text_guided_output,
)
from MedSynLib.pipeline.tiling import Tiling, automatic_tiling, available_memory
from MedSynLib.text_encoder import ReportEncoder, TextEncoderConfig, TextFeatures, check_report


@dataclass
class GenerationResult:
    ct_hu: np.ndarray  # int16 (z, y, x)
    masks: dict[str, np.ndarray]  # bool (z, y, x) per structure
    geometry: Geometry
    metadata: dict = field(default_factory=dict)

    @property
    def label_map(self) -> np.ndarray:
        return masks_to_label_map(self.masks)


class MedSynPipeline:
    """Two-stage text-to-CT generator; see the module docstring for the folder layout."""

    def __init__(
        self,
        config: ModelConfig,
        stage1: Stage,
        stage2: Stage,
        text_encoder_config: TextEncoderConfig,
        *,
        source: str = "",
    ):
        self.config = config
        self.stage1, self.stage2 = stage1, stage2
        self.text_encoder_config = text_encoder_config
        self.source = source
        self._text_encoder: ReportEncoder | None = None
        self._check_consistency()

    def _check_consistency(self) -> None:
        channels = self.config.layout.num_channels
        s1, s2 = self.stage1.config, self.stage2.config
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
        config = read_model_config(folder)
        text_config = config_from_dict(
            TextEncoderConfig, read_json(folder / "text_encoder" / TEXT_ENCODER_CONFIG), source="text encoder config"
        )
        if text_config.model == ".":  # the encoder's files live in the model folder itself
            text_config = replace(text_config, model=str(folder / "text_encoder"))
        return cls(config, Stage.load(folder / "stage1"), Stage.load(folder / "stage2"), text_config, source=str(folder))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the model folder; each file is written to a temporary name and renamed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.stage1.save(folder / "stage1")
        self.stage2.save(folder / "stage2")
        (folder / "text_encoder").mkdir(exist_ok=True)
        write_json(folder / "text_encoder" / TEXT_ENCODER_CONFIG, config_to_dict(self.text_encoder_config))
        write_json(folder / MODEL_INDEX, {"_class_name": type(self).__name__, "medsyn_version": __version__,
                                          **config_to_dict(self.config)})

    @property
    def text_encoder(self) -> ReportEncoder:
        if self._text_encoder is None:
            self._text_encoder = ReportEncoder(self.text_encoder_config)
            if self._text_encoder.hidden_size != self.stage1.config.network.text_dim:
                raise MedSynError(
                    f"text encoder {self.text_encoder_config.model!r} gives {self._text_encoder.hidden_size}-d "
                    f"features but stage 1 expects {self.stage1.config.network.text_dim}"
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
        expected = (1, self.stage1.config.network.text_tokens, self.stage1.config.network.text_dim)
        if tuple(features.features.shape) != expected or tuple(features.mask.shape) != expected[:2]:
            raise MedSynError(f"report features must have shape {expected} (mask {expected[:2]}), "
                              f"got {tuple(features.features.shape)}")
        if not torch.isfinite(features.features).all():
            raise MedSynError("report features hold NaN or infinite values")
        return features

    def automatic_tiling(self, device: str | torch.device = "cpu") -> Tiling | None:
        """Stage-2 tiling for `device`: the whole volume when its pass fits in memory, else 64^3 tiles."""
        device = resolve_device(device)
        stage2 = self.stage2.config
        return automatic_tiling(stage2.network.dim, stage2.size, available_memory(device))

    def check_inputs(self, report: str, anatomy: dict[str, np.ndarray] | None, tiling: Tiling | None = None) -> None:
        """Refuse what `generate` could not use, before any work."""
        check_report(report)
        size = self.stage2.config.size
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
        stage2_consistency: float | None = None,
        anatomy: dict[str, np.ndarray] | None = None,
        geometry: Geometry | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        tiling: Tiling | None = None,
        progress: ProgressCallback | None = None,
        report_features: TextFeatures | None = None,
    ) -> GenerationResult:
        """Generate one CT and its anatomy.

        stage2_consistency: sigma (output voxels) of the low-pass that stage 2's CT and lungs share
            with stage 1's (diffusion.consistency); 0 = off, None = the stage-2 config's.
        anatomy: boolean masks on the output grid (stage-2 size cubed) that the result must keep;
            structures left out (or empty) are generated freely.
        geometry: physical grid of the output (default: the model's nominal spacing, centred).
        report_features: the report already encoded (`encode_report`), as when sampling many
            seeds of one report; the text encoder is then not run (nor loaded).
        """
        # 1. Check inputs.
        self.check_inputs(report, anatomy, tiling)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        place_network(self.stage1.network, device)
        place_network(self.stage2.network, device)
        guidance = self.stage1.config.diffusion.guidance_scale if guidance is None else guidance
        steps = steps or self.stage1.config.diffusion.num_steps
        stage2_steps = stage2_steps or self.stage2.config.diffusion.num_steps
        if stage2_consistency is None:
            stage2_consistency = self.stage2.config.diffusion.lowres_consistency
        try:
            check_number("stage2_consistency", stage2_consistency, 0.0, MAX_LOWPASS_VOXELS)
        except ValueError as error:
            raise MedSynError(str(error)) from error
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
            anatomy_low = nearest_resize(anatomy_high, self.stage1.config.size)
            anatomy_high, anatomy_low = ((imposed, a) for a in (anatomy_high, anatomy_low))

        # 4. Stage 1: x_T ~ N(0, I) at 64^3 -> x_0 (CT + anatomy), text-guided.
        start = time.perf_counter()
        s1 = self.stage1.config
        x_T = torch.randn((1, layout.num_channels) + (s1.size,) * 3, generator=generator).to(device)

        stage1_output = text_guided_output(self.stage1.network, text_features, text_mask, guidance)
        low = run_sampler("stage1", stage1_output, x_T, s1, steps, sampler_name=sampler, anatomy=anatomy_low,
                          dtype=dtype, progress=progress)
        timings["stage1_s"] = time.perf_counter() - start

        # 5. Stage 2: x_T at the output size, conditioned on the nearest-upsampled stage-1 volume.
        start = time.perf_counter()
        s2 = self.stage2.config
        x_T = torch.randn((1, layout.num_channels) + (s2.size,) * 3, generator=generator).to(device)
        high = super_resolve(self.stage2.network, s2, low, x_T, stage2_steps, ct_channels=layout.ct_channels,
                             exempt_channels=layout.thin_structure_channels, lung_channels=layout.lung_channels,
                             consistency=stage2_consistency, tiling=tiling, sampler_name=sampler,
                             anatomy=anatomy_high, dtype=dtype, progress=progress)
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
            "stage2_consistency": stage2_consistency,
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



