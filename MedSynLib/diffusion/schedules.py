"""Continuous-time Gaussian diffusion: noise schedules, the forward process and prediction types.

Notation (as in the DDIM and DPM-Solver papers): x_t = alpha_t * x_0 + sigma_t * eps with
alpha_t^2 = alpha_bar(t), sigma_t^2 = 1 - alpha_bar(t), t ~ U(0, 1). The networks are
free to predict x_0 (MedSyn's choice), eps or v = alpha_t * eps - sigma_t * x_0; the
samplers always work with the implied x_0, so they never ask which one it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from MedSynLib.errors import MAX_LOWPASS_VOXELS, check_number

PREDICTION_TYPES = ("x0", "epsilon", "v")


class NoiseSchedule:
    """alpha_bar(t) for continuous t in [0, 1], clamped away from 0 and 1 for stability."""

    clamp = (1e-4, 1.0 - 1e-4)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alpha_bar(t.double()).clamp(*self.clamp)
        return alpha_bar.sqrt().float(), (1.0 - alpha_bar).sqrt().float()


class CosineSchedule(NoiseSchedule):
    """The reference's schedule: alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2), s = 0.008."""

    def __init__(self, offset: float = 0.008):
        self.offset = offset

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos((t + self.offset) / (1 + self.offset) * math.pi / 2) ** 2


class LinearSchedule(NoiseSchedule):
    """DDPM's linear betas in continuous form: alpha_bar(t) = exp(-(b0 t + (b1 - b0) t^2 / 2))."""

    def __init__(self, beta_start: float = 0.1, beta_end: float = 20.0):
        self.beta_start, self.beta_end = beta_start, beta_end

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(self.beta_start * t + 0.5 * (self.beta_end - self.beta_start) * t**2))


SCHEDULES: dict[str, Callable[[], NoiseSchedule]] = {
    "cosine": CosineSchedule,
    # The reference's current code (src/utils.py) trains and samples with this same clamp to
    # [1e-4, 1 - 1e-4]; the name stays so that model folders converted earlier load unchanged.
    "cosine_reference": CosineSchedule,
    "linear": LinearSchedule,
}


# How a sampler spaces its times from 1 to 0 (samplers.Sampler.set_timesteps).
TIME_SPACINGS = ("uniform", "quadratic")


@dataclass(frozen=True)
class DiffusionConfig:
    """How a stage was trained and how it samples by default."""

    schedule: str = "cosine"
    prediction_type: str = "x0"
    sampler: str = "ddim"
    num_steps: int = 50
    time_spacing: str = "uniform"  # or "quadratic": the sampler's times (see samplers.Sampler.set_timesteps)
    guidance_scale: float = 1.0
    clip_x0: bool = True  # clip the predicted x_0 to [-1, 1] at every step, as the reference does
    # Stage 2: sigma (output voxels) of the low-pass its CT and lungs share with stage 1's volume; 0 = off
    # (diffusion.consistency.LowFrequencyConsistency).
    lowres_consistency: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.time_spacing not in TIME_SPACINGS:
            raise ValueError(f"time_spacing must be one of {TIME_SPACINGS}, got {self.time_spacing!r}")
        check_number("lowres_consistency", self.lowres_consistency, 0.0, MAX_LOWPASS_VOXELS)

    def make_schedule(self) -> NoiseSchedule:
        return SCHEDULES[self.schedule]()


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with the given noise."""
    alpha, sigma = schedule.alpha_sigma(t)
    return _broadcast(alpha, x0) * x0 + _broadcast(sigma, x0) * noise


def prediction_to_x0(
    output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, prediction_type: str
) -> torch.Tensor:
    """The x_0 implied by a network output of the given prediction type."""
    alpha, sigma = (_broadcast(v, x_t) for v in schedule.alpha_sigma(t))
    if prediction_type == "x0":
        return output
    if prediction_type == "epsilon":
        return (x_t - sigma * output) / alpha
    if prediction_type == "v":
        return alpha * x_t - sigma * output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
