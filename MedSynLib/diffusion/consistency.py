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
which is all low frequency, goes. In this plain form the anatomy channels are left alone: stage
2's sharper masks are what it is for. Structures thinner than a stage-1 voxel (the
airway lumen, vessels) are not in stage 1's volume at all: where the x_0 estimate's own masks
of them lie (one voxel dilated), the CT keeps stage 2's values. Without that exemption the
demonstration model's trachea was filled to stage 1's blurred density and its airway was lost
to segmentation (consistency Dice 0).

Tissue-wise (`tissue`: the lung mask channels): a plain low-pass carries stage 1's
lung-to-tissue ramp, ~4 output voxels wide, into every sample. The generated lung bases
came out blurred, and a pleural effusion no longer touched the lung (the effusion detector
found 0 of 3 that stage 1 had drawn). So the lung channels themselves get the low-pass
correction, which makes stage 2's lungs follow stage 1's. The CT's low frequencies are then
taken inside and outside those lungs separately (normalized convolution, as in
edge-preserving filters): with G_m(v) = G(m v) / G(m), a voxel of class m gets
G_m(stage 1) - G_m(x_0). Stage-1 samples stand unblurred here (nearest, as stage 2 is
conditioned), so no value mixes lung and tissue, and the edge is where stage 2's mask puts it.
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


MIN_TISSUE_WEIGHT = 0.05  # a class's low-pass weight below which its local mean is not trusted


def _inside(x: torch.Tensor, mask_channels: list[int]) -> torch.Tensor:
    """(b, 1, d, h, w) float: 1 where any of the binary-encoded mask channels is > 0."""
    return (x[:, mask_channels] > 0).any(dim=1, keepdim=True).float()


def _class_lowpass(x: torch.Tensor, member: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized convolution: the Gaussian mean of x over one class's voxels, and its weight."""
    weight = gaussian_blur(member, sigma)
    return gaussian_blur(x * member, sigma) / weight.clamp_min(MIN_TISSUE_WEIGHT), weight


class LowFrequencyConsistency:
    """x_0 correction for stage 2: the given channels' low frequencies become the low-res volume's."""

    def __init__(self, low: torch.Tensor, factor: int, channels: Sequence[int], sigma: float,
                 exempt: Sequence[int] = (), tissue: Sequence[int] = ()):
        """channels: those corrected (the CT); exempt: mask channels (inside > 0) where they are not;
        tissue: binary lung mask channels, for the tissue-wise correction (module docstring)."""
        if sigma <= 0:
            raise ValueError(f"the consistency low-pass needs sigma > 0 voxels, got {sigma}")
        self.channels, self.exempt, self.tissue, self.sigma = list(channels), list(exempt), list(tissue), sigma
        low = low.float()
        if self.tissue:
            self.mask_reference = gaussian_blur(interpolate_samples(low[:, self.tissue], factor), sigma)
            samples = F.interpolate(low, scale_factor=factor, mode="nearest")
            lung = _inside(samples, self.tissue)
            self.class_references = [_class_lowpass(samples[:, self.channels], member, sigma)
                                     for member in (lung, 1 - lung)]
        else:
            self.reference = gaussian_blur(interpolate_samples(low[:, self.channels], factor), sigma)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        corrected = x0.clone()
        kept = x0[:, self.channels].float()
        if self.tissue:
            masks = x0[:, self.tissue].float()
            corrected[:, self.tissue] = (masks + self.mask_reference - gaussian_blur(masks, self.sigma)).to(x0)
            lung = _inside(corrected, self.tissue)
            correction = torch.zeros_like(kept)
            for member, (reference, reference_weight) in zip((lung, 1 - lung), self.class_references):
                own, own_weight = _class_lowpass(kept, member, self.sigma)
                trusted = (reference_weight > MIN_TISSUE_WEIGHT) & (own_weight > MIN_TISSUE_WEIGHT)
                correction += member * trusted * (reference - own)
        else:
            correction = self.reference - gaussian_blur(kept, self.sigma)
        if self.exempt:
            inside = _inside(x0, self.exempt)
            correction = correction * (1 - F.max_pool3d(inside, 3, stride=1, padding=1))
        corrected[:, self.channels] = (kept + correction).to(x0)
        return corrected
