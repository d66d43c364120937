"""How a network is applied to a volume: whole, or in overlapping tiles blended smoothly.

Stage 2 of the paper preset at 256^3 needs ~33 GB in one pass; run in slabs of slices
(or smaller tiles) its memory is bounded by the tile. Tiling lives here, apart from the
networks and the pipeline, and uses MONAI's sliding-window inference (Gaussian blending,
stitching on a separate device) rather than a hand-written copy of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiling:
    """Tile size per axis (D, H, W); -1 takes the whole axis, so (64, -1, -1) means slabs of 64 slices."""

    size: tuple[int, int, int]
    overlap: float = 0.25
    blend: str = "gaussian"  # or "constant"

    def __post_init__(self) -> None:
        if len(self.size) != 3 or any(s == 0 or s < -1 for s in self.size):
            raise ValueError(f"tile size must be three positive sizes or -1, got {self.size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap must be in [0, 1), got {self.overlap}")
        if self.blend not in ("gaussian", "constant"):
            raise ValueError(f"tile blend must be 'gaussian' or 'constant', got {self.blend!r}")

    @classmethod
    def parse(cls, text: str) -> Tiling:
        """'64' (slabs of 64 slices), '64x128x128', or '64x-1x-1', optionally ':0.5' for the overlap."""
        spec, _, overlap = text.partition(":")
        try:
            sizes = [int(s) for s in spec.lower().split("x")]
            overlap_value = float(overlap) if overlap else 0.25
        except ValueError as error:
            raise ValueError(f"cannot read tile spec {text!r}; use e.g. 64 or 64x128x128 or 64:0.5") from error
        if len(sizes) == 1:
            sizes += [-1, -1]
        return cls(tuple(sizes), overlap_value)


# A whole-volume stage-2 pass holds about this many bytes per voxel per channel of the network's
# first level (`dim`): 47 (demo, 128^3) to 62 (paper, 64^3) measured on CPU in fp32
# (benchmarks/bench_step.py, benchmarks/README.md); rounded up.
BYTES_PER_VOXEL_PER_DIM = 64
# Tiles of 64^3 keep the paper preset's stage 2 at 256^3 to 3.3 GB peak on CPU (96^3: 4.7 GB), and
# MONAI's scan visits fewer voxels with them (125 tiles, 1.95x the volume; 96^3 tiles: 3.4x).
DEFAULT_TILING = Tiling((64, 64, 64), 0.25)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a pass on `device` (None when the platform cannot say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None


def automatic_tiling(dim: int, size: int, available: int | None) -> Tiling | None:
    """The whole volume when its estimated pass fits in half of `available` bytes, else DEFAULT_TILING."""
    whole = BYTES_PER_VOXEL_PER_DIM * dim * size**3
    if available is None or 2 * whole <= available or size <= max(DEFAULT_TILING.size):
        return None
    return DEFAULT_TILING


def apply_network(
    network_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    tiling: Tiling | None = None,
) -> torch.Tensor:
    """network_fn(inputs), whole or tile by tile (Gaussian-blended), on inputs' device."""
    if tiling is None:
        return network_fn(inputs)
    from monai.inferers import sliding_window_inference  # imported on demand: it costs seconds

    return sliding_window_inference(
        inputs,
        roi_size=tiling.size,
        sw_batch_size=1,
        predictor=network_fn,
        overlap=tiling.overlap,
        mode=tiling.blend,
        sw_device=inputs.device,
        device=inputs.device,
    )
