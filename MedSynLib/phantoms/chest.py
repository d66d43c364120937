"""Procedural chest-CT phantoms: a CT volume, its anatomy masks and a matching report.

Tests and model training run without real data, so this module draws a plausible chest
from a seed: body with fat and muscle, ribs and spine, a heart in the mediastinum, two
lungs split into lobes by fissure planes, a branching airway tree, branching vessels, and
optional findings (nodule, pleural effusion, cardiomegaly) that the report then names.

Everything is built in physical millimetres over a `fov_mm` cube centred on the origin,
so one seed gives the same anatomy at any resolution. Arrays are indexed (z, y, x) like
SimpleITK's `GetArrayFromImage` with an identity LPS direction: x grows toward the
patient's left, y toward posterior, z toward superior (slice 0 is the most inferior).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from MedSynLib.anatomy import LEFT_LOBES, LOBES, RIGHT_LOBES
from MedSynLib.geometry import NOMINAL_FIELD_OF_VIEW_MM
from MedSynLib.hounsfield import STORED_HU_RANGE

FINDING_KINDS: tuple[str, ...] = ("nodule", "effusion", "cardiomegaly")
SIDES: tuple[str, ...] = ("left", "right")

# Hounsfield units of the tissues drawn.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MEDIASTINAL_FAT = -90.0
HU_SOFT_TISSUE = 40.0
HU_LIVER = 55.0
HU_BLOOD = 40.0
HU_LUNG = -860.0
HU_AIRWAY_WALL = -100.0
HU_EFFUSION = 10.0
HU_NODULE = 30.0
HU_CORTICAL_BONE = 700.0
HU_CANCELLOUS_BONE = 400.0
HU_DISC = 80.0
HU_CSF = 15.0

# Effusion grades by the fluid's posterior depth in mm (upper bounds), as the report names them.
EFFUSION_GRADES: tuple[tuple[str, float], ...] = (("small", 20.0), ("moderate", 35.0), ("large", math.inf))
# Depth ranges (mm) phantoms draw for each grade, and how often.
_EFFUSION_DEPTHS = {"small": (12.0, 18.0), "moderate": (22.0, 32.0), "large": (38.0, 48.0)}
_EFFUSION_ODDS = (0.5, 0.35, 0.15)
_NODULE_DIAMETERS_MM = (8.0, 20.0)


@dataclass(frozen=True)
class LesionSizes:
    """How large drawn lesions are: effusion grade odds (small, moderate, large), nodule diameters (mm)."""

    effusion_grade_odds: tuple[float, float, float] = _EFFUSION_ODDS
    nodule_diameter_mm: tuple[float, float] = _NODULE_DIAMETERS_MM


# Larger lesions for teaching a coarse (10 mm voxel) stage-1 grid the report: a small effusion
# or an 8 mm nodule is one voxel there, too faint to learn from in a CPU-sized training run.
VISIBLE_LESIONS = LesionSizes(effusion_grade_odds=(0.2, 0.4, 0.4), nodule_diameter_mm=(12.0, 22.0))
CARDIOMEGALY_CTR = 0.55  # cardio-thoracic ratio above which the heart reads as enlarged

# The grid anatomy is planned on (targets of airway and vessel trees, nodule sites): fixed in
# cells, not in output voxels, so the plan does not depend on the requested resolution.
_PLAN_CELLS = 64
_SMOOTH_CELL_MM = 8.0  # node spacing of the smooth texture field


# --------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One abnormality a phantom shows and its report names.

    `location` is a lobe name from `anatomy.LOBES` for a nodule, "left" or "right" for a
    pleural effusion and None for cardiomegaly; anything else is a ValueError, so a typo
    cannot silently give a normal chest.
    """

    kind: str
    location: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FINDING_KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; known: {FINDING_KINDS}")
        allowed: tuple[str | None, ...] = {
            "nodule": LOBES,
            "effusion": SIDES,
            "cardiomegaly": (None,),
        }[self.kind]
        if self.location not in allowed:
            raise ValueError(f"{self.kind} location must be one of {allowed}, got {self.location!r}")


@dataclass
class Phantom:
    """A synthetic chest CT with its masks, the findings it shows and their report."""

    ct_hu: np.ndarray  # int16 (D, H, W)
    masks: dict[str, np.ndarray]  # bool (D, H, W): the 5 lobes, airway, vessels, left_lung, right_lung
    spacing: tuple[float, float, float]  # (x, y, z) mm, SimpleITK order
    findings: tuple[Finding, ...]
    report: str
    finding_masks: dict[str, np.ndarray]  # "heart" always; "nodule", "effusion" when present


# --------------------------------------------------------------------------------------
# Grid: voxel centres in mm
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """A (D, H, W) grid of voxel centres over a cube of side `fov` mm centred on the origin."""

    shape: tuple[int, int, int]
    fov: float

    @property
    def spacing(self) -> tuple[float, float, float]:
        depth, height, width = self.shape
        return (self.fov / width, self.fov / height, self.fov / depth)

    def axis(self, index: int) -> np.ndarray:
        """Coordinates (mm) along x (0), y (1) or z (2)."""
        count = self.shape[2 - index]
        return ((np.arange(count) + 0.5) * self.spacing[index] - self.fov / 2).astype(np.float32)

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x (1, 1, W), y (1, H, 1), z (D, 1, 1): broadcastable coordinate arrays."""
        return (
            self.axis(0)[None, None, :],
            self.axis(1)[None, :, None],
            self.axis(2)[:, None, None],
        )

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) of the voxels whose centres lie in [lo, hi] (x, y, z mm)."""
        slices = []
        for index in (2, 1, 0):
            step = self.spacing[index]
            first = max(0, math.ceil((lo[index] + self.fov / 2) / step - 0.5))
            last = min(self.shape[2 - index], math.floor((hi[index] + self.fov / 2) / step - 0.5) + 1)
            if last <= first:
                return None
            slices.append(slice(first, last))
        return tuple(slices)

    def point(self, flat_index: int, rng: np.random.Generator) -> np.ndarray:
        """A random point (x, y, z mm) inside the voxel with this flat index."""
        k, j, i = np.unravel_index(flat_index, self.shape)
        centre = np.array([self.axis(0)[i], self.axis(1)[j], self.axis(2)[k]], dtype=float)
        return centre + rng.uniform(-0.5, 0.5, 3) * np.asarray(self.spacing)


def _as_shape(size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    shape = (size,) * 3 if isinstance(size, (int, np.integer)) else size
    if (
        not isinstance(shape, (tuple, list))
        or len(shape) != 3
        or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape)
    ):
        raise ValueError(f"size must be an int or a (D, H, W) tuple of ints, got {size!r}")
    if min(shape) < 8:
        raise ValueError(f"size must be at least 8 voxels per axis, got {shape}")
    return tuple(int(n) for n in shape)


# --------------------------------------------------------------------------------------
# Anatomy parameters drawn from the seed
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """The parameters of one chest, in mm (x left, y posterior, z superior)."""

    body_ax: float  # body half-width
    body_ay: float  # body half-depth
    body_y0: float
    fat: float  # subcutaneous fat thickness
    muscle: float  # chest wall thickness inside the fat
    thorax_y0: float  # centre of the inner thoracic ellipse
    thorax_ax: float
    thorax_ay: float
    mediastinum: float  # half-width of the strip between the lungs
    spine_y: float  # centre of the vertebral bodies
    spine_r: float
    vertebra_height: float
    vertebra_phase: float
    z_apex: float
    apex_depth: float
    dome_right: float  # top of the right hemidiaphragm
    dome_left: float
    dome_depth: float  # how far the diaphragm falls from dome to chest wall
    dome_posterior: float  # extra depth of the posterior recesses
    z_carina: float
    trachea_y: float
    trachea_r: float
    heart_centre: tuple[float, float, float]
    heart_floor: float  # the heart rests flat on the central tendon of the diaphragm
    heart_axes: tuple[float, float, float]
    heart_rotation: tuple[tuple[float, float, float], ...]  # columns: the heart's own axes
    ctr: float  # cardio-thoracic ratio the heart was sized for
    aorta: tuple[tuple[float, ...], ...]  # segments (x0, y0, z0, x1, y1, z1, r0, r1)
    fissure_left: tuple[float, float]  # oblique fissure: hinge z, slope dz/dy
    fissure_right: tuple[float, float]
    fissure_horizontal: float  # z of the right horizontal fissure at the thorax centre
    rib_period: float
    rib_phase: float
    rib_slope: float

    @classmethod
    def draw(cls, rng: np.random.Generator, *, cardiomegaly: bool) -> _Anatomy:
        """Draw one chest; the same rng state gives the same chest with or without findings."""
        u = rng.uniform
        body_ax = u(132.0, 150.0)
        body_ay = body_ax * u(0.62, 0.76)
        body_y0 = u(-6.0, 6.0)
        fat, muscle = u(6.0, 14.0), u(8.0, 13.0)
        thorax_y0 = body_y0 - 8.0
        thorax_ax = body_ax - fat - muscle
        thorax_ay = body_ay - fat - muscle - 8.0
        spine_r = u(14.0, 18.0)
        spine_y = thorax_y0 + thorax_ay - u(18.0, 24.0)
        z_apex = u(110.0, 130.0)
        dome_right = z_apex - u(140.0, 175.0)
        dome_left = dome_right - u(8.0, 20.0)
        dome_depth = u(30.0, 42.0)
        z_carina = z_apex - u(55.0, 75.0)
        trachea_r = u(8.0, 9.5)
        trachea_y = spine_y - spine_r - u(20.0, 24.0)

        # Heart: an ellipsoid whose long axis points left, anterior and down, sized so that
        # its width over the inner thoracic width is the cardio-thoracic ratio drawn.
        ctr_normal = u(0.40, CARDIOMEGALY_CTR - 0.08)
        ctr_enlarged = u(CARDIOMEGALY_CTR + 0.03, CARDIOMEGALY_CTR + 0.10)
        ctr = ctr_enlarged if cardiomegaly else ctr_normal
        turn, tilt = math.radians(u(25.0, 45.0)), math.radians(u(15.0, 30.0))
        long_axis = np.array([math.cos(turn), -math.sin(turn), -math.tan(tilt)])
        long_axis /= np.linalg.norm(long_axis)
        second = np.cross(long_axis, [0.0, 0.0, 1.0])
        second /= np.linalg.norm(second)
        rotation = np.stack([long_axis, second, np.cross(long_axis, second)], axis=1)
        shape = np.array([1.0, u(0.72, 0.82), u(0.80, 0.92)])
        if cardiomegaly:
            shape[1:] *= 0.8  # an enlarged heart grows mostly to the left
        half_extent = np.sqrt((rotation**2) @ shape**2)  # per x, y, z for unit scale
        scale = ctr * thorax_ax / half_extent[0]
        axes = shape * scale
        extent = half_extent * scale
        diaphragm_centre = dome_left - 0.8 * dome_depth
        heart_centre = (
            thorax_ax * u(0.12, 0.2),
            thorax_y0 - thorax_ay + 0.9 * extent[1],
            diaphragm_centre + 0.85 * extent[2],
        )

        # Aorta: ascending to the right of midline, arch over the left main bronchus,
        # descending left of the spine into the abdomen.
        r_aorta = u(12.0, 14.0)
        hx, hy, hz = heart_centre
        top = z_carina + u(30.0, 40.0)
        points = [
            (hx - 0.35 * extent[0], hy, hz + 0.3 * extent[2]),
            (-12.0, hy - 4.0, z_carina + 15.0),
            (-4.0, trachea_y - 18.0, top),
            (trachea_r + r_aorta + 4.0, trachea_y, top - 6.0),
            (24.0 + 0.2 * spine_r, spine_y - spine_r + 2.0, z_carina - 10.0),
            (20.0, spine_y - spine_r, -400.0),
        ]
        radii = [r_aorta, r_aorta, r_aorta, r_aorta * 0.95, r_aorta * 0.85, r_aorta * 0.8]
        aorta = tuple((*points[i], *points[i + 1], radii[i], radii[i + 1]) for i in range(len(points) - 1))
        return cls(
            body_ax=body_ax,
            body_ay=body_ay,
            body_y0=body_y0,
            fat=fat,
            muscle=muscle,
            thorax_y0=thorax_y0,
            thorax_ax=thorax_ax,
            thorax_ay=thorax_ay,
            mediastinum=u(16.0, 24.0),
            spine_y=spine_y,
            spine_r=spine_r,
            vertebra_height=u(24.0, 30.0),
            vertebra_phase=u(0.0, 30.0),
            z_apex=z_apex,
            apex_depth=u(60.0, 85.0),
            dome_right=dome_right,
            dome_left=dome_left,
            dome_depth=dome_depth,
            dome_posterior=u(10.0, 20.0),
            z_carina=z_carina,
            trachea_y=trachea_y,
            trachea_r=trachea_r,
            heart_centre=heart_centre,
            heart_floor=diaphragm_centre,
            heart_axes=tuple(axes),
            heart_rotation=tuple(map(tuple, rotation)),
            ctr=ctr,
            aorta=aorta,
            fissure_left=(z_carina - u(25.0, 40.0), u(0.8, 1.3)),
            fissure_right=(z_carina - u(35.0, 50.0), u(0.8, 1.3)),
            fissure_horizontal=z_carina - u(25.0, 35.0),
            rib_period=u(24.0, 30.0),
            rib_phase=u(0.0, 30.0),
            rib_slope=u(0.35, 0.6),
        )


# --------------------------------------------------------------------------------------
# Geometry on a grid
# --------------------------------------------------------------------------------------


def _tube_distance(grid: _Grid, segments: np.ndarray, reach: float) -> np.ndarray:
    """Distance (mm) outside the nearest tube, negative inside; +inf beyond `reach` mm.

    Each segment row is (x0, y0, z0, x1, y1, z1, r0, r1): a capsule whose radius tapers
    linearly from r0 to r1. Only each capsule's bounding box is evaluated, so hundreds of
    thin branches cost little even at 256^3.
    """
    field = np.full(grid.shape, np.inf, dtype=np.float32)
    x_all, y_all, z_all = grid.coords()
    for row in np.asarray(segments, dtype=float).reshape(-1, 8):
        p0, p1, r0, r1 = row[:3], row[3:6], row[6], row[7]
        pad = max(r0, r1) + reach
        box = grid.box(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
        if box is None:
            continue
        dx = x_all[..., box[2]] - np.float32(p0[0])
        dy = y_all[:, box[1]] - np.float32(p0[1])
        dz = z_all[box[0]] - np.float32(p0[2])
        v = (p1 - p0).astype(np.float32)
        length2 = max(float(v @ v), 1e-6)
        t = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) / np.float32(length2), 0.0, 1.0)
        d2 = (dx - t * v[0]) ** 2 + (dy - t * v[1]) ** 2 + (dz - t * v[2]) ** 2
        dist = np.sqrt(d2) - (r0 + t * np.float32(r1 - r0))
        view = field[box]
        np.minimum(view, dist, out=view)
    return field


def _heart(anat: _Anatomy, grid: _Grid, grow: float) -> np.ndarray:
    """The heart ellipsoid, its axes grown by `grow` mm."""
    mask = np.zeros(grid.shape, dtype=bool)
    centre = np.asarray(anat.heart_centre)
    axes = np.asarray(anat.heart_axes) + grow
    rotation = np.asarray(anat.heart_rotation)
    inverse = rotation @ np.diag(1.0 / axes**2) @ rotation.T
    box = grid.box(centre - axes.max(), centre + axes.max())
    if box is None:
        return mask
    x, y, z = grid.coords()
    dx = x[..., box[2]] - np.float32(centre[0])
    dy = y[:, box[1]] - np.float32(centre[1])
    dz = z[box[0]] - np.float32(centre[2])
    m = inverse.astype(np.float32)
    q = (
        m[0, 0] * dx**2
        + m[1, 1] * dy**2
        + m[2, 2] * dz**2
        + 2 * (m[0, 1] * dx * dy + m[0, 2] * dx * dz + m[1, 2] * dy * dz)
    )
    mask[box] = q < 1.0
    return mask


def _diaphragm(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height (mm) of the diaphragm under each (y, x): domes per side, deep posterior recesses."""
    side = np.abs(x)
    rho2 = ((side - 0.5 * anat.thorax_ax) / (0.55 * anat.thorax_ax)) ** 2 + (
        (y - (anat.thorax_y0 - 0.1 * anat.thorax_ay)) / (0.9 * anat.thorax_ay)
    ) ** 2
    dome = np.where(x > 0, anat.dome_left, anat.dome_right)
    posterior = np.clip((y - anat.thorax_y0) / anat.thorax_ay, 0.0, 1.0)
    return dome - anat.dome_depth * np.minimum(rho2, 1.2) - anat.dome_posterior * posterior


def _apex(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height (mm) of the lung top over each (y, x): a dome, highest posterior-laterally of centre."""
    side = np.abs(x)
    rho2 = ((side - 0.45 * anat.thorax_ax) / (0.55 * anat.thorax_ax)) ** 2 + (
        (y - (anat.thorax_y0 + 0.1 * anat.thorax_ay)) / (1.3 * anat.thorax_ay)
    ) ** 2
    return anat.z_apex - anat.apex_depth * rho2


@dataclass
class _Body:
    """The anatomy of one chest on one grid (no findings but the heart size)."""

    body: np.ndarray  # (H, W): inside the skin
    muscle: np.ndarray  # (H, W): inside the subcutaneous fat
    ring: np.ndarray  # (H, W): radius relative to the thoracic ellipse at its widest
    taper: np.ndarray  # (D, 1, 1): how the thorax narrows toward the apex
    thorax: np.ndarray  # (D, H, W): inside the ribs
    diaphragm: np.ndarray  # (H, W) mm
    heart: np.ndarray  # (D, H, W)
    aorta: np.ndarray
    left: np.ndarray  # pleural cavities (lung before any effusion)
    right: np.ndarray
    lobes: dict[str, np.ndarray]


def _body(anat: _Anatomy, grid: _Grid) -> _Body:
    """Evaluate the chest's solid anatomy, lungs and lobes on a grid."""
    x, y, z = grid.coords()
    x2, y2 = x[0], y[0]  # (1, W), (H, 1)
    ellipse = (x2 / anat.body_ax) ** 2 + ((y2 - anat.body_y0) / anat.body_ay) ** 2
    body = ellipse < 1.0
    inner_ax, inner_ay = anat.body_ax - anat.fat, anat.body_ay - anat.fat
    muscle = (x2 / inner_ax) ** 2 + ((y2 - anat.body_y0) / inner_ay) ** 2 < 1.0
    ring = np.sqrt((x2 / anat.thorax_ax) ** 2 + ((y2 - anat.thorax_y0) / anat.thorax_ay) ** 2)
    start = anat.z_carina - 10.0
    taper = 1.0 - 0.35 * np.clip((z - start) / (anat.z_apex - start), 0.0, 1.0) ** 1.5
    thorax = ring < taper
    diaphragm = _diaphragm(anat, x2, y2).astype(np.float32)
    apex = _apex(anat, x2, y2).astype(np.float32)

    # The lungs fill the thorax except the mediastinum, the spine and its posterior elements.
    spine = (x2**2 + (y2 - anat.spine_y) ** 2 < (anat.spine_r + 6.0) ** 2) | (
        (np.abs(x2) < anat.spine_r + 6.0) & (y2 > anat.spine_y)
    )
    cavity = thorax & (np.abs(x2) > anat.mediastinum) & ~spine
    heart = (
        _heart(anat, grid, 0.0) & thorax & (z > anat.heart_floor) & (y < anat.spine_y - anat.spine_r - 4.0)
    )
    aorta_field = _tube_distance(grid, np.array(anat.aorta), reach=4.0)
    cavity &= (z < apex) & (z > diaphragm)
    heart_space = _heart(anat, grid, 4.0) & (z > anat.heart_floor - 4.0) & (y < anat.spine_y - anat.spine_r)
    cavity &= ~heart_space
    cavity &= ~(aorta_field < 3.0)
    left, right = cavity & (x2 > 0), cavity & (x2 < 0)

    # Oblique fissures rise posteriorly; the horizontal fissure cuts the right middle lobe
    # off the anterior part of the right upper lobe.
    dy = y2 - anat.thorax_y0
    hinge_l, slope_l = anat.fissure_left
    hinge_r, slope_r = anat.fissure_right
    above_left = z > (hinge_l + slope_l * dy + 0.05 * np.abs(x2)).astype(np.float32)
    above_right = z > (hinge_r + slope_r * dy + 0.05 * np.abs(x2)).astype(np.float32)
    above_horizontal = z > (anat.fissure_horizontal + 0.15 * dy).astype(np.float32)
    right_front = right & above_right
    lobes = {
        "left_upper_lobe": left & above_left,
        "left_lower_lobe": left & ~above_left,
        "right_upper_lobe": right_front & above_horizontal,
        "right_middle_lobe": right_front & ~above_horizontal,
        "right_lower_lobe": right & ~above_right,
    }
    return _Body(body, muscle, ring, taper, thorax, diaphragm, heart, aorta_field < 0.0, left, right, lobes)


def _effusion(anat: _Anatomy, grid: _Grid, cavity: np.ndarray, depth: float) -> np.ndarray:
    """Fluid in the dependent (posterior, more so inferior) part of one pleural cavity."""
    _, y, z = grid.coords()
    top, bottom = anat.z_apex - 30.0, min(anat.dome_left, anat.dome_right) - anat.dome_depth
    lowness = np.clip((top - z) / (top - bottom), 0.0, 1.0)
    thickness = depth * (0.5 + 1.5 * lowness)  # (D, 1, 1)
    return cavity & (y > anat.thorax_y0 + anat.thorax_ay - thickness)


# --------------------------------------------------------------------------------------
# Branching trees
# --------------------------------------------------------------------------------------


def _depth(mask: np.ndarray, grid: _Grid) -> np.ndarray:
    """A lower bound of each voxel centre's distance (mm) to the outside of `mask`.

    The chessboard distance never exceeds the Euclidean one (and half a voxel covers the
    outside voxel's extent), so "deeper than r" stays true; it costs a tenth of an exact
    distance transform.
    """
    steps = ndimage.distance_transform_cdt(mask, metric="chessboard")
    return np.maximum(steps - 0.5, 0.0) * min(grid.spacing)


def _sample_points(
    depth: np.ndarray, grid: _Grid, count: int, rng: np.random.Generator, inset_mm: float
) -> np.ndarray:
    """`count` random points (N, 3 mm) where `depth` > 0, at least `inset_mm` deep if possible."""
    for inset in (inset_mm, inset_mm / 2, 0.0):
        candidates = np.flatnonzero(depth > inset)
        if candidates.size:
            break
    else:
        return np.zeros((0, 3))
    chosen = rng.choice(candidates, size=min(count, candidates.size), replace=False)
    return np.array([grid.point(index, rng) for index in chosen])


def _grow_tree(
    start: np.ndarray,
    targets: np.ndarray,
    radius: float,
    rng: np.random.Generator,
    reach: tuple[float, float],
) -> list[tuple[float, ...]]:
    """Segments of a tree from `start` whose leaves end at `targets`.

    Each node heads part of the way (`reach`) toward the centroid of the targets it feeds,
    then splits them in two along their main axis (randomly tilted). Radii follow Murray's
    law (r^3 proportional to the leaves fed), so the tree tapers from its root.
    """
    segments: list[tuple[float, ...]] = []
    stack = [(np.asarray(start, dtype=float), np.asarray(targets, dtype=float), radius)]
    while stack:
        point, feeds, r = stack.pop()
        if len(feeds) == 0:
            continue
        if len(feeds) == 1:
            segments.append((*point, *feeds[0], r, 0.85 * r))
            continue
        centroid = feeds.mean(axis=0)
        node = point + rng.uniform(*reach) * (centroid - point)
        segments.append((*point, *node, r, 0.92 * r))
        centred = feeds - centroid
        axis = np.linalg.svd(centred, full_matrices=False)[2][0] + 0.35 * rng.standard_normal(3)
        order = np.argsort(centred @ axis)
        half = len(feeds) // 2
        for part in (order[:half], order[half:]):
            share = len(part) / len(feeds)
            stack.append((node, feeds[part], r * share ** (1 / 3)))
    return segments


def _direction(lateral: float, posterior: float, down_deg: float) -> np.ndarray:
    """Unit vector `down_deg` from straight down, tipped toward (lateral x, posterior y)."""
    angle = math.radians(down_deg)
    horizontal = np.array([lateral, posterior])
    horizontal /= np.linalg.norm(horizontal)
    return np.array([*(math.sin(angle) * horizontal), -math.cos(angle)])


@dataclass
class _Trees:
    airway: np.ndarray  # segments (N, 8)
    vessels: np.ndarray
    central_arteries: np.ndarray  # mediastinal pulmonary arteries: CT only, not in the mask
    hila: np.ndarray  # (2, 3) where the vessel trees enter each lung


def _plan_trees(anat: _Anatomy, plan: _Grid, body: _Body, rng: np.random.Generator) -> _Trees:
    """Airway and vessel trees (mm segments) grown into the planned lungs and lobes."""
    u = rng.uniform
    carina = np.array([u(-3.0, 3.0), anat.trachea_y + u(0.0, 6.0), anat.z_carina])
    trachea_top = np.array([0.0, anat.trachea_y, plan.fov / 2 + 10.0])
    r_right, r_left = 0.75 * anat.trachea_r, 0.68 * anat.trachea_r
    hilum_right = carina + u(20.0, 28.0) * _direction(-1.0, u(0.0, 0.3), u(20.0, 35.0))
    hilum_left = carina + u(42.0, 52.0) * _direction(1.0, u(0.0, 0.3), u(40.0, 55.0))
    airway = [
        (*trachea_top, *carina, anat.trachea_r, anat.trachea_r),
        (*carina, *hilum_right, r_right, 0.95 * r_right),
        (*carina, *hilum_left, r_left, 0.95 * r_left),
    ]

    depths = {name: _depth(mask, plan) for name, mask in body.lobes.items()}
    depths["left"], depths["right"] = _depth(body.left, plan), _depth(body.right, plan)

    def targets(lobe: str, low: int, high: int, inset: float) -> np.ndarray:
        return _sample_points(depths[lobe], plan, int(rng.integers(low, high + 1)), rng, inset)

    lobe_targets = {lobe: targets(lobe, 2 if lobe == "right_middle_lobe" else 4, 7, 12.0) for lobe in LOBES}
    reach = (0.35, 0.6)
    airway += _grow_tree(hilum_right, lobe_targets["right_upper_lobe"], 0.72 * r_right, rng, reach)
    lower_right = np.concatenate([lobe_targets["right_middle_lobe"], lobe_targets["right_lower_lobe"]])
    intermedius = hilum_right + u(18.0, 25.0) * _unit(lower_right.mean(axis=0) - hilum_right)
    airway.append((*hilum_right, *intermedius, 0.85 * r_right, 0.8 * r_right))
    for lobe in ("right_middle_lobe", "right_lower_lobe"):
        share = 0.55 if lobe == "right_middle_lobe" else 0.8
        airway += _grow_tree(intermedius, lobe_targets[lobe], share * r_right, rng, reach)
    for lobe in LEFT_LOBES:
        airway += _grow_tree(hilum_left, lobe_targets[lobe], 0.75 * r_left, rng, reach)

    # Pulmonary arteries enter each hilum above and in front of the bronchus, veins leave
    # below it toward the left atrium; both branch out to the whole lung.
    vessels: list[tuple[float, ...]] = []
    central: list[tuple[float, ...]] = []
    trunk = np.array([anat.heart_centre[0] * 0.5, anat.heart_centre[1] + 10.0, anat.z_carina - 20.0])
    hila = []
    for hilum, side in ((hilum_left, "left"), (hilum_right, "right")):
        lateral = np.sign(hilum[0])
        artery_root = hilum + np.array([lateral * 6.0, -8.0, 8.0])
        vein_root = hilum + np.array([lateral * 4.0, -6.0, -28.0])
        hila.append(hilum)
        arteries = _sample_points(depths[side], plan, int(rng.integers(26, 37)), rng, 6.0)
        vessels += _grow_tree(artery_root, arteries, u(6.5, 8.0), rng, reach)
        veins = _sample_points(depths[side], plan, int(rng.integers(18, 27)), rng, 6.0)
        vessels += _grow_tree(vein_root, veins, u(5.5, 7.0), rng, reach)
        central.append((*trunk, *artery_root, 11.0, 8.0))
    return _Trees(
        airway=np.array(airway),
        vessels=np.array(vessels),
        central_arteries=np.array(central),
        hila=np.array(hila),
    )


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


def _min_radius(segments: np.ndarray, grid: _Grid) -> np.ndarray:
    """Widen tubes to at least half a voxel diagonal, so every branch stays 26-connected."""
    floor = 0.5 * float(np.linalg.norm(grid.spacing)) * 1.01
    widened = segments.copy()
    widened[:, 6:8] = np.maximum(widened[:, 6:8], floor)
    return widened


# --------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------


def _smooth_noise(grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """Unit-scale noise smooth over ~`_SMOOTH_CELL_MM`, defined in mm (same field at any size).

    Random values on a coarse node lattice are interpolated trilinearly to the voxels as
    three matrix products, far cheaper than a Gaussian filter of a 256^3 volume.
    """
    nodes = int(math.ceil(grid.fov / _SMOOTH_CELL_MM)) + 2
    lattice = rng.standard_normal((nodes, nodes, nodes)).astype(np.float32)

    def weights(index: int) -> np.ndarray:
        position = (grid.axis(index) + grid.fov / 2) / _SMOOTH_CELL_MM + 0.5
        first = np.floor(position).astype(int)
        frac = (position - first).astype(np.float32)
        matrix = np.zeros((position.size, nodes), dtype=np.float32)
        rows = np.arange(position.size)
        matrix[rows, first] = 1.0 - frac
        matrix[rows, first + 1] = frac
        return matrix

    depth, height, width = grid.shape
    field = lattice @ weights(0).T  # (n, n, W)
    field = np.matmul(weights(1), field)  # (n, H, W)
    field = (weights(2) @ field.reshape(nodes, -1)).reshape(depth, height, width)
    return field * np.float32(1.6)  # interpolation halves the variance between nodes


# --------------------------------------------------------------------------------------
# Findings and report
# --------------------------------------------------------------------------------------


def random_findings(rng: np.random.Generator) -> tuple[Finding, ...]:
    """Draw a plausible set of findings (often none) so random phantoms cover every report."""
    findings = []
    if rng.random() < 0.35:
        findings.append(Finding("nodule", LOBES[int(rng.integers(len(LOBES)))]))
    if rng.random() < 0.25:
        findings.append(Finding("effusion", SIDES[int(rng.integers(2))]))
    if rng.random() < 0.2:
        findings.append(Finding("cardiomegaly"))
    return tuple(findings)


def balanced_findings(index: int) -> tuple[Finding, ...]:
    """The findings of case `index` of a set balanced for learning the report.

    In every 60 consecutive cases, each pair of (effusion left / right / none, cardiomegaly or
    not) comes 10 times: 5 times with no nodule and once with a nodule in each of the 5 lobes.
    """
    findings = []
    if index % 3 < 2:
        findings.append(Finding("effusion", SIDES[index % 3]))
    if (index // 3) % 2:
        findings.append(Finding("cardiomegaly"))
    nodule_slot = (index // 6) % (2 * len(LOBES))
    if nodule_slot % 2:
        findings.append(Finding("nodule", LOBES[nodule_slot // 2]))
    return tuple(findings)


def lobe_text(lobe: str) -> str:
    """'right_upper_lobe' -> 'right upper lobe': the words the report uses for a lobe."""
    return lobe.replace("_", " ")


def effusion_grade(depth_mm: float) -> str:
    """The report's word for an effusion this deep (mm of fluid posteriorly)."""
    return next(grade for grade, upper in EFFUSION_GRADES if depth_mm < upper)


_NODULE_SENTENCES = (
    "{a} {size}nodule in the {lobe}.",
    "There is {a} {size}solid nodule in the {lobe}.",
    "{size}pulmonary nodule in the {lobe}.",
    "{a} {size}nodule is seen in the {lobe}.",
)
_EFFUSION_SENTENCES = (
    "{grade}{side} pleural effusion.",
    "There is a {grade}{side} pleural effusion.",
    "{grade}{side}-sided pleural effusion.",
    "A {grade}{side} pleural effusion is present.",
)
_CARDIOMEGALY_SENTENCES = (
    "The heart is enlarged{ctr}.",
    "Cardiomegaly{ctr}.",
    "Cardiomegaly is present{ctr}.",
    "The cardiac silhouette is enlarged{ctr}.",
)
# One of these stands in the report for each kind of finding that is absent.
NEGATIONS: dict[str, tuple[str, ...]] = {
    "nodule": (
        "No pulmonary nodules.",
        "No suspicious pulmonary nodule is seen.",
        "There are no lung nodules.",
        "No focal pulmonary nodule or mass.",
    ),
    "effusion": (
        "No pleural effusion.",
        "No pleural effusions are seen.",
        "There is no pleural effusion.",
        "The pleural spaces are clear without effusion.",
    ),
    "cardiomegaly": (
        "Heart size is normal.",
        "The heart is not enlarged.",
        "Normal heart size.",
        "No cardiomegaly.",
    ),
}
NEUTRAL_SENTENCES: tuple[str, ...] = (
    "The airways are patent.",
    "The trachea and main bronchi are patent.",
    "No pneumothorax.",
    "The osseous structures are unremarkable.",
    "No mediastinal lymphadenopathy.",
)
_NORMAL_IMPRESSIONS = ("No acute cardiopulmonary abnormality.", "Normal chest CT.", "No acute findings.")


def _article(word: str) -> str:
    """'an' before a vowel sound ("an 8 mm", "an 11 mm", "an 18 mm"), else 'a'."""
    number = word.split()[0]
    if number.isdigit():
        return "an" if number.startswith("8") or number in ("11", "18") else "a"
    return "an" if word[:1].lower() in "aeiou" else "a"


def _capitalize(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def write_report(
    findings: tuple[Finding, ...],
    rng: np.random.Generator,
    *,
    measurements: Mapping[Finding, float] | None = None,
) -> str:
    """A short radiology report naming each finding's lobe or side and negating absent kinds.

    Wording is drawn from `rng` so a text encoder sees varied phrasing of the same facts.
    `measurements` (optional) gives a nodule's diameter (mm), an effusion's depth (mm) or
    the cardio-thoracic ratio, which the report then quotes.
    """
    measurements = measurements or {}
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    sentences, impressions = [], []
    for finding in findings:
        value = measurements.get(finding)
        if finding.kind == "nodule":
            size = f"{value:.0f} mm " if value is not None else ""
            lobe = lobe_text(finding.location)
            sentence = pick(_NODULE_SENTENCES).format(a=_article(size or "nodule"), size=size, lobe=lobe)
            sentences.append(_capitalize(sentence))
            impressions.append(f"{_capitalize(lobe)} nodule")
        elif finding.kind == "effusion":
            grade = f"{effusion_grade(value)} " if value is not None else ""
            sentence = pick(_EFFUSION_SENTENCES).format(grade=grade, side=finding.location)
            sentences.append(_capitalize(sentence))
            impressions.append(_capitalize(f"{grade}{finding.location} pleural effusion"))
        else:
            ctr = f" (cardiothoracic ratio {value:.2f})" if value is not None and rng.random() < 0.5 else ""
            sentences.append(pick(_CARDIOMEGALY_SENTENCES).format(ctr=ctr))
            impressions.append("Cardiomegaly")
    present = {finding.kind for finding in findings}
    sentences += [pick(NEGATIONS[kind]) for kind in FINDING_KINDS if kind not in present]
    neutral = rng.choice(len(NEUTRAL_SENTENCES), size=int(rng.integers(1, 3)), replace=False)
    sentences += [NEUTRAL_SENTENCES[i] for i in sorted(neutral)]
    order = rng.permutation(len(sentences))
    body = " ".join(sentences[i] for i in order)
    impression = (
        _capitalize("; ".join(impressions).lower()) + "." if impressions else pick(_NORMAL_IMPRESSIONS)
    )
    return f"Findings: {body} Impression: {impression}"


def _check_findings(findings: tuple[Finding, ...]) -> tuple[Finding, ...]:
    findings = tuple(findings)
    for finding in findings:
        if not isinstance(finding, Finding):
            raise ValueError(f"findings must be Finding objects, got {finding!r}")
    if len(set(findings)) != len(findings):
        raise ValueError(f"findings repeat: {findings}")
    return findings


# --------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------


def make_phantom(
    size: int | tuple[int, int, int] = 64,
    *,
    seed: int = 0,
    findings: tuple[Finding, ...] | None = None,
    fov_mm: float = NOMINAL_FIELD_OF_VIEW_MM,
    lesions: LesionSizes = LesionSizes(),
) -> Phantom:
    """A synthetic chest CT of `size` voxels ((D, H, W) for a tuple) over a `fov_mm` cube.

    findings=None draws random findings from the seed; () means a normal chest. The same
    seed gives the same anatomy whatever the size or findings, so a finding's effect can
    be measured against the same chest without it. `lesions` sets how large findings are drawn.
    """
    # 1. Check inputs; one independent random stream per purpose.
    shape = _as_shape(size)
    if not fov_mm > 0:
        raise ValueError(f"fov_mm must be positive, got {fov_mm!r}")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    anatomy_rng, tree_rng, findings_rng, lesion_rng, report_rng, noise_rng = streams
    findings = random_findings(findings_rng) if findings is None else _check_findings(findings)
    kinds = [finding.kind for finding in findings]
    grid = _Grid(shape, float(fov_mm))
    plan = _Grid((_PLAN_CELLS,) * 3, float(fov_mm))

    # 2. Draw the chest and plan its trees and lesions on the fixed planning grid.
    anat = _Anatomy.draw(anatomy_rng, cardiomegaly="cardiomegaly" in kinds)
    plan_body = _body(anat, plan)
    trees = _plan_trees(anat, plan, plan_body, tree_rng)
    depths: dict[Finding, float] = {}  # effusion -> fluid depth (mm)
    for finding in findings:
        if finding.kind == "effusion":
            grade = lesion_rng.choice(len(_EFFUSION_DEPTHS), p=lesions.effusion_grade_odds)
            depths[finding] = float(lesion_rng.uniform(*list(_EFFUSION_DEPTHS.values())[grade]))
    plan_fluid = np.zeros(plan.shape, dtype=bool)
    for finding, depth in depths.items():
        cavity = plan_body.left if finding.location == "left" else plan_body.right
        plan_fluid |= _effusion(anat, plan, cavity, depth)
    nodules: dict[Finding, tuple[np.ndarray, float]] = {}  # nodule -> (centre, diameter mm)
    for finding in findings:
        if finding.kind == "nodule":
            diameter = float(np.round(lesion_rng.uniform(*lesions.nodule_diameter_mm)))
            lobe = plan_body.lobes[finding.location] & ~plan_fluid
            nodules[finding] = (_nodule_centre(lobe, plan, diameter / 2, lesion_rng), diameter)

    # 3. Evaluate the anatomy on the output grid.
    body = _body(anat, grid) if grid != plan else plan_body
    fluid = np.zeros(shape, dtype=bool)
    for finding, depth in depths.items():
        fluid |= _effusion(anat, grid, body.left if finding.location == "left" else body.right, depth)
    lobes = {name: mask & ~fluid for name, mask in body.lobes.items()}
    left_lung = np.logical_or.reduce([lobes[name] for name in LEFT_LOBES])
    right_lung = np.logical_or.reduce([lobes[name] for name in RIGHT_LOBES])
    lungs = left_lung | right_lung
    cavities = body.left | body.right

    airway_field = _tube_distance(grid, _min_radius(trees.airway, grid), reach=4.0)
    wall = max(1.5, 0.35 * max(grid.spacing))
    airway = _connected_to_top(airway_field < 0.0, fluid | body.heart | body.aorta)
    airway_wall = (airway_field < wall) & ~airway & ~fluid & ~body.heart
    vessel_field = _tube_distance(grid, _min_radius(trees.vessels, grid), reach=0.0)
    # The vessel mask keeps the hilar roots, so each tree stays attached to the mediastinum.
    near_hilum = _balls(grid, trees.hila, 15.0)
    vessels = (vessel_field < 0.0) & (lungs | (near_hilum & ~cavities)) & ~airway & ~body.heart

    nodule_mask = np.zeros(shape, dtype=bool)
    for finding, (centre, diameter) in nodules.items():
        nodule_mask |= _nodule(grid, centre, diameter, lobes[finding.location] & ~airway)
    vessels &= ~nodule_mask

    # 4. Paint Hounsfield units, from the outside in; later tissues overwrite earlier ones.
    ct = _paint(anat, grid, body, trees, noise_rng)
    smooth = _smooth_noise(grid, noise_rng)
    _, y, _ = grid.coords()
    gravity = np.clip((y - anat.thorax_y0) / anat.thorax_ay, -1.0, 1.0) * 20.0  # dependent lung is denser
    np.copyto(ct, HU_LUNG + 22.0 * smooth + gravity, where=lungs)
    np.copyto(ct, HU_BLOOD + 8.0 * smooth, where=vessels)
    np.copyto(ct, HU_AIRWAY_WALL, where=airway_wall & ~vessels)
    np.copyto(ct, HU_AIR, where=airway)
    np.copyto(ct, HU_EFFUSION + 4.0 * smooth, where=fluid)
    np.copyto(ct, HU_NODULE + 6.0 * smooth, where=nodule_mask)
    inside = np.broadcast_to(body.body, shape)
    ct += np.where(inside, np.float32(10.0), np.float32(4.0)) * noise_rng.standard_normal(
        shape, dtype=np.float32
    )
    ct_hu = np.clip(np.rint(ct), *STORED_HU_RANGE).astype(np.int16)

    # 5. Masks, findings and report.
    masks = {**lobes, "airway": airway, "vessels": vessels, "left_lung": left_lung, "right_lung": right_lung}
    finding_masks = {"heart": body.heart}
    if nodules:
        finding_masks["nodule"] = nodule_mask
    if depths:
        finding_masks["effusion"] = fluid
    measurements: dict[Finding, float] = {f: d for f, (_, d) in nodules.items()}
    measurements.update(depths)
    if "cardiomegaly" in kinds:
        measurements[Finding("cardiomegaly")] = anat.ctr
    report = write_report(findings, report_rng, measurements=measurements)
    return Phantom(
        ct_hu=ct_hu,
        masks=masks,
        spacing=grid.spacing,
        findings=findings,
        report=report,
        finding_masks=finding_masks,
    )


def _nodule_centre(lobe: np.ndarray, plan: _Grid, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A point of the lobe at least `radius` (plus one planning cell) from its border."""
    depth = _depth(lobe, plan)
    margin = radius + max(plan.spacing)
    candidates = np.flatnonzero(depth >= margin)
    if candidates.size == 0:  # a thin lobe: take its deepest points
        candidates = np.flatnonzero(depth >= depth.max() * 0.9) if depth.max() > 0 else np.arange(0)
    if candidates.size == 0:
        raise ValueError("the lobe for the nodule is empty")
    index = int(rng.choice(candidates))
    k, j, i = np.unravel_index(index, plan.shape)
    return np.array([plan.axis(0)[i], plan.axis(1)[j], plan.axis(2)[k]], dtype=float)


def _balls(grid: _Grid, centres: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within `radius` mm of any of the centres (N, 3 mm)."""
    mask = np.zeros(grid.shape, dtype=bool)
    x, y, z = grid.coords()
    for centre in centres:
        box = grid.box(centre - radius, centre + radius)
        if box is None:
            continue
        d2 = (
            (x[..., box[2]] - centre[0]) ** 2 + (y[:, box[1]] - centre[1]) ** 2 + (z[box[0]] - centre[2]) ** 2
        )
        mask[box] |= d2 < radius**2
    return mask


def _nodule(grid: _Grid, centre: np.ndarray, diameter: float, lobe: np.ndarray) -> np.ndarray:
    """The nodule's voxels in its lobe; never empty, so it shows even on a coarse grid."""
    mask = _balls(grid, centre[None], diameter / 2) & lobe
    if not mask.any():
        voxels = np.argwhere(lobe)
        x, y, z = (grid.axis(axis)[voxels[:, 2 - axis]] for axis in range(3))
        nearest = np.argmin((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
        mask[tuple(voxels[nearest])] = True
    return mask


def _connected_to_top(lumen: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """The airway lumen left after `blocked` tissue, kept only where connected to the top slice."""
    lumen = lumen & ~blocked
    labels, _ = ndimage.label(lumen, structure=np.ones((3, 3, 3), dtype=bool))
    top = np.unique(labels[-1])
    return np.isin(labels, top[top > 0])


def _paint(anat: _Anatomy, grid: _Grid, body: _Body, trees: _Trees, rng: np.random.Generator) -> np.ndarray:
    """HU of everything but lungs, airway lumen and findings: skin to mediastinum and bone."""
    shape = grid.shape
    x, y, z = grid.coords()
    x2, y2 = x[0], y[0]
    ct = np.full(shape, HU_AIR, dtype=np.float32)
    np.copyto(ct, HU_FAT, where=body.body)
    np.copyto(ct, HU_SOFT_TISSUE, where=body.muscle)
    below = z < body.diaphragm
    np.copyto(
        ct, np.where(x2 < 0, HU_LIVER, HU_SOFT_TISSUE - 5.0).astype(np.float32), where=body.thorax & below
    )

    # Mediastinal fat around the heart and great vessels, then the soft-tissue organs in it.
    cavities = body.left | body.right
    central = (np.abs(x2) < anat.mediastinum + 20.0) | _heart(anat, grid, 10.0)
    np.copyto(ct, HU_MEDIASTINAL_FAT, where=central & body.thorax & ~below & (z < anat.z_apex) & ~cavities)
    oesophagus = np.array(
        [
            [
                4.0,
                anat.spine_y - anat.spine_r - 7.0,
                400.0,
                4.0,
                anat.spine_y - anat.spine_r - 7.0,
                -400.0,
                6.0,
                6.0,
            ]
        ]
    )
    organs = _tube_distance(grid, np.concatenate([oesophagus, trees.central_arteries]), reach=0.0) < 0.0
    organs |= body.heart | body.aorta
    np.copyto(ct, HU_SOFT_TISSUE, where=organs & ~cavities)

    # Ribs: oblique bands in the chest wall, rising toward the back; the sternum in front.
    lowest = min(anat.dome_left, anat.dome_right) - anat.dome_depth - anat.dome_posterior
    levels = (z > lowest) & (z < anat.z_apex + 15.0)
    front = (y2 < anat.thorax_y0 - 0.6 * anat.thorax_ay) & (np.abs(x2) < 0.3 * anat.thorax_ax)
    ring = body.ring / body.taper  # (D, H, W), 1 on the inner thoracic wall
    wall = (ring > 1.0) & (ring < 1.0 + 10.0 / anat.thorax_ax) & ~front & body.muscle & levels
    k, j, i = np.nonzero(wall)
    phase = z[k, 0, 0] - anat.rib_slope * (y2[j, 0] - anat.thorax_y0) - anat.rib_phase
    rib = np.cos(2 * np.pi * phase / anat.rib_period) > 0.45
    ct[k[rib], j[rib], i[rib]] = HU_CORTICAL_BONE - 100.0
    sternum = (
        (np.abs(x2) < 14.0) & (ring > 1.0) & (ring < 1.0 + 12.0 / anat.thorax_ay) & (y2 < anat.thorax_y0)
    )
    np.copyto(
        ct, HU_CANCELLOUS_BONE, where=sternum & (z > anat.dome_left - 10.0) & (z < anat.z_carina + 30.0)
    )

    # Spine: vertebral bodies (cortex and marrow) between discs, canal, arch and spinous process.
    radial = np.sqrt(x2**2 + (y2 - anat.spine_y) ** 2)
    vertebra = radial < anat.spine_r
    canal_y = anat.spine_y + anat.spine_r + 8.0
    canal_r = np.sqrt(x2**2 + (y2 - canal_y) ** 2)
    arch = ((canal_r < 14.0) & (canal_r >= 8.0) & (y2 > anat.spine_y)) | (
        (np.abs(x2) < 3.5) & (y2 > canal_y) & (y2 < canal_y + 28.0)
    )
    disc = ((z - anat.vertebra_phase) % anat.vertebra_height) < 5.0
    np.copyto(ct, HU_SOFT_TISSUE, where=(canal_r < 18.0) & body.muscle)
    np.copyto(ct, HU_CANCELLOUS_BONE, where=vertebra & ~disc)
    np.copyto(ct, HU_CORTICAL_BONE, where=vertebra & (radial > anat.spine_r - 2.5) & ~disc)
    np.copyto(ct, HU_DISC, where=vertebra & disc)
    np.copyto(ct, HU_CORTICAL_BONE - 100.0, where=arch & body.muscle)
    np.copyto(ct, HU_CSF, where=canal_r < 8.0)
    return ct
