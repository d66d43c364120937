"""Training samples for both stages, reproducible from (seed, sample number) alone.

Every sample of the training stream has a global number k. Which case it shows, its
augmentation, its diffusion time, its noise and whether its text is dropped all derive
from (seed, k), so a resumed run, any number of data workers, and any split of the
global batch over processes see exactly the same samples as one uninterrupted process.

Stage 1: the whole case at the stage-1 size, CT + anatomy channels.
Stage 2 (the reference's recipe): a random patch (a slab of slices x an in-plane crop)
of the stage-2 volume, randomly zoomed and rotated in-plane with its masks, and its
low-resolution condition made by nearest x1/4 then x4 resizing, noise-augmented as
x_lr = (1 - a) x_lr + a N(0, 1) with a ~ U[0, a_max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from MedSynLib.data.prepared import PreparedDataset
from MedSynLib.pipeline.channels import ChannelLayout


@dataclass(frozen=True)
class Augmentation:
    zoom: tuple[float, float] = (0.9, 1.1)
    rotate_degrees: float = 10.0


def keyed_generator(*key: int) -> torch.Generator:
    """A generator seeded from the whole key: (seed, k) pairs never collide, as seed * C + k would."""
    state = np.random.SeedSequence([int(part) for part in key]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def sample_generator(seed: int, k: int) -> torch.Generator:
    return keyed_generator(seed, 0, k)


def case_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=keyed_generator(seed, 1, epoch))


def augment_inplane(x: torch.Tensor, generator: torch.Generator, augmentation: Augmentation, anatomy_from: int) -> torch.Tensor:
    """Random zoom and in-plane rotation of (C, D, H, W), image linearly, masks by nearest neighbour."""
    low, high = augmentation.zoom
    zoom = low + (high - low) * torch.rand(1, generator=generator).item()
    angle = math.radians(augmentation.rotate_degrees * (2 * torch.rand(1, generator=generator).item() - 1))
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    # affine_grid works on (x=W, y=H, z=D); the depth axis is left alone.
    theta = torch.tensor([[cos, -sin, 0.0, 0.0], [sin, cos, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    image = F.grid_sample(x[None, :anatomy_from], grid, mode="bilinear", padding_mode="border", align_corners=False)
    masks = F.grid_sample(x[None, anatomy_from:], grid, mode="nearest", padding_mode="border", align_corners=False)
    return torch.cat([image, masks], dim=1)[0]


class DiffusionSamples(torch.utils.data.Dataset):
    """Item k -> dict(x0, t, noise, condition, text, drop_text) for stage 1 or 2; the objective forms x_t."""

    def __init__(self, dataset: PreparedDataset, *, stage: str, layout: ChannelLayout,
                 seed: int, cfg_drop: float = 0.1, timestep_range: tuple[float, float] = (0.0, 1.0), patch: tuple[int, int, int] = (64, 72, 72),
                 lowres_noise_max: float = 0.4, lowres_noise: str = "shrink", augmentation: Augmentation | None = None):
        self.dataset, self.stage, self.layout = dataset, stage, layout
        self.seed, self.cfg_drop, self.patch, self.lowres_noise_max = seed, cfg_drop, patch, lowres_noise_max
        self.lowres_noise = lowres_noise
        self.augmentation = augmentation
        self.timestep_range = timestep_range

    def __len__(self) -> int:
        return 2**62  # an endless stream, indexed by sample number

    def case_index(self, k: int) -> int:
        n = len(self.dataset)
        return int(case_order(self.seed, k // n, n)[k % n])

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        generator = sample_generator(self.seed, k)
        case = self.dataset.load(self.case_index(k), low_only=self.stage == "stage1")
        if self.stage == "stage1":
            x0 = self.layout.encode_arrays(case.ct_hu_low, case.masks_low)
            sample = {}
        else:
            x0, condition = self._stage2_patch(case, generator)
            sample = {"cond": condition}
        low, high = self.timestep_range
        t = low + (high - low) * torch.rand(1, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        return {
            **sample,
            "x0": x0,
            "t": t[0],
            "noise": noise,
            "text": torch.from_numpy(case.text_features.astype(np.float32)),
            "text_mask": torch.from_numpy(case.text_mask),
            "drop_text": torch.rand(1, generator=generator)[0] < self.cfg_drop,
        }

    def _stage2_patch(self, case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.dataset.size
        factor = size // self.dataset.low_size
        d, h, w = (min(p, size) for p in self.patch)
        z0 = int(torch.randint(0, size - d + 1, (1,), generator=generator))
        # Only the slab is encoded. The reference's degradation (nearest x1/factor, then x factor)
        # makes voxel j a copy of voxel factor * (j // factor) on every axis, so the slab needs
        # the volume from the last multiple of `factor` at or before z0.
        first = z0 - z0 % factor
        slab = self.layout.encode_arrays(case.ct_hu[first : z0 + d], {n: m[first : z0 + d] for n, m in case.masks.items()})
        channels = slab.shape[0]
        rows = torch.arange(size) // factor * factor
        low = slab[:, torch.arange(z0, z0 + d) // factor * factor - first][:, :, rows][:, :, :, rows]
        both = torch.cat([slab[:, z0 - first :], low], dim=0)  # augmentation is in-plane: the slab is enough
        if self.augmentation is not None:  # the CT channels of both first: they are resampled bilinearly
            ct = [c + offset for offset in (0, channels) for c in range(self.layout.ct_channels)]
            order = torch.tensor(ct + [c for c in range(2 * channels) if c not in ct])
            both = augment_inplane(both[order], generator, self.augmentation, anatomy_from=len(ct))[torch.argsort(order)]
        y0, x0 = (int(torch.randint(0, size - p + 1, (1,), generator=generator)) for p in (h, w))
        target, condition = both[:, :, y0 : y0 + h, x0 : x0 + w].split(channels)
        a = self.lowres_noise_max * torch.rand(1, generator=generator).item()
        kept = 1.0 if self.lowres_noise == "additive" else 1 - a  # TrainConfig.lowres_noise
        condition = kept * condition + a * torch.randn(condition.shape, generator=generator)
        return target.contiguous(), condition.contiguous()


class StreamSampler(torch.utils.data.Sampler):
    """This process's sample numbers from `start` on: micro-batch j of optimizer step s on rank r
    with batch b holds k = ((s * accumulation + j) * world + r) * batch + i, i < batch."""

    def __init__(self, *, start_step: int, accumulation: int, world: int, rank: int, batch: int):
        self.start_step, self.accumulation, self.world, self.rank, self.batch = start_step, accumulation, world, rank, batch

    def __iter__(self):
        micro = self.start_step * self.accumulation
        while True:
            base = (micro * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)
            micro += 1

    def __len__(self) -> int:
        return 2**62
