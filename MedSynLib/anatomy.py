"""The anatomical structures MedSyn generates, as data.

One table holds every structure a model may generate: its label value in label maps,
its display color and the SNOMED CT codes 3D Slicer uses in segment terminology. A
model config names the structures it was trained with (a *structure set*), so the
table is the only place these facts live.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# 3D Slicer terminology contexts (the strings Slicer writes into .seg.nrrd tags). Slicer's
# terminology selector looks a type code up in the context an entry names: the General Anatomy
# list has the lobes and lungs but not the airway or blood vessels, which Slicer's DICOM master
# list has under "Anatomical Structure" (Modules/Loadable/Terminologies/Resources, Slicer 5.6-5.13).
SLICER_CATEGORY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
LEFT = ("SCT", "7771000", "Left")
RIGHT = ("SCT", "24028007", "Right")


@dataclass(frozen=True)
class Structure:
    """One anatomical structure: identity, label-map value, color and terminology."""

    name: str
    label: int
    color: tuple[float, float, float]
    snomed_type: tuple[str, str, str]
    snomed_modifier: tuple[str, str, str] | None = None

    @property
    def display_name(self) -> str:
        return self.name.replace("_", " ")

    def terminology(self) -> dict:
        """Terminology entry in the dict form `slicerio` reads and writes."""
        entry = {
            "contextName": CATEGORY_CONTEXTS.get(self.snomed_type[1], SLICER_CATEGORY_CONTEXT),
            "category": list(ANATOMICAL_STRUCTURE),
            "type": list(self.snomed_type),
            "anatomicContextName": SLICER_ANATOMIC_CONTEXT,
        }
        if self.snomed_modifier is not None:
            entry["typeModifier"] = list(self.snomed_modifier)
        return entry


def _rgb(hex_color: str) -> tuple[float, float, float]:
    value = int(hex_color.lstrip("#"), 16)
    return tuple(round(((value >> shift) & 0xFF) / 255.0, 4) for shift in (16, 8, 0))


AIRWAY = ("SCT", "89187006", "Airway structure")
BLOOD_VESSEL = ("SCT", "59820001", "Blood vessel")
# Type codes the General Anatomy list lacks -> the context that lists them.
CATEGORY_CONTEXTS = {AIRWAY[1]: DICOM_MASTER_CONTEXT, BLOOD_VESSEL[1]: DICOM_MASTER_CONTEXT}

UPPER_LOBE = ("SCT", "45653009", "Upper lobe of lung")
LOWER_LOBE = ("SCT", "90572001", "Lower lobe of lung")
MIDDLE_LOBE = ("SCT", "72481006", "Middle lobe of right lung")
LUNG = ("SCT", "39607008", "Lung")

STRUCTURES: dict[str, Structure] = {
    s.name: s
    for s in (
        Structure("left_upper_lobe", 1, _rgb("#80ae80"), UPPER_LOBE, LEFT),
        Structure("left_lower_lobe", 2, _rgb("#f1d691"), LOWER_LOBE, LEFT),
        Structure("right_upper_lobe", 3, _rgb("#b17a65"), UPPER_LOBE, RIGHT),
        Structure("right_middle_lobe", 4, _rgb("#6fb8d2"), MIDDLE_LOBE),
        Structure("right_lower_lobe", 5, _rgb("#d8654f"), LOWER_LOBE, RIGHT),
        Structure("airway", 6, _rgb("#b6e5ff"), AIRWAY),
        Structure("vessels", 7, _rgb("#d81e1e"), BLOOD_VESSEL),
        Structure("left_lung", 8, _rgb("#80ae80"), LUNG, LEFT),
        Structure("right_lung", 9, _rgb("#b17a65"), LUNG, RIGHT),
    )
}

LOBES: tuple[str, ...] = (
    "left_upper_lobe",
    "left_lower_lobe",
    "right_upper_lobe",
    "right_middle_lobe",
    "right_lower_lobe",
)
LEFT_LOBES: tuple[str, ...] = LOBES[:2]
RIGHT_LOBES: tuple[str, ...] = LOBES[2:]

# The structure sets a dataset or model can be built on.
STRUCTURE_SETS: dict[str, tuple[str, ...]] = {
    # The paper's: 5 lobes, airway, vessels.
    "lobes": LOBES + ("airway", "vessels"),
    # What a weight-free segmenter can find: lungs without lobes.
    "lungs": ("left_lung", "right_lung", "airway", "vessels"),
}

# Label maps hold one structure per voxel; thin structures win over the lung they run in.
_LABEL_PRIORITY = ("vessels", "airway")


def resolve_structures(names: list[str] | tuple[str, ...] | str) -> tuple[Structure, ...]:
    """Structures for a set name (e.g. "lobes") or a list of structure names."""
    if isinstance(names, str):
        if names not in STRUCTURE_SETS:
            raise ValueError(f"unknown structure set {names!r}; known: {sorted(STRUCTURE_SETS)}")
        names = STRUCTURE_SETS[names]
    unknown = [n for n in names if n not in STRUCTURES]
    if unknown:
        raise ValueError(f"unknown structure(s) {unknown}; known: {sorted(STRUCTURES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"structure names repeat: {list(names)}")
    return tuple(STRUCTURES[n] for n in names)


def masks_to_label_map(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Merge binary masks into one uint8 label map (vessels and airway drawn last)."""
    if not masks:
        raise ValueError("no masks to merge")
    order = [n for n in masks if n not in _LABEL_PRIORITY] + [n for n in _LABEL_PRIORITY if n in masks]
    shape = next(iter(masks.values())).shape
    label_map = np.zeros(shape, dtype=np.uint8)
    for name in order:
        mask = np.asarray(masks[name], dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask {name!r} has shape {mask.shape}, expected {shape}")
        label_map[mask] = STRUCTURES[name].label
    return label_map


def label_map_to_masks(label_map: np.ndarray, structures: tuple[Structure, ...]) -> dict[str, np.ndarray]:
    """Split a label map into one boolean mask per structure.

    A label map of the lobe set also yields each lung as the union of its lobes when the
    structures asked for are lungs, so lobe-level anatomy can condition a lung-level model.
    """
    label_map = np.asarray(label_map)
    present = set(np.unique(label_map).tolist()) - {0}
    known = {s.label for s in STRUCTURES.values()}
    unknown = sorted(present - known)
    if unknown:
        if unknown[0] < 0 or len(unknown) > len(known):  # HU values: a CT given where labels belong
            raise ValueError(f"this looks like a CT, not a label map (values from {unknown[0]} to {unknown[-1]})")
        raise ValueError(f"label map has values {unknown} that name no structure")
    masks = {}
    for structure in structures:
        mask = label_map == structure.label
        if structure.name in ("left_lung", "right_lung"):
            lobes = LEFT_LOBES if structure.name == "left_lung" else RIGHT_LOBES
            for lobe in lobes:
                mask |= label_map == STRUCTURES[lobe].label
        masks[structure.name] = mask
    return masks


def standard_masks(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fill in left/right lungs as unions of lobes when only lobes are given."""
    masks = dict(masks)
    for lung, lobes in (("left_lung", LEFT_LOBES), ("right_lung", RIGHT_LOBES)):
        present = [masks[lobe] for lobe in lobes if lobe in masks]
        if present:
            union = np.logical_or.reduce(present)
            masks[lung] = union | masks[lung] if lung in masks else union
    return masks


# ----------------------------------------------------------------------------- segments of other tools
# One matcher for every way a segmentation reaches the model (Slicer's segments, a .seg.nrrd file
# given to `generate --anatomy`): by terminology first, then by name.
_FILLER_WORDS = frozenset({"of", "the", "lung", "lungs", "pulmonary", "structure", "segment"})
_NAME_ALIASES: dict[str, tuple[str, ...]] = {
    "left_upper_lobe": ("LUL",),
    "left_lower_lobe": ("LLL",),
    "right_upper_lobe": ("RUL",),
    "right_middle_lobe": ("RML",),
    "right_lower_lobe": ("RLL",),
    "airway": (
        "airways", "trachea bronchia", "trachea and bronchi", "trachea and bronchus", "bronchial tree", "airway tree",
    ),
    "vessels": ("blood vessels", "vasculature", "vessel tree"),
}


def _name_key(name: str) -> frozenset[str]:
    """Words of a name, case-, separator- and plural-insensitive, filler words dropped."""
    words = set()
    for word in re.split(r"[^a-z0-9]+", name.lower()):
        if not word or word in _FILLER_WORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us")):  # bronchus, not bronchu
            word = word[:-1]
        words.add(word)
    return frozenset(words)


def _structure_name_keys() -> dict[frozenset[str], str]:
    keys: dict[frozenset[str], str] = {}
    for structure in STRUCTURES.values():
        for name in (structure.name, structure.display_name, *_NAME_ALIASES.get(structure.name, ())):
            keys[_name_key(name)] = structure.name
    return keys


def _terminology_key(terminology: dict) -> tuple[str, str, str] | None:
    kind = terminology.get("type")
    if not kind or len(kind) < 2 or not kind[1]:
        return None
    modifier = terminology.get("typeModifier") or ["", "", ""]
    return (kind[0], kind[1], modifier[1] if len(modifier) > 1 else "")


# Codes other tools use for a MedSyn structure: TotalSegmentator (and Slicer's TotalSegmentator
# terminology) tag lung_trachea_bronchia and lung_airways "Trachea and bronchus".
_OTHER_TERMINOLOGY_KEYS: dict[tuple[str, str, str], str] = {("SCT", "110726009", ""): "airway"}
# MedSyn's structures are in the lungs: a terminology placing one elsewhere (TotalSegmentator's
# liver_vessels is "Blood vessel" in the liver) is another structure, whatever its name.
_LUNG_REGION = ("SCT", "39607008")


def _structure_terminology_keys() -> dict[tuple[str, str, str], str]:
    return {**_OTHER_TERMINOLOGY_KEYS, **{_terminology_key(s.terminology()): s.name for s in STRUCTURES.values()}}


def _outside_the_lungs(terminology: dict) -> bool:
    region = terminology.get("anatomicRegion") or []
    return len(region) > 1 and bool(region[1]) and tuple(region[:2]) != _LUNG_REGION


def structure_for_segment_entry(name: str, terminology: dict | None = None) -> str | None:
    """The MedSyn structure a segment stands for (its terminology in slicerio's dict form decides
    when it names one; a terminology outside the lungs is another structure), else by name."""
    if terminology:
        if _outside_the_lungs(terminology):
            return None
        key = _terminology_key(terminology)
        match = _structure_terminology_keys().get(key) if key else None
        if match:
            return match
    key = _name_key(name)
    return _structure_name_keys().get(key) if key else None
