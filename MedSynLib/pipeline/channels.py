"""How a CT and its anatomy are packed into the channels the diffusion models generate.

Channel 0 is the CT: HU clipped to [-1024, 600] and mapped linearly to [-1, 1], as in the
reference (back to HU: 812 x - 212). The anatomy follows in one of two encodings:
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


def hu_to_unit(hu: torch.Tensor) -> torch.Tensor:
    return (hu.float().clamp(HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN) * 2.0 - 1.0


def unit_to_hu(x: torch.Tensor) -> torch.Tensor:
    """Inverse of hu_to_unit, rounded to int16 (outputs are clipped to [-1, 1] first)."""
    return ((x.float().clamp(-1, 1) + 1.0) / 2.0 * (HU_MAX - HU_MIN) + HU_MIN).round().to(torch.int16)


@dataclass(frozen=True)
class ChannelLayout:
    """The structures a model generates and how they are encoded after the CT channel."""

    structures: tuple[str, ...]
    encoding: str = "binary"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"channel encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        resolve_structures(self.structures)
        if self.encoding == "reference" and set(self.structures) != set(LOBES) | {"airway", "vessels"}:
            raise ValueError("the reference encoding needs the 'lobes' structure set (5 lobes, airway, vessels)")

    @property
    def num_channels(self) -> int:
        return 4 if self.encoding == "reference" else 1 + len(self.structures)

    def channels_of(self, names: list[str] | tuple[str, ...]) -> list[int]:
        """Indices (in the full model channels, CT = 0) that encode the given structures."""
        if self.encoding == "binary":
            return sorted(1 + self.structures.index(n) for n in names)
        groups = {**{lobe: 1 for lobe in LOBES}, "airway": 2, "vessels": 3}
        return sorted({groups[n] for n in names})

    def encode_anatomy(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masks (each (..., D, H, W), bool) -> anatomy channels (..., C-1, D, H, W) in [-1, 1].

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
        """Anatomy channels (..., C-1, D, H, W) -> boolean masks per structure."""
        if self.encoding == "binary":
            return {name: channels.select(-4, i) > 0 for i, name in enumerate(self.structures)}
        lobe_label = ((channels.select(-4, 0).clamp(-1, 1) + 1) / 2 * 5).round()
        masks = {name: lobe_label == STRUCTURES[name].label for name in LOBES}
        masks["airway"] = channels.select(-4, 1) > 0
        masks["vessels"] = channels.select(-4, 2) > 0
        return masks

    def encode(self, ct_hu: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """CT in HU (..., D, H, W) and masks -> model channels (..., C, D, H, W)."""
        return torch.cat([hu_to_unit(ct_hu).unsqueeze(-4), self.encode_anatomy(masks)], dim=-4)

    def encode_arrays(self, ct_hu: np.ndarray, masks: dict[str, np.ndarray]) -> torch.Tensor:
        """`encode` for numpy arrays, as prepared cases hold them."""
        return self.encode(torch.from_numpy(ct_hu), {n: torch.from_numpy(m) for n, m in masks.items()})

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return unit_to_hu(x.select(-4, 0)), self.decode_anatomy(x.narrow(-4, 1, x.shape[-4] - 1))


def masks_to_numpy(masks: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: mask.cpu().numpy().astype(bool) for name, mask in masks.items()}
