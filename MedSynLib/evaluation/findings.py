"""Text adherence: detectors for the phantom findings, a report reader, and adherence rates.

Each detector works on a CT in HU (LPS (z, y, x): z superior, y posterior, x toward the
patient's left) with its spacing, and on lung masks when given (``left_lung``/``right_lung``,
or lobes, as a generated label map holds them; without masks the classical segmenter's
lungs are used).

- **Nodule** (solid): voxels above -60 HU (above fat and bronchial walls) inside the lungs' envelope (each lung mask with the
  airway and vessel masks, 3D holes filled, eroded by one voxel off the pleura), minus the
  airway and vessel masks when given; without a vessel mask, a 3 mm opening removes thin
  vessels first. Connected blobs of at least ``min_diameter_mm`` (equivalent
  sphere, default 5 mm) that are compact (ratio of the largest to the smallest principal axis
  <= 3) are nodules; the largest is reported, in the lobe (generated lobe masks) or lung it
  overlaps most.
- **Pleural effusion**: fluid density (-30 .. 25 HU after a 1-voxel Gaussian smoothing; muscle
  and blood are ~40 HU, fat -100) outside the lung, in the posterior (dependent) half of that
  lung's extent and within its slices and left-right extent, opened once (removes the
  smoothed shells between fat, muscle and lung) and touching the lung; present when at least ``min_ml`` (default
  5 mL) on a side. The side is the lung it touches.
- **Cardiomegaly**: the cardio-thoracic ratio. In each axial slice the space between the lungs
  (each row filled from the leftmost to the rightmost lung voxel, minus the lungs) holds the
  mediastinum; its soft tissue of blood/myocardium density (15 .. 50 HU after smoothing: fat
  is -100, non-contrast liver ~55 and above) is opened with an 8 mm ball (cuts the bridges
  through oesophagus, aorta and paraspinal muscle) and split into 3D components, of which the
  largest one in front of the lungs' centre is the heart. CTR = the heart's largest left-right
  width over the largest left-right width of the lungs (inner thoracic width); cardiomegaly
  when CTR > ``threshold`` (default 0.48). The opening trims the heart's edges, so this CTR
  reads ~0.03-0.06 below the phantoms' true ratio (docs/evaluation.md). Non-contrast CT only:
  contrast-enhanced blood is far above 50 HU.

`requested_findings` reads a report (the phantom reports' wording and common variants):
for each kind, True (asked for, with its lobe/side), False (denied) or None (not mentioned).
`adherence_rates` turns (requested, detected) pairs into, per kind, the rate at which volumes
show the finding when their report asked for it, and when it denied it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from MedSynLib.anatomy import LOBES, standard_masks
from MedSynLib.compat import zip_strict
from MedSynLib.evaluation.anatomy_metrics import lung_envelope

FINDING_KINDS = ("nodule", "effusion", "cardiomegaly")
_CROSS = ndimage.generate_binary_structure(3, 1)
_FULL = np.ones((3, 3, 3), dtype=bool)


@dataclass
class Detection:
    """Whether a finding is seen, where, and the measurement that decided it."""

    kind: str
    present: bool
    location: str | None = None
    measure: float | None = None  # nodule diameter (mm), effusion volume (mL), CTR
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _lungs(hu: np.ndarray, spacing, masks: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung masks: given ones (lobe unions included) or the classical segmenter's."""
    if masks and ("left_lung" in masks or "right_lung" in masks or any(lobe in masks for lobe in LOBES)):
        full = standard_masks(masks)
        empty = np.zeros(hu.shape, dtype=bool)
        return full.get("left_lung", empty), full.get("right_lung", empty)
    import SimpleITK as sitk

    from MedSynLib.data.segmentation import get_segmenter

    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(tuple(float(s) for s in spacing))
    found = get_segmenter("classical")(image).masks
    return found["left_lung"], found["right_lung"]


def _smooth(hu: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(hu.astype(np.float32), 1.0, truncate=2.0)


def _ball(radius_mm: float, spacing) -> np.ndarray:
    spacing_zyx = np.asarray(spacing[::-1], dtype=float)
    radii = np.maximum(np.floor(radius_mm / spacing_zyx), 1).astype(int)
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    return sum((g * s / radius_mm) ** 2 for g, s in zip_strict(grid, spacing_zyx)) <= 1.0 + 1e-9


def _elongation(coords: np.ndarray, spacing_zyx: np.ndarray) -> float:
    """sqrt of the largest over the smallest eigenvalue of the coordinate covariance (mm)."""
    if len(coords) < 4:
        return 1.0
    points = coords * spacing_zyx
    eigenvalues = np.linalg.eigvalsh(np.cov(points, rowvar=False) + np.eye(3) * (spacing_zyx.min() ** 2) / 12)
    return float(np.sqrt(eigenvalues[-1] / max(eigenvalues[0], 1e-9)))


# --------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------


def detect_nodule(hu: np.ndarray, spacing, masks: dict | None = None, *, min_diameter_mm: float = 5.0,
                  threshold_hu: float = -60.0, max_elongation: float = 3.0) -> Detection:
    """The largest compact soft-tissue blob inside the lungs (see the module docstring)."""
    left, right = _lungs(hu, spacing, masks)
    masks = masks or {}
    # The lungs with the airway and vessels inside them (a label map gives those their own
    # labels), 3D holes filled: a blob the masks leave out but surround counts; the domes of
    # the diaphragm (holes in a slice, open below) do not.
    tubes = np.zeros(hu.shape, dtype=bool)
    for name in ("airway", "vessels"):
        if name in masks:
            tubes |= masks[name]
    envelope = ndimage.binary_fill_holes(left | tubes) | ndimage.binary_fill_holes(right | tubes)
    candidates = (hu > threshold_hu) & ndimage.binary_erosion(envelope, _CROSS) & ~tubes
    if "vessels" not in masks:
        candidates = ndimage.binary_opening(candidates, _ball(3.0, spacing))
    labels, count = ndimage.label(candidates, structure=_FULL)
    if count == 0:
        return Detection("nodule", False, details={"candidates": 0})
    voxel = float(np.prod(spacing))
    spacing_zyx = np.asarray(spacing[::-1], dtype=float)
    min_volume = np.pi / 6 * min_diameter_mm**3
    best, best_volume, kept = None, 0.0, 0
    sizes = np.bincount(labels.ravel())
    for label in np.nonzero(sizes[1:] * voxel >= min_volume)[0] + 1:
        coords = np.argwhere(labels == label)
        if _elongation(coords, spacing_zyx) > max_elongation:
            continue
        kept += 1
        volume = len(coords) * voxel
        if volume > best_volume:
            best, best_volume = label, volume
    if best is None:
        return Detection("nodule", False, details={"candidates": int(count), "compact": 0})
    blob = labels == best
    grown = ndimage.binary_dilation(blob, _FULL)
    overlaps = {lobe: int((grown & masks[lobe]).sum()) for lobe in LOBES if lobe in masks}
    if overlaps and max(overlaps.values()) > 0:
        location = max(overlaps, key=overlaps.get)
    else:
        location = "left" if (grown & left).sum() >= (grown & right).sum() else "right"
    diameter = float((6 * best_volume / np.pi) ** (1 / 3))
    centre = np.argwhere(blob).mean(axis=0).tolist()
    return Detection("nodule", True, location, diameter,
                     {"candidates": int(count), "compact": kept, "volume_mm3": best_volume, "centre_zyx": centre})


def detect_effusion(hu: np.ndarray, spacing, masks: dict | None = None, *, min_ml: float = 5.0,
                    fluid_hu: tuple[float, float] = (-30.0, 25.0)) -> Detection:
    """Fluid-density volume behind each lung (see the module docstring)."""
    left, right = _lungs(hu, spacing, masks)
    smooth = _smooth(hu)
    fluid = (smooth > fluid_hu[0]) & (smooth < fluid_hu[1])
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = {}
    for side, lung in (("left", left), ("right", right)):
        if not lung.any():
            volumes[side] = 0.0
            continue
        z, y, x = np.nonzero(lung)
        region = np.zeros(hu.shape, dtype=bool)
        region[z.min():z.max() + 1, int(np.round(y.mean())):, x.min():x.max() + 1] = True
        candidates = ndimage.binary_opening(fluid & region & ~lung, _CROSS)
        labels, count = ndimage.label(candidates, structure=_FULL)
        if count == 0:
            volumes[side] = 0.0
            continue
        touching = np.unique(labels[ndimage.binary_dilation(lung, _FULL) & (labels > 0)])
        volumes[side] = float(np.isin(labels, touching).sum()) * voxel_ml
    side = max(volumes, key=volumes.get)
    present = volumes[side] >= min_ml
    return Detection("effusion", bool(present), side if present else None, volumes[side],
                     {"volume_ml": volumes, "min_ml": min_ml})


def cardiothoracic_ratio(hu: np.ndarray, spacing, masks: dict | None = None, *,
                         soft_hu: tuple[float, float] = (15.0, 50.0), opening_mm: float = 8.0) -> tuple[float, dict]:
    """CTR = widest heart / widest lungs, both left-right in axial slices (see the module docstring)."""
    left, right = _lungs(hu, spacing, masks)
    lungs = lung_envelope(left | right)
    if not left.any() or not right.any():
        return float("nan"), {"reason": "needs both lungs"}
    columns = np.arange(hu.shape[2])
    between = np.zeros(hu.shape, dtype=bool)
    thoracic = 0
    for z in np.nonzero(lungs.any(axis=(1, 2)))[0]:
        rows = lungs[z].any(axis=1)
        xs = np.nonzero(lungs[z].any(axis=0))[0]
        thoracic = max(thoracic, int(xs[-1] - xs[0] + 1))
        first = np.where(rows, lungs[z].argmax(axis=1), 0)
        last = np.where(rows, hu.shape[2] - 1 - lungs[z][:, ::-1].argmax(axis=1), -1)
        between[z] = (columns[None, :] >= first[:, None]) & (columns[None, :] <= last[:, None])
    smooth = _smooth(hu)
    soft = between & ~lungs & (smooth > soft_hu[0]) & (smooth < soft_hu[1])
    soft = ndimage.binary_opening(soft, _ball(opening_mm, spacing))
    labels, count = ndimage.label(soft, structure=_FULL)
    details = {"thoracic_width_mm": thoracic * spacing[0]}
    if count == 0:
        return 0.0, {**details, "reason": "no mediastinal soft tissue"}
    lung_y = np.nonzero(lungs)[1].mean()
    sizes = np.bincount(labels.ravel())
    centroids = ndimage.center_of_mass(soft, labels, np.arange(1, count + 1))
    anterior = [i + 1 for i, c in enumerate(centroids) if c[1] < lung_y]
    if not anterior:
        return 0.0, {**details, "reason": "no anterior mediastinal soft tissue"}
    heart = labels == max(anterior, key=lambda label: sizes[label])
    width = max(int(np.ptp(np.nonzero(heart[z].any(axis=0))[0])) + 1 for z in np.nonzero(heart.any(axis=(1, 2)))[0])
    return float(width / thoracic), {**details, "heart_width_mm": width * spacing[0],
                                     "heart_volume_ml": float(heart.sum() * np.prod(spacing) / 1000)}


def detect_cardiomegaly(hu: np.ndarray, spacing, masks: dict | None = None, *, threshold: float = 0.48) -> Detection:
    ratio, details = cardiothoracic_ratio(hu, spacing, masks)
    details["threshold"] = threshold
    return Detection("cardiomegaly", bool(ratio > threshold), None, ratio, details)


DETECTORS = {"nodule": detect_nodule, "effusion": detect_effusion, "cardiomegaly": detect_cardiomegaly}


def detect_findings(hu: np.ndarray, spacing, masks: dict | None = None) -> dict[str, Detection]:
    """All three detectors on one CT (lungs segmented once when no masks are given)."""
    if not masks or not any(k in masks for k in ("left_lung", "right_lung") + LOBES):
        left, right = _lungs(hu, spacing, None)
        masks = {**(masks or {}), "left_lung": left, "right_lung": right}
    return {kind: detector(hu, spacing, masks) for kind, detector in DETECTORS.items()}


# --------------------------------------------------------------------------------------
# What a report asks for
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A finding kind a report asserts (present=True, maybe with a location) or denies (False)."""

    present: bool
    location: str | None = None


_NEGATION = re.compile(r"\b(no|not|without|negative for|free of|clear)\b|\bnormal\b")
_KIND_WORDS = {
    "nodule": re.compile(r"\bnodul\w*|\bmass\b"),
    "effusion": re.compile(r"\beffusion"),
    "cardiomegaly": re.compile(r"cardiomegaly|heart (?:is |size is )?(?:\w+ )?(?:enlarged|normal|not enlarged)|"
                               r"cardiac silhouette|heart size|enlarged heart"),
}


def requested_findings(report: str) -> dict[str, Request | None]:
    """Per finding kind: Request(True, location), Request(False) or None when the report is silent.

    The findings part is read sentence by sentence; a sentence naming a kind with a negation
    ("no", "not", "without", "normal", ...) denies it, otherwise asserts it. The impression
    is used only for kinds the findings do not mention.
    """
    text = report.lower()
    body, _, impression = text.partition("impression:")
    result: dict[str, Request | None] = dict.fromkeys(FINDING_KINDS)
    for part in (body, impression):
        for sentence in re.split(r"(?<=[.;])\s+|;\s*", part):
            for kind, pattern in _KIND_WORDS.items():
                if result[kind] is not None or not pattern.search(sentence):
                    continue
                if _NEGATION.search(sentence):
                    result[kind] = Request(False)
                else:
                    result[kind] = Request(True, _location(kind, sentence))
    return result


def asks_for(report: str, kind: str) -> bool:
    """Whether the report asserts the finding (neither silent about it nor denying it)."""
    request = requested_findings(report)[kind]
    return request is not None and request.present


def _location(kind: str, sentence: str) -> str | None:
    if kind == "nodule":
        for lobe in LOBES:
            if lobe.replace("_", " ") in sentence:
                return lobe
        return None
    if kind == "effusion":
        if re.search(r"\bbilateral\b", sentence):
            return "bilateral"
        for side in ("left", "right"):
            if re.search(rf"\b{side}\b", sentence):
                return side
    return None


def adherence_rates(pairs: list[tuple[dict[str, Request | None], dict[str, Detection]]]) -> dict:
    """Per kind: how often a volume shows the finding when its report asked for it vs denied it.

    Also the rate at which the detected location (lobe for nodules, side for effusions)
    matches the one asked for, among requested-and-detected cases with a location.
    """
    rates = {}
    for kind in FINDING_KINDS:
        asked = [d[kind] for r, d in pairs if r.get(kind) is not None and r[kind].present and kind in d]
        denied = [d[kind] for r, d in pairs if r.get(kind) is not None and not r[kind].present and kind in d]
        located = [(r[kind].location, d[kind].location) for r, d in pairs
                   if r.get(kind) is not None and r[kind].present and r[kind].location and kind in d
                   and d[kind].present]
        entry = {
            "n_requested": len(asked),
            "n_denied": len(denied),
            "rate_when_requested": _rate([d.present for d in asked]),
            "rate_when_denied": _rate([d.present for d in denied]),
        }
        if kind in ("nodule", "effusion"):
            entry["location_accuracy"] = _rate([want == got or want == "bilateral" for want, got in located])
            entry["n_located"] = len(located)
        rates[kind] = entry
    return rates


def _rate(values: list[bool]) -> float | None:
    return float(np.mean(values)) if values else None
