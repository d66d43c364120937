"""The training objective: x_t ~ q(x_t | x_0) formed where the network runs, the target of each
prediction type, and the (optionally focus-weighted) MSE between the two.

The data stream hands over what only the CPU makes cheaply and reproducibly (x_0, the noise
and t, drawn from each sample's own generator); `DiffusionObjective.loss` does the rest on the
device, so a batch carries two volumes, not three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from MedSynLib.diffusion.schedules import PREDICTION_TYPES, NoiseSchedule, _broadcast, add_noise


def training_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, prediction_type: str):
    if prediction_type == "x0":
        return x0
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v":
        alpha, sigma = (_broadcast(v, x0) for v in schedule.alpha_sigma(t))
        return alpha * noise - sigma * x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def focus_weights(x0: torch.Tensor, channels: list[int], weight: float) -> torch.Tensor | None:
    """Per-voxel loss weights (B, 1, D, H, W): 1 + `weight` in and next to the structures of `channels`.

    Airway and vessels fill about 1 % of a chest, so a plain MSE is nearly as low for a network
    that draws none of them. Weighting their neighbourhood (dilated by one voxel, so the
    outside of a border counts as much as its inside) makes them worth learning without
    rewarding false positives elsewhere. None when there is nothing to weight.
    """
    if weight <= 0 or not channels:
        return None
    inside = (x0[:, channels] > 0).any(dim=1, keepdim=True).float()
    return 1.0 + weight * F.max_pool3d(inside, kernel_size=3, stride=1, padding=1)


def weighted_mse(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                 channel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE over all channels and voxels; with voxel `weights` (B, 1, D, H, W) and/or
    `channel_weights` (C,), the mean weighted by their product."""
    squared = (output.float() - target.float()) ** 2
    if weights is None and channel_weights is None:
        return squared.mean()
    combined = torch.ones_like(squared[:, :1]) if weights is None else weights.float()
    combined = combined.expand_as(squared)
    if channel_weights is not None:
        combined = combined * channel_weights.to(squared).view(1, -1, *([1] * (squared.ndim - 2)))
    return (combined * squared).sum() / combined.sum()


@dataclass(frozen=True)
class DiffusionObjective:
    """The loss of a denoiser at (x_0, noise, t): what one training step minimises."""

    schedule: NoiseSchedule
    prediction_type: str
    focus_channels: tuple[int, ...] = ()  # anatomy channels whose neighbourhood weighs 1 + focus_weight
    focus_weight: float = 0.0
    # Loss weight of the CT channels (the first ct_channels) against each anatomy channel. The anatomy channels
    # outnumber it (7 to 1 with the binary encoding), so at 1 the network spends most of its
    # capacity on masks and leaves the CT some 40-60 HU imprecise in soft tissue, more than
    # the 30 HU between fluid and muscle (benchmarks/denoiser_precision.py).
    ct_weight: float = 1.0
    ct_channels: int = 1

    def loss(self, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
             noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = denoiser(add_noise(x0, noise, t, self.schedule), t)
        target = training_target(x0, noise, t, self.schedule, self.prediction_type)
        channel_weights = None
        if self.ct_weight != 1.0:
            channel_weights = torch.ones(x0.shape[1])
            channel_weights[: self.ct_channels] = self.ct_weight
        return weighted_mse(output, target, focus_weights(x0, list(self.focus_channels), self.focus_weight),
                            channel_weights)
