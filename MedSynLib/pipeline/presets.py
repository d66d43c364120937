"""Named model sizes: `paper` (the reference's), `small`, `demo` (the shipped model), `tiny` (tests).

All presets build the same code; they differ only in widths, depths and grid sizes.
"""

from __future__ import annotations

import torch

from MedSynLib.anatomy import STRUCTURE_SETS
from MedSynLib.diffusion.schedules import DiffusionConfig
from MedSynLib.errors import MedSynError
from MedSynLib.geometry import NOMINAL_FIELD_OF_VIEW_MM
from MedSynLib.networks.unet import UNet3D, UNet3DConfig
from MedSynLib.pipeline.channels import ChannelLayout
from MedSynLib.pipeline.generation import MedSynPipeline
from MedSynLib.pipeline.model_folder import ModelConfig, Stage, StageConfig
from MedSynLib.text_encoder import EMBEDDED_ENCODER, TextEncoderConfig

# Per preset and stage: network overrides, cube size and default sampling settings (DiffusionConfig fields).
PRESETS: dict[str, dict] = {
    "paper": {
        "stage1": {"dim": 160, "dim_mults": (1, 2, 4, 8), "attn_heads": 8, "attn_head_dim": 32, "num_middle_blocks": 4},
        "stage1_size": 64,
        "stage1_sampling": {"num_steps": 50},
        "stage2": {"dim": 56, "dim_mults": (1, 2, 4, 8), "attn_heads": 8, "attn_head_dim": 32, "num_middle_blocks": 1},
        "stage2_size": 256,
        "stage2_sampling": {"num_steps": 20},
    },
    "small": {
        "stage1": {"dim": 32, "dim_mults": (1, 2, 4), "attn_heads": 4, "attn_head_dim": 32, "num_middle_blocks": 2},
        "stage1_size": 64,
        "stage1_sampling": {"num_steps": 50},
        "stage2": {"dim": 16, "dim_mults": (1, 2, 4), "attn_heads": 2, "attn_head_dim": 16, "num_middle_blocks": 1},
        "stage2_size": 128,
        "stage2_sampling": {"num_steps": 10},
    },
    # The paper's two stages in miniature, sized to learn the report on 2 CPU cores and to generate
    # in under 30 s there: stage 1 at 32^3 (10 mm voxels; ~6 training samples/s), which reads the
    # report through cross-attention and a pooled-text path into the time embedding; stage 2
    # super-resolves x4 to 128^3 as the paper goes 64^3 -> 256^3. Isotropic downsampling, 3x3x3
    # stems, few channels at full resolution, few solver steps; stage 2 keeps stage 1 below a 1-voxel
    # low-pass (diffusion.consistency), which its brief training does not learn to do.
    "demo": {
        "stage1": {"dim": 16, "dim_mults": (1, 2, 4, 8), "attn_heads": 4, "attn_head_dim": 32, "num_middle_blocks": 1,
                   "downsampling": "isotropic", "init_kernel": 3, "pooled_text": True},
        "stage1_size": 32,
        "stage1_sampling": {"num_steps": 8, "sampler": "dpm++2m", "guidance_scale": 2.0},
        "stage2": {"dim": 8, "dim_mults": (1, 2, 4), "attn_heads": 2, "attn_head_dim": 16, "num_middle_blocks": 1,
                   "downsampling": "isotropic", "init_kernel": 3, "norm_groups": 4},
        "stage2_size": 128,
        "stage2_sampling": {"num_steps": 3, "sampler": "dpm++2m", "lowres_consistency": 1.0},
    },
    "tiny": {
        "stage1": {"dim": 8, "dim_mults": (1, 2), "attn_heads": 2, "attn_head_dim": 8, "num_middle_blocks": 1,
                   "init_kernel": 3},
        "stage1_size": 16,
        "stage1_sampling": {"num_steps": 4},
        "stage2": {"dim": 8, "dim_mults": (1, 2), "attn_heads": 2, "attn_head_dim": 8, "num_middle_blocks": 1,
                   "init_kernel": 3},
        "stage2_size": 32,
        "stage2_sampling": {"num_steps": 4},
    },
}


def stage_configs(
    preset: str, *, channels: int, text_dim: int, text_tokens: int = 192
) -> tuple[StageConfig, StageConfig]:
    if preset not in PRESETS:
        raise MedSynError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    spec = PRESETS[preset]
    stage1 = StageConfig(
        UNet3DConfig(in_channels=channels, out_channels=channels, text_dim=text_dim, text_tokens=text_tokens,
                     **spec["stage1"]),
        DiffusionConfig(**spec["stage1_sampling"]),
        spec["stage1_size"],
    )
    stage2 = StageConfig(
        UNet3DConfig(in_channels=channels, out_channels=channels, cond_channels=channels, **spec["stage2"]),
        DiffusionConfig(**spec["stage2_sampling"]),
        spec["stage2_size"],
    )
    return stage1, stage2


def build_pipeline(
    preset: str,
    *,
    structures: str = "lobes",
    channel_encoding: str = "binary",
    ct_window: tuple[float, float] | None = None,
    text_encoder: TextEncoderConfig | None = None,
    text_dim: int = 384,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> MedSynPipeline:
    """A pipeline of the preset with freshly initialised (untrained) weights."""
    text_encoder = text_encoder or TextEncoderConfig(EMBEDDED_ENCODER)
    names = STRUCTURE_SETS[structures] if structures in STRUCTURE_SETS else tuple(structures.split(","))
    try:
        layout = ChannelLayout(tuple(names), channel_encoding, ct_window)
    except ValueError as error:
        raise MedSynError(str(error)) from error
    s1, s2 = stage_configs(preset, channels=layout.num_channels, text_dim=text_dim, text_tokens=text_encoder.max_tokens)
    torch.manual_seed(seed)
    with torch.device(device):
        networks = UNet3D(s1.network).eval(), UNet3D(s2.network).eval()
    config = ModelConfig(
        structures=layout.structures,
        channel_encoding=channel_encoding,
        ct_window=layout.ct_window,
        spacing_mm=(NOMINAL_FIELD_OF_VIEW_MM / s2.size,) * 3,
        trained=False,
        description=f"untrained {preset} preset (random weights)",
    )
    return MedSynPipeline(config, Stage(s1, networks[0]), Stage(s2, networks[1]), text_encoder)
