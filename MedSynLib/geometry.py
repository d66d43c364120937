"""Physical geometry of the model grid, and moving label maps and volumes onto and off it.

Arrays are indexed (z, y, x) as SimpleITK's GetArrayFromImage gives them; spacing and
origin are (x, y, z) in millimetres, LPS. The model grid is a cube of voxels; it gets a
physical size either from the model (nominal spacing, centred at the origin) or from a
given anatomy whose field of view it takes over, so outputs overlay that anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from MedSynLib.compat import zip_strict

if TYPE_CHECKING:  # SimpleITK is imported where images are made: training and sampling run without it
    import SimpleITK as sitk

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# The field of view a generated volume spans when nothing gives it one: the reference's volumes
# were registered to an atlas and resized to 256^3 without a physical spacing; MedSyn places them
# on 1.25 mm voxels (pipeline/convert.py), and every smaller model on the same 320 mm cube.
NOMINAL_FIELD_OF_VIEW_MM = 320.0
# Two grids are the same when they differ by less than float round-off of what files store.
SPACING_TOLERANCE = 1e-4  # relative and absolute (mm)
ORIGIN_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Geometry:
    shape: tuple[int, int, int]  # (z, y, x) voxels
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = field(default=IDENTITY)

    @classmethod
    def centered(cls, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Geometry:
        """A grid centred on the physical origin, as generated volumes have no patient position."""
        size_xyz = shape[::-1]
        origin = tuple(-(n - 1) / 2 * s for n, s in zip_strict(size_xyz, spacing))
        return cls(tuple(shape), tuple(spacing), origin)

    @classmethod
    def of_image(cls, image: sitk.Image) -> Geometry:
        return cls(tuple(image.GetSize()[::-1]), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def image(self, array: np.ndarray) -> sitk.Image:
        """Wrap a (z, y, x) array with this geometry."""
        if tuple(array.shape) != tuple(self.shape):
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape}")
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: Geometry) -> bool:
        """The same voxel grid (shape, spacing, origin and direction), up to file round-off."""
        return (
            tuple(self.shape) == tuple(other.shape)
            and np.allclose(self.spacing, other.spacing, rtol=SPACING_TOLERANCE, atol=SPACING_TOLERANCE)
            and np.allclose(self.origin, other.origin, atol=ORIGIN_TOLERANCE_MM)
            and np.allclose(self.direction, other.direction, atol=DIRECTION_TOLERANCE)
        )

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}


def fitted_grid(reference: Geometry, size: int) -> Geometry:
    """A size^3 LPS grid (identity direction) over the reference's field of view.

    The networks were trained on LPS-ordered arrays (`prepare` reorients), so they must run
    on such a grid whatever order the given file stores its voxels in (RAS, slices top to
    bottom, as Slicer often writes them): the grid spans the physical bounding box of the
    reference's voxels (exact unless the reference is oblique), and results are resampled
    back onto the reference's own grid.
    """
    direction = np.array(reference.direction, dtype=float).reshape(3, 3)
    spacing = np.array(reference.spacing, dtype=float)
    corners_index = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in reference.shape[::-1]], indexing="ij"))
    corners = np.array(reference.origin)[:, None] + direction @ (spacing[:, None] * corners_index.reshape(3, -1))
    low, high = corners.min(axis=1), corners.max(axis=1)
    new_spacing = (high - low) / size
    origin = low + new_spacing / 2
    return Geometry((size, size, size), tuple(float(v) for v in new_spacing), tuple(float(v) for v in origin))


def resample(array: np.ndarray, source: Geometry, target: Geometry, *, labels: bool) -> np.ndarray:
    """Resample a (z, y, x) array between grids: nearest neighbour for labels, linear otherwise."""
    import SimpleITK as sitk

    image = source.image(array)
    reference = target.image(np.zeros(target.shape, dtype=np.uint8))
    interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    default = 0 if labels else float(array.min())
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())
    return sitk.GetArrayFromImage(out)
