"""Weight-free chest CT anatomy: body, left and right lung, airway tree and lung vessels.

Everything here is thresholds, connected components and morphology (SimpleITK, numpy,
scipy), so it runs anywhere without downloads, in seconds per scan:

1. **Body**: voxels above -500 HU, the largest connected component after a small
   in-plane opening (which cuts the table and clothes off), holes filled slice by slice.
   Everything after works inside the body's bounding box.
2. **Airway**: the trachea is looked for in the top slices as a round, air-filled region
   near the body's left-right midline; a 3D region growing (face-connected) from a seed
   in it runs on the lightly smoothed HU, starting at -950 HU and raising the threshold by
   10 HU a step. A leak into the lung parenchyma makes the grown volume jump: the *leak
   guard* keeps the last threshold before one step multiplies the volume by more than
   ``leak_factor`` (or passes ``max_airway_ml``). The result is one connected tree
   (trachea, main and lobar bronchi; how deep it reaches depends on the slice thickness).
3. **Lungs**: air (< -400 HU) inside the body, minus air connected to the image border
   and minus the grown airway, keeping the two large components on either side of the
   midline. Lungs touching each other (anterior junction) are cut per slice at the
   minimum of the lung profile near the midline. Each lung is then closed in-plane and
   its in-plane holes filled, so vessels and intrapulmonary bronchi lie inside it; the
   trachea and main bronchi outside the lungs stay out. Left and right are told apart by
   physical x after orienting to LPS.
4. **Vessels**: voxels inside the lungs above ``vessel_hu`` (-550 HU) after a light in-plane
   Gaussian smoothing, away from the airway walls and from the lung surface (partial
   volume of the chest wall and diaphragm).

What cannot be found without a trained model: **lung lobes**. The fissures are thin,
often incomplete and invisible on thick slices; no threshold finds them. A dataset built
with this segmenter therefore uses ``STRUCTURE_SETS["lungs"]`` (left_lung, right_lung,
airway, vessels); the ``totalsegmentator`` segmenter gives the five lobes.

Morphology radii are in millimetres and converted per axis, so 5 mm slices and
sub-millimetre slices are handled alike. Masks are returned in the input image's own
grid (array order z, y, x as ``sitk.GetArrayFromImage`` gives it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from MedSynLib.compat import zip_strict

# Structure names (anatomy.STRUCTURES) this segmenter produces, plus the helper "body".
CLASSICAL_STRUCTURES: tuple[str, ...] = ("left_lung", "right_lung", "airway", "vessels")


@dataclass
class AnatomyMasks:
    """Boolean (z, y, x) masks keyed by structure name, in the segmented image's grid.

    Keys are ``anatomy.STRUCTURES`` names, plus helpers outside that table (the classical
    segmenter's "body"): pick the structures you need before building a label map.
    ``notes`` says what the segmenter decided (thresholds used, leak-guard events).
    """

    masks: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClassicalParameters:
    """Thresholds (HU) and sizes (mm, mL) of the classical segmenter."""

    # Body: tissue threshold and the in-plane opening that cuts off table and clothes.
    body_hu: float = -500.0
    body_opening_mm: float = 3.0
    # Gaussian smoothing (sigma, mm) of the HU used for the airway and the vessels.
    smoothing_mm: float = 1.0
    # Trachea search: below this smoothed HU, within this distance of the top of the body.
    trachea_hu: float = -900.0
    trachea_search_mm: float = 60.0
    trachea_area_mm2: tuple[float, float] = (40.0, 1000.0)
    # Airway growing: thresholds from start to stop by step; the leak guard stops when one
    # step multiplies the volume by more than leak_factor (once past min_trachea_ml).
    airway_start_hu: float = -950.0
    airway_stop_hu: float = -700.0
    airway_step_hu: float = 10.0
    leak_factor: float = 1.5
    min_trachea_ml: float = 3.0
    max_airway_ml: float = 400.0
    airway_box_mm: float = 20.0  # margin of the box each growing step tries first
    # Lungs: air threshold, margin cut around the airway, smallest lung, closing radius,
    # half-width of the midline search when the lungs touch.
    lung_hu: float = -400.0
    airway_cut_mm: float = 2.0
    min_lung_ml: float = 50.0
    lung_closing_mm: float = 4.0
    midline_window_mm: float = 40.0
    # Vessels: smoothed HU threshold, airway wall thickness, lung surface margin. The
    # threshold sits a little below -500 HU because smoothing and thick slices lower the
    # peak of small vessels (on the 5 mm test scan: 2.3 % of the lungs at -500, 2.9 % at -550).
    vessel_hu: float = -550.0
    airway_wall_mm: float = 2.5
    lung_surface_mm: float = 2.0


# ---------------------------------------------------------------------------------------
# Geometry: view any orientation as an LPS array (z up, y posterior, x toward the left).
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reorientation:
    """Axis permutation and flips between an image's array and its LPS view."""

    permutation: tuple[int, int, int]
    flips: tuple[int, ...]
    spacing_zyx: tuple[float, float, float]

    def to_lps(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.permutation)
        return np.flip(out, self.flips) if self.flips else out

    def from_lps(self, array: np.ndarray) -> np.ndarray:
        out = np.flip(array, self.flips) if self.flips else array
        return np.ascontiguousarray(np.transpose(out, np.argsort(self.permutation)))

    def image_index(self, lps_index: tuple[int, int, int], lps_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """SimpleITK (x, y, z) index of the voxel at ``lps_index`` of the LPS array."""
        unflipped = [lps_shape[k] - 1 - i if k in self.flips else i for k, i in enumerate(lps_index)]
        array_index = [0, 0, 0]
        for k, axis in enumerate(self.permutation):
            array_index[axis] = unflipped[k]
        return tuple(int(i) for i in reversed(array_index))


def _reorientation(image: sitk.Image) -> _Reorientation:
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = image.GetSpacing()
    # Column i of the direction matrix: physical direction of image index axis i.
    physical_axis = np.argmax(np.abs(direction), axis=0)
    if sorted(physical_axis.tolist()) != [0, 1, 2]:
        raise ValueError(f"image direction {image.GetDirection()} is too oblique to map to LPS axes")
    index_axis_of = {int(p): i for i, p in enumerate(physical_axis)}
    # LPS array axis k holds physical axis 2 - k; numpy axis of index axis i is 2 - i.
    permutation = tuple(2 - index_axis_of[2 - k] for k in range(3))
    flips = tuple(k for k in range(3) if direction[2 - k, index_axis_of[2 - k]] < 0)
    spacing_zyx = tuple(float(spacing[index_axis_of[2 - k]]) for k in range(3))
    return _Reorientation(permutation, flips, spacing_zyx)


# ---------------------------------------------------------------------------------------
# Small helpers. Morphology uses boxes (separable min/max filters, computed inside the
# mask's bounding box): fast on 512 x 512 x 400 voxels, and the exact shape of the
# structuring element does not matter for these uses.
# ---------------------------------------------------------------------------------------

_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = [[False, True, False], [True, True, True], [False, True, False]]


def _radius_voxels(radius_mm: float, spacing_zyx, in_plane: bool = False) -> tuple[int, int, int]:
    """Per-axis (z, y, x) box half-size in voxels for a radius in mm (z = 0 when in_plane)."""
    radii = tuple(int(np.floor(radius_mm / s + 1e-6)) for s in spacing_zyx)
    return (0, radii[1], radii[2]) if in_plane else radii


def _bounding_box(mask: np.ndarray, margin=(0, 0, 0)) -> tuple[slice, slice, slice]:
    """Slices of the smallest box holding the mask, grown by a margin (clipped to the array)."""
    box = []
    for axis in range(3):
        (found,) = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        low = max(int(found[0]) - margin[axis], 0)
        high = min(int(found[-1]) + margin[axis] + 1, mask.shape[axis])
        box.append(slice(low, high))
    return tuple(box)


def _box_filter(mask: np.ndarray, radius, operation: str) -> np.ndarray:
    """Dilate or erode by a box of half-sizes ``radius``; outside the array is background."""
    out = mask.view(np.uint8)
    apply = ndimage.maximum_filter1d if operation == "dilate" else ndimage.minimum_filter1d
    for axis, r in enumerate(radius):
        if r > 0:
            out = apply(out, 2 * r + 1, axis=axis, mode="constant", cval=0)
    return out.astype(bool)


def _morphology(mask: np.ndarray, radius_mm: float, spacing_zyx, operation: str,
                in_plane: bool = False, at_least_one: bool = False) -> np.ndarray:
    """Dilate, erode, open or close a boolean mask by a radius in mm, converted per axis.

    ``in_plane`` keeps the z radius at 0; ``at_least_one`` makes every radius at least one
    voxel (so thick slices still get a margin along z).
    """
    radius = _radius_voxels(radius_mm, spacing_zyx, in_plane)
    if at_least_one:
        radius = tuple(max(r, 1) for r in radius)
    result = np.zeros_like(mask, dtype=bool)
    if not mask.any():
        return result
    grows = operation in ("dilate", "close")
    box = _bounding_box(mask, radius if grows else (0, 0, 0))
    sub = np.ascontiguousarray(mask[box], dtype=bool)
    if operation == "close":
        # Pad so that the dilation is not clipped at the array edge before the erosion.
        padded = _box_filter(_box_filter(np.pad(sub, [(r, r) for r in radius]), radius, "dilate"),
                             radius, "erode")
        sub = padded[tuple(slice(r, r + n) for r, n in zip_strict(radius, sub.shape))]
    elif operation == "open":
        sub = _box_filter(_box_filter(sub, radius, "erode"), radius, "dilate")
    elif operation in ("dilate", "erode"):
        sub = _box_filter(sub, radius, operation)
    else:
        raise ValueError(f"unknown morphology {operation!r}")
    result[box] = sub
    return result


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face-connected labels sorted by size (1 = largest) and the voxel count of each label."""
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SortByObjectSizeOn()
    labels = relabel.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8)), False))
    sizes = np.array([0, *relabel.GetSizeOfObjectsInPixels()], dtype=np.int64)
    return sitk.GetArrayFromImage(labels), sizes


def _largest_component(mask: np.ndarray) -> np.ndarray:
    result = np.zeros_like(mask, dtype=bool)
    if mask.any():
        box = _bounding_box(mask)
        labels, _ = _components(np.ascontiguousarray(mask[box], dtype=bool))
        result[box] = labels == 1
    return result


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial slice: background not connected in-plane to the border."""
    result = mask.copy()
    if not mask.any():
        return result
    box = _bounding_box(mask)
    sub = mask[box]
    background, count = ndimage.label(~sub, structure=_IN_PLANE)
    outside = np.zeros(count + 1, dtype=bool)
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        outside[np.unique(edge)] = True
    outside[0] = True  # label 0 is the mask itself
    result[box] = sub | ~outside[background]
    return result


def _midline(body: np.ndarray) -> np.ndarray:
    """Per slice, the x index of the body's centre (mean of the columns it covers)."""
    columns = body.any(axis=1)  # (z, x)
    counts = columns.sum(axis=1)
    centre = (columns * np.arange(body.shape[2])).sum(axis=1) / np.maximum(counts, 1)
    return np.where(counts > 0, centre, body.shape[2] / 2.0)


def _right_fraction(mask: np.ndarray, mid_x: np.ndarray) -> float:
    """Share of a mask's voxels on the patient's right of the midline (smaller x in LPS)."""
    per_column = mask.sum(axis=1)  # (z, x)
    total = per_column.sum()
    on_right = np.arange(mask.shape[2])[None, :] < mid_x[:, None]
    return float(per_column[on_right].sum() / total) if total else 0.0


# ---------------------------------------------------------------------------------------
# 1. Body
# ---------------------------------------------------------------------------------------


def segment_body(hu: np.ndarray, spacing_zyx, params: ClassicalParameters) -> np.ndarray:
    """Body mask of an LPS array: above ``body_hu``, opened, largest component, holes filled.

    The opening and the component search run on a grid of about 1.5 mm x 1.5 mm x 2.5 mm
    (they only have to cut off the table and clothes); the outline is then taken back at
    full resolution from the tissue threshold.
    """
    step = tuple(max(1, int(round(target / s))) for target, s in zip_strict((2.5, 1.5, 1.5), spacing_zyx))
    coarse_spacing = tuple(s * k for s, k in zip_strict(spacing_zyx, step))
    coarse = hu[::step[0], ::step[1], ::step[2]] > params.body_hu
    if not coarse.any():
        raise ValueError(f"no body found: no voxel above {params.body_hu:.0f} HU")
    # Opening in-plane only: the table and clothes are thin in x/y, not in z.
    opened = _morphology(coarse, params.body_opening_mm, coarse_spacing, "open", in_plane=True)
    coarse_body = _largest_component(opened)
    if not coarse_body.any():
        raise ValueError(f"no body found: nothing above {params.body_hu:.0f} HU survives the opening")
    # Back to full resolution: one coarse voxel of slack, then the exact tissue outline.
    coarse_body = _box_filter(coarse_body, (1, 1, 1), "dilate")
    near_body = coarse_body
    for axis, k in enumerate(step):
        near_body = np.repeat(near_body, k, axis=axis)
    near_body = near_body[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    return _fill_holes_per_slice(_largest_component(near_body & (hu > params.body_hu)))


# ---------------------------------------------------------------------------------------
# 2. Airway
# ---------------------------------------------------------------------------------------


def find_trachea_seed(smooth: np.ndarray, body: np.ndarray, spacing_zyx,
                      params: ClassicalParameters) -> tuple[int, int, int] | None:
    """A voxel in the trachea: a round air region near the midline, in the top slices of the body."""
    dz, dy, dx = spacing_zyx
    (body_slices,) = np.nonzero(body.any(axis=(1, 2)))
    top = int(body_slices[-1])
    bottom = max(top - max(int(round(params.trachea_search_mm / dz)), 2), int(body_slices[0]))
    for z in range(top, bottom - 1, -1):
        (rows,) = np.nonzero(body[z].any(axis=1))
        (columns,) = np.nonzero(body[z].any(axis=0))
        if columns.size == 0:
            continue
        mid_x = 0.5 * (columns[0] + columns[-1])
        width_mm = (columns[-1] - columns[0] + 1) * dx
        labels, _ = ndimage.label((smooth[z] < params.trachea_hu) & body[z])
        best = None
        for label, region in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[region] == label
            area_mm2 = component.sum() * dy * dx
            if not params.trachea_area_mm2[0] <= area_mm2 <= params.trachea_area_mm2[1]:
                continue
            # The trachea is surrounded by tissue: it does not touch the body's outline box.
            if region[0].start <= rows[0] or region[0].stop > rows[-1]:
                continue
            extent = max((region[0].stop - region[0].start) * dy, (region[1].stop - region[1].start) * dx)
            roundness = area_mm2 / (np.pi * (extent / 2.0) ** 2)
            cx = region[1].start + ndimage.center_of_mass(component)[1]
            off_midline_mm = abs(cx - mid_x) * dx
            if roundness < 0.5 or off_midline_mm > max(0.1 * width_mm, 15.0):
                continue
            score = roundness - off_midline_mm / 50.0
            if best is None or score > best[0]:
                values = np.where(component, smooth[z][region], np.inf)
                iy, ix = np.unravel_index(int(np.argmin(values)), component.shape)
                best = (score, (z, region[0].start + int(iy), region[1].start + int(ix)))
        if best is not None:
            return best[1]
    return None


class _Flood:
    """Face-connected region growing from one seed below a threshold, in a box when it can.

    Most steps of the rising threshold add a little to the previous region, so each step
    first floods a box around that region; only when the region reaches the box's side
    (a leak, or a big step) is the whole array flooded.
    """

    def __init__(self, values: np.ndarray, seed: tuple[int, int, int], margin: tuple[int, int, int]):
        self.image = sitk.GetImageFromArray(values)
        self.shape = values.shape
        self.seed = seed
        self.margin = margin
        self.box = tuple(slice(max(s - m, 0), min(s + m + 1, n)) for s, m, n in zip_strict(seed, margin, self.shape))

    def _grow(self, box, threshold: float) -> np.ndarray:
        index = [box[2].start, box[1].start, box[0].start]
        size = [box[2].stop - box[2].start, box[1].stop - box[1].start, box[0].stop - box[0].start]
        roi = sitk.RegionOfInterest(self.image, size, index)
        seed = [(self.seed[2] - index[0], self.seed[1] - index[1], self.seed[0] - index[2])]
        grown = sitk.ConnectedThreshold(roi, seedList=seed, lower=-1.0e6, upper=threshold, replaceValue=1,
                                        connectivity=sitk.ConnectedThresholdImageFilter.FaceConnectivity)
        return sitk.GetArrayFromImage(grown).view(bool)

    def _reaches_side(self, region: np.ndarray, box) -> bool:
        for axis, part in enumerate(box):
            if part.start > 0 and region.take(0, axis=axis).any():
                return True
            if part.stop < self.shape[axis] and region.take(-1, axis=axis).any():
                return True
        return False

    def __call__(self, threshold: float) -> tuple[np.ndarray, tuple[slice, ...]]:
        """The region below ``threshold`` and the box it is given in."""
        box = self.box
        region = self._grow(box, threshold)
        if self._reaches_side(region, box):
            box = tuple(slice(0, n) for n in self.shape)
            region = self._grow(box, threshold)
        return region, box

    def accept(self, region: np.ndarray, box) -> None:
        """Centre the next step's box on this region (an empty one, from a seed brighter than the
        threshold, leaves the box as it is)."""
        found = tuple(np.nonzero(region.any(axis=other))[0] for other in ((1, 2), (0, 2), (0, 1)))
        if not found[0].size:
            return
        self.box = tuple(
            slice(max(part.start + int(f[0]) - m, 0), min(part.start + int(f[-1]) + m + 1, n))
            for part, f, m, n in zip_strict(box, found, self.margin, self.shape)
        )


def segment_airway(smooth: np.ndarray, body: np.ndarray, spacing_zyx, params: ClassicalParameters,
                   notes: list[str], seed: tuple[int, int, int] | None = None) -> np.ndarray:
    """Airway tree: region growing from the trachea with a rising, leak-guarded threshold.

    ``smooth`` is the HU array after a light Gaussian smoothing: noise in the lumen would
    otherwise stop the growing early or open paths into the parenchyma. ``seed`` (an array
    index in the trachea) is searched with ``find_trachea_seed`` when not given.
    """
    if seed is None:
        seed = find_trachea_seed(smooth, body, spacing_zyx, params)
    if seed is None:
        notes.append("airway: no trachea found in the top slices; airway left empty")
        return np.zeros_like(body)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    margin = tuple(max(int(np.ceil(params.airway_box_mm / s)), 2) for s in spacing_zyx)
    flood = _Flood(np.where(body, smooth, np.float32(3000.0)), seed, margin)  # nothing grows outside
    thresholds = np.arange(params.airway_start_hu, params.airway_stop_hu + 0.5, params.airway_step_hu)
    accepted, accepted_threshold, volume = None, None, 0.0
    for threshold in thresholds:
        region, box = flood(float(threshold))
        new_volume = np.count_nonzero(region) * voxel_ml
        # The guard watches once the region is more than the seed's neighbourhood.
        if volume >= params.min_trachea_ml and new_volume > params.leak_factor * volume:
            notes.append(f"airway: leak guard stopped at {threshold:.0f} HU ({volume:.1f} -> "
                         f"{new_volume:.1f} mL)")
            break
        if new_volume > params.max_airway_ml:
            notes.append(f"airway: {new_volume:.0f} mL at {threshold:.0f} HU exceeds "
                         f"{params.max_airway_ml:.0f} mL; stopped")
            break
        accepted, accepted_threshold, volume = (region, box), float(threshold), new_volume
        flood.accept(region, box)
    else:
        notes.append(f"airway: no leak up to {thresholds[-1]:.0f} HU")
    if accepted is None or volume < params.min_trachea_ml:
        notes.append("airway: region growing found no trachea-sized region; airway left empty")
        return np.zeros_like(body)
    notes.append(f"airway: grown at {accepted_threshold:.0f} HU, {volume:.1f} mL")
    airway = np.zeros_like(body)
    airway[accepted[1]] = accepted[0]
    return airway


# ---------------------------------------------------------------------------------------
# 3. Lungs
# ---------------------------------------------------------------------------------------


def _split_at_midline(mask: np.ndarray, mid_x: np.ndarray, half_window: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one region holding both lungs into (right, left), slice by slice.

    Each in-plane piece goes to the side of the midline holding most of it; a piece with a
    real share (> 10 %) on both sides is first cut at the column of least lung near the midline.
    """
    right = np.zeros_like(mask)
    left = np.zeros_like(mask)
    box = _bounding_box(mask)
    sub = mask[box]
    z0, x0 = box[0].start, box[2].start
    pieces, count = ndimage.label(sub, structure=_IN_PLANE)  # in-plane pieces, every slice at once
    x = np.arange(x0, box[2].stop)
    on_right = x[None, None, :] < mid_x[box[0], None, None]
    total = np.bincount(pieces.ravel(), minlength=count + 1)
    right_share = np.bincount(pieces[sub & on_right], minlength=count + 1) / np.maximum(total, 1)
    straddles = np.minimum(right_share, 1.0 - right_share) > 0.1
    straddles[0] = False
    to_right = (right_share >= 0.5) & ~straddles
    to_left = (right_share < 0.5) & ~straddles
    to_right[0] = to_left[0] = False
    right[box] = to_right[pieces]
    left[box] = to_left[pieces]
    objects = ndimage.find_objects(pieces) if straddles.any() else []
    for label in np.nonzero(straddles)[0]:
        zs, rows, cols = objects[label - 1]
        z = z0 + zs.start
        piece = pieces[zs, rows, cols][0] == label
        columns = x[cols]
        per_column = piece.sum(axis=0)
        window = np.abs(columns - mid_x[z]) <= half_window
        cut = int(np.argmin(np.where(window, per_column, np.iinfo(np.int64).max)))
        target = (z, slice(box[1].start + rows.start, box[1].start + rows.stop))
        right[target[0], target[1], x0 + cols.start:x0 + cols.start + cut] |= piece[:, :cut]
        left[target[0], target[1], x0 + cols.start + cut + 1:x0 + cols.stop] |= piece[:, cut + 1:]
    return right, left


def segment_lungs(hu: np.ndarray, body: np.ndarray, airway: np.ndarray, spacing_zyx,
                  params: ClassicalParameters, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lung masks of an LPS array (left lung = the one at larger x)."""
    min_voxels = params.min_lung_ml * 1000.0 / float(np.prod(spacing_zyx))
    air = (hu < params.lung_hu) & body
    # Without the airway (and the partial volume around it) the lungs hang free of the trachea.
    air &= ~_morphology(airway, params.airway_cut_mm, spacing_zyx, "dilate", in_plane=True)
    labels, sizes = _components(air)
    # Air touching the in-plane image border lies outside the patient (an outline cut by
    # the field of view cannot be closed by the body's hole filling).
    candidate = sizes >= min_voxels
    candidate[0] = False
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        candidate[np.unique(edge)] = False
    order = np.nonzero(candidate)[0]  # labels are sorted by size
    if order.size == 0:
        raise ValueError(f"no lung found: no air region of {params.min_lung_ml:.0f} mL inside the body")

    mid_x = _midline(body)
    largest = labels == order[0]
    right_share = _right_fraction(largest, mid_x)
    if 0.2 < right_share < 0.8:
        # One region across the midline: the lungs touch (anterior junction), or the
        # airway did not cut them apart. Split it slice by slice at the midline.
        half_window = int(round(params.midline_window_mm / spacing_zyx[2]))
        right, left = (_largest_component(side) for side in _split_at_midline(largest, mid_x, half_window))
        notes.append("lungs: one air region held both lungs; split slice by slice at the midline")
    else:
        other = np.zeros_like(largest)
        for label in order[1:]:
            if sizes[label] < 0.1 * sizes[order[0]]:
                break
            region = labels == label
            if (_right_fraction(region, mid_x) >= 0.5) != (right_share >= 0.5):
                other = region
                break
        else:
            notes.append("lungs: found only one lung")
        right, left = (largest, other) if right_share >= 0.5 else (other, largest)

    # Close each lung (in-plane) and fill its in-plane holes: vessels, bronchi and nodules
    # inside belong to it.
    left, right = (
        _fill_holes_per_slice(_morphology(lung, params.lung_closing_mm, spacing_zyx, "close", in_plane=True))
        & body
        for lung in (left, right)
    )
    # Closing can make the lungs meet at the anterior junction: split the overlap at the midline.
    overlap = np.nonzero(left & right)
    if overlap[0].size:
        on_left = overlap[2] >= mid_x[overlap[0]]
        right[tuple(axis[on_left] for axis in overlap)] = False
        left[tuple(axis[~on_left] for axis in overlap)] = False
    return left, right


# ---------------------------------------------------------------------------------------
# 4. Vessels
# ---------------------------------------------------------------------------------------


def segment_vessels(smooth: np.ndarray, lungs: np.ndarray, airway: np.ndarray, spacing_zyx,
                    params: ClassicalParameters) -> np.ndarray:
    """Vessels: smoothed HU above ``vessel_hu`` inside the lungs, off the airway walls and lung surface."""
    # A margin of at least one voxel along every axis, so that the partial volume of the
    # chest wall and of the diaphragm dome in a thick slice is not taken for vessels.
    interior = _morphology(lungs, params.lung_surface_mm, spacing_zyx, "erode", at_least_one=True)
    walls = _morphology(airway, params.airway_wall_mm, spacing_zyx, "dilate")
    return (smooth > params.vessel_hu) & interior & ~walls


# ---------------------------------------------------------------------------------------
# All together
# ---------------------------------------------------------------------------------------


def segment_classical(image: sitk.Image, params: ClassicalParameters | None = None) -> AnatomyMasks:
    """Lungs, airway, vessels and body of a chest CT in HU, as masks in the image's own grid."""
    if image.GetDimension() != 3:
        raise ValueError(f"need a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("need a scalar (single-channel) image")
    params = params or ClassicalParameters()
    orientation = _reorientation(image)
    spacing = orientation.spacing_zyx
    full = orientation.to_lps(sitk.GetArrayViewFromImage(image))
    notes: list[str] = []

    # Work inside the body's bounding box: the table and the air around it only cost time.
    body_full = segment_body(full, spacing, params)
    box = _bounding_box(body_full, (0, 2, 2))
    hu = np.ascontiguousarray(full[box], dtype=np.float32)
    body = np.ascontiguousarray(body_full[box])
    # Light in-plane smoothing (the slow, strided z pass would add little on thin slices).
    smooth = hu.copy()
    for axis in (1, 2):
        ndimage.gaussian_filter1d(smooth, params.smoothing_mm / spacing[axis], axis=axis, truncate=2.0,
                                  output=smooth)

    seed = find_trachea_seed(smooth, body, spacing, params)
    if seed is not None:
        lps_index = tuple(int(i) + b.start for i, b in zip_strict(seed, box))
        point = image.TransformIndexToPhysicalPoint(orientation.image_index(lps_index, full.shape))
        notes.append("airway: trachea seed at LPS (" + ", ".join(f"{c:.1f}" for c in point) + ") mm")
    airway = segment_airway(smooth, body, spacing, params, notes, seed=seed)
    left, right = segment_lungs(hu, body, airway, spacing, params, notes)
    vessels = segment_vessels(smooth, left | right, airway, spacing, params)

    lung_voxels = int(left.sum() + right.sum())
    if lung_voxels:
        voxel_ml = float(np.prod(spacing)) / 1000.0
        notes.append(f"lungs: left {left.sum() * voxel_ml:.0f} mL, right {right.sum() * voxel_ml:.0f} mL; "
                     f"vessels {100.0 * vessels.sum() / lung_voxels:.1f} % of the lungs")
    masks = {"left_lung": left, "right_lung": right, "airway": airway, "vessels": vessels}
    result = {}
    for name, mask in masks.items():
        placed = np.zeros_like(body_full)
        placed[box] = mask
        result[name] = orientation.from_lps(placed)
    result["body"] = orientation.from_lps(body_full)
    return AnatomyMasks(result, notes)
