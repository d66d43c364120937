"""Low-frequency consistency: super-resolution that adds detail to the low-res volume, not redraws it.

Stage 2 is conditioned on stage 1's volume, but a small network trained briefly need not keep
it: on the demonstration model it shifted soft tissue by ~50 HU and erased effusions it was
handed (docs/evaluation/demo_model/). ILVR (Choi et al., ICCV 2021) and DDNM (Wang et al., ICLR
2023) keep a sample consistent with a low-resolution reference by replacing its low frequencies
with the reference's at each step. Here each x_0 estimate's CT channels get

    x_0 <- x_0 + G(up(y)) - G(x_0)

with G a Gaussian low-pass of `sigma` output voxels and up(y) the stage-1 volume interpolated
between the voxels it sampled (voxel i of the x1/f grid is voxel f*i of the output, the
reference's nearest degradation). Frequencies above G's band stay stage 2's; a density bias,
which is all low frequency, goes. Anatomy channels are left alone: they are thresholded, and
stage 2's sharper masks are what it is for. Structures thinner than a stage-1 voxel (the
airway lumen, vessels) are not in stage 1's volume at all: where the x_0 estimate's own masks
of them lie (one voxel dilated), the CT keeps stage 2's values. Without that exemption the
demonstration model's trachea was filled to stage 1's blurred density and its airway was lost
to segmentation (consistency Dice 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian low-pass of (b, c, d, h, w) over the last three axes; edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0] * 6
        padding[2 * (2 - axis)] = padding[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        weight = kernel.view(shape).expand(channels, -1, -1, -1, -1)
        x = F.conv3d(F.pad(x, padding, mode="replicate"), weight, groups=channels)
    return x


def interpolate_samples(low: torch.Tensor, factor: int) -> torch.Tensor:
    """Trilinear upsampling x factor of a grid whose voxel i is the output's voxel factor*i;
    the last factor - 1 voxels of each axis, past the last sample, repeat it."""
    size = low.shape[-1]
    inner = F.interpolate(low, size=((size - 1) * factor + 1,) * 3, mode="trilinear", align_corners=True)
    return F.pad(inner, [0, factor - 1] * 3, mode="replicate")


class LowFrequencyConsistency:
    """x_0 correction for stage 2: the given channels' low frequencies become the low-res volume's."""

    def __init__(self, low: torch.Tensor, factor: int, channels: Sequence[int], sigma: float,
                 exempt: Sequence[int] = ()):
        """channels: those corrected (the CT); exempt: mask channels (inside > 0) where they are not."""
        if sigma <= 0:
            raise ValueError(f"the consistency low-pass needs sigma > 0 voxels, got {sigma}")
        self.channels, self.exempt, self.sigma = list(channels), list(exempt), sigma
        self.reference = gaussian_blur(interpolate_samples(low[:, self.channels].float(), factor), sigma)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        kept = x0[:, self.channels]
        correction = self.reference.to(kept) - gaussian_blur(kept, self.sigma)
        if self.exempt:
            inside = (x0[:, self.exempt] > 0).any(dim=1, keepdim=True).to(kept)
            correction = correction * (1 - F.max_pool3d(inside, 3, stride=1, padding=1))
        corrected = x0.clone()
        corrected[:, self.channels] = kept + correction
        return corrected
