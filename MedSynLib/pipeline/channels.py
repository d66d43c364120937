"""How a CT and its anatomy are packed into the channels the diffusion models generate.

Channel 0 is the CT: HU clipped to [-1024, 600] and mapped linearly to [-1, 1], as in the
reference (back to HU: 812 x - 212). A model may add a soft-tissue window channel after it
(`ct_window`, e.g. -150..150 HU over [-1, 1]): one channel over 1,624 HU makes the 30 HU
between fluid and muscle 0.037 units, which the diffusion noise hides early and the loss
barely sees; in a 300 HU window they are 0.2 units apart. The decoded CT takes the window's
HU where both channels place a voxel inside the window and the full range's elsewhere. The
anatomy follows in one of two encodings:
- "binary" (default): one channel per structure, 1 inside and -1 outside. Overlaps are
  fine and every structure is decoded independently (x > 0).
- "reference": the reference implementation's 4 channels (CT, lobe label, airway,
  vessel). The lobe label 0..5 (anatomy label values of the 5 lobes) is stored as
  label / 5 * 2 - 1 and decoded by rounding; this encoding needs the "lobes" structures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from MedSynLib.anatomy import LOBES, STRUCTURES, resolve_structures
from MedSynLib.hounsfield import MODEL_HU_RANGE

HU_MIN, HU_MAX = MODEL_HU_RANGE
ENCODINGS = ("binary", "reference")
WINDOW_SATURATION_MARGIN = 0.2  # decoding blends to the full-range channel over the window's outer 10 % each side


def hu_to_unit(hu: torch.Tensor) -> torch.Tensor:
    return (hu.float().clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN) * 2.0 - 1.0


def unit_to_hu(x: torch.Tensor) -> torch.Tensor:
    """Inverse of hu_to_unit, rounded to int16 (outputs are clipped to [-1, 1] first)."""
    return ((x.float().clamp(-1, 1) + 1.0) / 2.0 * (HU_MAX - HU_MIN) + HU_MIN).round().to(torch.int16)


def check_ct_window(window) -> tuple[float, float] | None:
    """A (low, high) HU window inside the model's HU range, or None; anything else is a ValueError."""
    if window is None:
        return None
    low, high = (float(v) for v in window)
    if not HU_MIN <= low < high <= HU_MAX:
        raise ValueError(f"ct_window must be (low, high) HU with {HU_MIN} <= low < high <= {HU_MAX}, got {window}")
    return low, high


@dataclass(frozen=True)
class ChannelLayout:
    """The structures a model generates, its CT channels and how the anatomy is encoded after them."""

    structures: tuple[str, ...]
    encoding: str = "binary"
    ct_window: tuple[float, float] | None = None  # HU of the soft-tissue window channel; None: no such channel

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"channel encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        resolve_structures(self.structures)
        if self.encoding == "reference" and set(self.structures) != set(LOBES) | {"airway", "vessels"}:
            raise ValueError("the reference encoding needs the 'lobes' structure set (5 lobes, airway, vessels)")
        object.__setattr__(self, "ct_window", check_ct_window(self.ct_window))
        if self.encoding == "reference" and self.ct_window is not None:
            raise ValueError("the reference encoding has exactly 4 channels: it cannot take a ct_window channel")

    @property
    def ct_channels(self) -> int:
        """How many channels encode the CT (they come first): 1, or 2 with a window channel."""
        return 1 if self.ct_window is None else 2

    @property
    def thin_structure_channels(self) -> list[int]:
        """The channels of the structures thinner than a stage-1 voxel (airway, vessels): where
        they are, stage 2's CT need not follow stage 1's low frequencies (diffusion.consistency)."""
        return self.channels_of([name for name in ("airway", "vessels") if name in self.structures])

    @property
    def lung_channels(self) -> list[int]:
        """The binary-encoded lung and lobe channels: where stage 2's CT takes stage 1's lung and
        tissue densities apart (diffusion.consistency); none for the reference's lobe-label encoding."""
        if self.encoding != "binary":
            return []
        return self.channels_of([name for name in self.structures if name in (*LOBES, "left_lung", "right_lung")])

    @property
    def num_channels(self) -> int:
        return 4 if self.encoding == "reference" else self.ct_channels + len(self.structures)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """What each model channel holds, as named in the saved configs and in fine-tuning's channel mapping."""
        ct = ("ct",) if self.ct_window is None else ("ct", "ct_window")
        if self.encoding == "binary":
            return ct + self.structures
        return ct + ("lobe_label", "airway", "vessels")

    def channels_of(self, names: list[str] | tuple[str, ...]) -> list[int]:
        """Indices (in the full model channels, CT first) that encode the given structures."""
        if self.encoding == "binary":
            return sorted(self.ct_channels + self.structures.index(n) for n in names)
        groups = {**{lobe: 1 for lobe in LOBES}, "airway": 2, "vessels": 3}
        return sorted({groups[n] for n in names})

    def window_affine(self) -> tuple[float, float]:
        """(scale, shift) with window channel = scale * full-range channel + shift inside the window."""
        low, high = self.ct_window
        half = (high - low) / 2
        return (HU_MAX - HU_MIN) / 2 / half, ((HU_MAX + HU_MIN) / 2 - (high + low) / 2) / half

    def encode_ct(self, ct_hu: torch.Tensor) -> torch.Tensor:
        """CT in HU (..., D, H, W) -> the CT channels (..., ct_channels, D, H, W) in [-1, 1]."""
        full = hu_to_unit(ct_hu)
        if self.ct_window is None:
            return full.unsqueeze(-4)
        scale, shift = self.window_affine()
        return torch.stack([full, (scale * full + shift).clamp(-1, 1)], dim=-4)

    def decode_ct(self, channels: torch.Tensor) -> torch.Tensor:
        """CT channels (..., ct_channels, D, H, W) -> HU (int16): the window's where both channels
        place the voxel inside the window, blending to the full range's over the window's edges."""
        full = channels.select(-4, 0).float().clamp(-1, 1)
        if self.ct_window is None:
            return unit_to_hu(full)
        scale, shift = self.window_affine()
        window = channels.select(-4, 1).float().clamp(-1, 1)
        inside = torch.minimum(1 - window.abs(), 1 - (scale * full + shift).abs())
        trust = (inside / WINDOW_SATURATION_MARGIN).clamp(0, 1)
        return unit_to_hu(trust * (window - shift) / scale + (1 - trust) * full)

    def encode_anatomy(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masks (each (..., D, H, W), bool) -> anatomy channels (..., C - ct_channels, D, H, W) in [-1, 1].

        Structures without a mask are encoded as absent.
        """
        if not masks:
            raise ValueError("no anatomy masks to encode")
        empty = torch.zeros_like(next(iter(masks.values())), dtype=torch.bool)
        masks = {n: masks.get(n, empty) for n in self.structures}
        if self.encoding == "binary":
            return torch.stack([masks[n].float() * 2 - 1 for n in self.structures], dim=-4)
        lobe_label = sum(masks[name].float() * STRUCTURES[name].label for name in LOBES)
        lobe_label = lobe_label.clamp(max=5)  # overlapping lobes are a data error; keep the encoding in range
        return torch.stack(
            [lobe_label / 5 * 2 - 1, masks["airway"].float() * 2 - 1, masks["vessels"].float() * 2 - 1], dim=-4
        )

    def decode_anatomy(self, channels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Anatomy channels (..., C - ct_channels, D, H, W) -> boolean masks per structure."""
        if self.encoding == "binary":
            return {name: channels.select(-4, i) > 0 for i, name in enumerate(self.structures)}
        lobe_label = ((channels.select(-4, 0).clamp(-1, 1) + 1) / 2 * 5).round()
        masks = {name: lobe_label == STRUCTURES[name].label for name in LOBES}
        masks["airway"] = channels.select(-4, 1) > 0
        masks["vessels"] = channels.select(-4, 2) > 0
        return masks

    def encode(self, ct_hu: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """CT in HU (..., D, H, W) and masks -> model channels (..., C, D, H, W)."""
        return torch.cat([self.encode_ct(ct_hu), self.encode_anatomy(masks)], dim=-4)

    def encode_arrays(self, ct_hu: np.ndarray, masks: dict[str, np.ndarray]) -> torch.Tensor:
        """`encode` for numpy arrays, as prepared cases hold them."""
        return self.encode(torch.from_numpy(ct_hu), {n: torch.from_numpy(m) for n, m in masks.items()})

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Model channels (..., C, D, H, W) -> CT in HU and boolean masks."""
        ct = self.ct_channels
        return self.decode_ct(x.narrow(-4, 0, ct)), self.decode_anatomy(x.narrow(-4, ct, x.shape[-4] - ct))


def masks_to_numpy(masks: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: mask.cpu().numpy().astype(bool) for name, mask in masks.items()}
