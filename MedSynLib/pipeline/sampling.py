"""The sampling engine shared by generation and training previews: devices, the two stages'
network outputs (guidance, tiling) and one stage's sampler run with clipping and imposed anatomy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from MedSynLib.diffusion.consistency import LowFrequencyConsistency
from MedSynLib.diffusion.samplers import classifier_free_guidance, denoise_loop, make_sampler
from MedSynLib.diffusion.schedules import prediction_to_x0
from MedSynLib.errors import MedSynError
from MedSynLib.networks.unet import UNet3D
from MedSynLib.pipeline.model_folder import StageConfig
from MedSynLib.pipeline.tiling import Tiling, apply_network

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # what resolve_dtype accepts

ProgressCallback = Callable[[str, int, int], None]


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


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX: bf16 arithmetic in hardware (emulated bf16 is no faster than fp32)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, private but long-standing
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' is bfloat16 on CPUs with native bf16 (1.5-2.6x faster than fp32 here at ~2 % RMS
    difference, benchmarks/README.md) and float32 elsewhere; other names are kept."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cpu" and cpu_has_native_bfloat16() else "float32"
    if dtype not in DTYPES:
        raise MedSynError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    return dtype


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
    *,
    sampler_name: str | None = None,
    anatomy: tuple[list[int], torch.Tensor] | None = None,
    x0_correction: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: str = "float32",
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Run one stage's sampler; x0 is corrected (if asked), clipped and, if given, anatomy channels are imposed.

    anatomy: None or (channel indices, their values as anatomy channels (1, C - CT channels, D, H, W)).
    """
    diffusion = config.diffusion
    schedule = diffusion.make_schedule()
    sampler = make_sampler(sampler_name or diffusion.sampler, schedule, steps, diffusion.time_spacing)
    autocast = torch.autocast(x_T.device.type, dtype=DTYPES[dtype], enabled=dtype != "float32")
    if anatomy is not None:
        channels, values = anatomy
        keep = torch.zeros(1, x_T.shape[1], 1, 1, 1, dtype=torch.bool, device=x_T.device)
        keep[:, channels] = True
        ct_channels = x_T.shape[1] - values.shape[1]
        target = torch.cat([torch.zeros_like(x_T[:, :ct_channels]).to(values), values], dim=1)

    def x0_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast:
            output = output_fn(x, t)
        x0 = prediction_to_x0(output.float(), x, t, schedule, diffusion.prediction_type)
        if x0_correction is not None:
            x0 = x0_correction(x0)
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


def super_resolve(
    network: UNet3D,
    config: StageConfig,
    low: torch.Tensor,
    x_T: torch.Tensor,
    steps: int,
    *,
    ct_channels: int = 1,
    exempt_channels: Sequence[int] = (),
    lung_channels: Sequence[int] = (),
    consistency: float = 0.0,
    tiling: Tiling | None = None,
    **sampler_options,
) -> torch.Tensor:
    """Stage 2: x_T at the output size -> x_0, conditioned on the nearest-upsampled low-res volume.

    consistency: sigma (output voxels) of the low-pass the CT channels share with `low`; 0 = off; not
        where `exempt_channels` (masks of structures stage 1 cannot hold) lie; inside and outside
        the lungs apart when `lung_channels` are given, whose own low frequencies follow `low`.
    sampler_options: run_sampler's sampler_name, anatomy, dtype, progress.
    """
    low = low.clamp(-1, 1)
    condition = nearest_resize(low, config.size)
    correction = None
    if consistency:
        correction = LowFrequencyConsistency(low, config.size // low.shape[-1], range(ct_channels), consistency,
                                             exempt_channels, lung_channels)
    output = super_resolution_output(network, condition, tiling)
    return run_sampler("stage2", output, x_T, config, steps, x0_correction=correction, **sampler_options)
