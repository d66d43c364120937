"""Pluggable anatomy segmentation of chest CT: a name -> a callable giving AnatomyMasks.

- ``classical`` (default): thresholds and morphology, no weights; lungs, airway, vessels
  (structure set ``"lungs"``: lobes need a trained model).
- ``totalsegmentator``: the five lobes, airway and vessels from TotalSegmentator, for
  users who have it installed (structure set ``"lobes"``, as in the paper).

Every segmenter takes a SimpleITK image in HU and returns boolean (z, y, x) masks in that
image's grid, keyed by ``anatomy.STRUCTURES`` names.
"""

from __future__ import annotations

from collections.abc import Callable

import SimpleITK as sitk

from MedSynLib.data.segmentation.classical import AnatomyMasks, ClassicalParameters, segment_classical
from MedSynLib.data.segmentation.totalsegmentator import segment_totalsegmentator

Segmenter = Callable[[sitk.Image], AnatomyMasks]

SEGMENTERS: dict[str, Segmenter] = {
    "classical": segment_classical,
    "totalsegmentator": segment_totalsegmentator,
}
DEFAULT_SEGMENTER = "classical"

# The anatomy.STRUCTURE_SETS entry each segmenter can fill.
SEGMENTER_STRUCTURE_SETS: dict[str, str] = {
    "classical": "lungs",
    "totalsegmentator": "lobes",
}


def get_segmenter(name: str) -> Segmenter:
    """The segmenter registered under ``name``; ValueError naming the known ones otherwise."""
    try:
        return SEGMENTERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown segmenter {name!r}; known: {sorted(SEGMENTERS)}") from None


__all__ = [
    "DEFAULT_SEGMENTER",
    "SEGMENTERS",
    "SEGMENTER_STRUCTURE_SETS",
    "AnatomyMasks",
    "ClassicalParameters",
    "Segmenter",
    "get_segmenter",
    "segment_classical",
    "segment_totalsegmentator",
]
