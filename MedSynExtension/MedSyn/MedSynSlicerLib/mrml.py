"""MedSyn results in MRML, and MRML segmentations back to MedSyn anatomy, without Qt.

Only `slicer` (MRML, Segmentations core), `vtk`, numpy and SimpleITK are used, so the same
code runs inside 3D Slicer and on a headless `slicer-core` scene in the tests. Every
function takes the scene (or a node) it works on; none touches `slicer.mrmlScene`.

Coordinates: MedSyn files are written by SimpleITK, in LPS, described by
`MedSynLib.geometry.Geometry` (shape (z, y, x), spacing and origin (x, y, z) in mm,
direction a row-major 3x3 whose columns are the i, j, k axes). Slicer works in RAS, so
IJKToRAS = diag(-1, -1, 1) . [direction . diag(spacing) | origin].

Anatomy travels as `.seg.nrrd` both ways (the library's `anatomy.seg.nrrd` in, its own
writer's file out for `--anatomy`): one whole mask per structure, so a vessel running through
a lobe leaves no hole in it, as it would in a label map.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from MedSynLib.anatomy import STRUCTURES, Structure, resolve_structures, structure_for_segment_entry
from MedSynLib.geometry import Geometry
from MedSynLib.hounsfield import LUNG_LEVEL, LUNG_WINDOW

SYNTHETIC_ATTRIBUTE = "MedSyn.Synthetic"
REPORT_ATTRIBUTE = "MedSyn.Report"
PARAMETERS_ATTRIBUTE = "MedSyn.Parameters"
TERMINOLOGY_TAG = "TerminologyEntry"  # the segment tag Slicer keeps terminology in
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])



class GenerationResultError(ValueError):
    """A result folder that cannot be imported (missing or unreadable file, bad metadata)."""


# --------------------------------------------------------------------------------------
# Geometry: LPS Geometry <-> RAS IJKToRAS, numpy <-> VTK images
# --------------------------------------------------------------------------------------


def ijk_to_ras(geometry: Geometry) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a geometry given in LPS."""
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.asarray(geometry.spacing, dtype=float))
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(geometry.origin, dtype=float)
    return matrix


def geometry_from_ijk_to_ras(matrix: np.ndarray, shape_zyx: tuple[int, int, int]) -> Geometry:
    """The LPS Geometry of a grid given by its IJK-to-RAS matrix and (z, y, x) shape."""
    matrix = np.asarray(matrix, dtype=float)
    axes_ras = matrix[:3, :3]
    spacing = np.linalg.norm(axes_ras, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"degenerate IJK-to-RAS matrix (zero spacing): {matrix.tolist()}")
    direction = LPS_TO_RAS @ (axes_ras / spacing)
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return Geometry(
        tuple(int(n) for n in shape_zyx),
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in origin),
        tuple(float(d) for d in direction.ravel()),
    )


def geometry_of_volume_node(volume_node) -> Geometry:
    """Grid of a volume node (its own IJKToRAS; a parent transform is not applied)."""
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume {volume_node.GetName()!r} has no image data")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return geometry_from_ijk_to_ras(slicer.util.arrayFromVTKMatrix(matrix), tuple(image.GetDimensions())[::-1])


def _geometry_of_oriented_image(image) -> Geometry:
    """Grid of a vtkOrientedImageData, re-based so that its first voxel is index (0, 0, 0)."""
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    matrix = slicer.util.arrayFromVTKMatrix(matrix)
    extent = image.GetExtent()
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if min(shape) < 1:
        raise ValueError("empty image extent")
    matrix[:3, 3] = (matrix @ np.array([extent[0], extent[2], extent[4], 1.0]))[:3]
    return geometry_from_ijk_to_ras(matrix, shape)


def _fill_image(image, array_zyx: np.ndarray) -> None:
    """Set the dimensions and point scalars of a vtkImageData from a (z, y, x) array (copied)."""
    array_zyx = np.ascontiguousarray(array_zyx)
    if array_zyx.ndim != 3:
        raise ValueError(f"expected a 3D (z, y, x) array, got shape {array_zyx.shape}")
    if array_zyx.dtype == bool:
        array_zyx = array_zyx.astype(np.uint8)
    image.SetDimensions(array_zyx.shape[2], array_zyx.shape[1], array_zyx.shape[0])
    scalars = numpy_support.numpy_to_vtk(array_zyx.ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)


def _array_of_image(image) -> np.ndarray:
    """The point scalars of a vtkImageData as a (z, y, x) numpy array (copied)."""
    nx, ny, nz = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros((nz, ny, nx), dtype=np.uint8)
    return numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx).copy()


def _oriented_image(array_zyx: np.ndarray, geometry: Geometry):
    image = slicer.vtkOrientedImageData()
    _fill_image(image, array_zyx)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(geometry)))
    return image


def _check_shape(array: np.ndarray, geometry: Geometry, what: str) -> None:
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"{what} has shape {tuple(array.shape)} but the geometry is {tuple(geometry.shape)}")


# --------------------------------------------------------------------------------------
# Nodes from arrays
# --------------------------------------------------------------------------------------


def volume_node_from_array(scene, array_zyx, spacing, origin, direction, name: str):
    """A scalar volume (HU) with the CT-Lung window, marked synthetic. Geometry in LPS, as SimpleITK gives it."""
    array_zyx = np.asarray(array_zyx)
    geometry = Geometry(tuple(array_zyx.shape), tuple(spacing), tuple(origin), tuple(np.ravel(direction)))
    if len(geometry.spacing) != 3 or len(geometry.origin) != 3 or len(geometry.direction) != 9:
        raise ValueError("spacing and origin need 3 values and direction 9")
    image = vtk.vtkImageData()
    _fill_image(image, array_zyx)

    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(geometry)))
    node.SetAndObserveImageData(image)
    node.SetAttribute(SYNTHETIC_ATTRIBUTE, "true")
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(LUNG_WINDOW, LUNG_LEVEL)
    return node


def terminology_string(structure: Structure) -> str:
    """The structure's terminology as Slicer stores it in the TerminologyEntry tag."""
    from slicerio.segmentation import terminology_entry_to_string  # needs slicerio, installed on first use

    return terminology_entry_to_string(structure.terminology())


def segmentation_node_from_masks(
    scene,
    masks: dict[str, np.ndarray],
    geometry: Geometry,
    reference_volume_node=None,
    name: str = "MedSyn anatomy",
    *,
    show_3d: bool = True,
):
    """A segmentation with one segment per structure (structure name -> (z, y, x) mask, empty
    ones included): name, color and terminology from anatomy.py, overlaps kept.

    The closed-surface representation is built for the 3D view when the scene's converter
    rules allow it (always in Slicer).
    """
    structures = resolve_structures(tuple(masks))
    for structure in structures:
        _check_shape(np.asarray(masks[structure.name]), geometry, f"the {structure.display_name} mask")

    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(scene.GenerateUniqueName(name))
    node.SetAttribute(SYNTHETIC_ATTRIBUTE, "true")
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    if reference_volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    else:
        reference = _oriented_image(np.zeros(geometry.shape, dtype=np.uint8), geometry)
        node.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(reference),
        )
    segmentation = node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    for structure in structures:
        segment = slicer.vtkSegment()
        segment.SetName(structure.display_name)
        segment.SetColor(*structure.color)
        segment.SetTag(TERMINOLOGY_TAG, terminology_string(structure))
        segment.SetNameAutoGenerated(False)  # the name and color are ours: Slicer must not replace them
        segment.SetColorAutoGenerated(False)
        mask = np.asarray(masks[structure.name], dtype=np.uint8)
        segment.AddRepresentation(labelmap_name, _oriented_image(mask, geometry))
        segmentation.AddSegment(segment, structure.name)
    # Non-overlapping segments share one labelmap layer, overlapping ones get layers of their own.
    segmentation.CollapseBinaryLabelmaps(False)
    if show_3d and node.CreateClosedSurfaceRepresentation():
        node.GetDisplayNode().SetPreferredDisplayRepresentationName3D(
            slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
        )
    node.GetDisplayNode().SetVisibility3D(True)
    return node


# --------------------------------------------------------------------------------------
# Segmentation -> MedSyn anatomy (conditioning input)
# --------------------------------------------------------------------------------------

def structure_for_segment(segment) -> str | None:
    """The MedSyn structure a segment stands for: by terminology first, else by name."""
    entry = vtk.mutable("")
    segment.GetTag(TERMINOLOGY_TAG, entry)
    entry, terminology = str(entry), {}
    if entry:
        from slicerio.segmentation import terminology_entry_from_string

        with contextlib.suppress(IndexError, ValueError):  # an unreadable tag: the name decides
            terminology = terminology_entry_from_string(entry)
    return structure_for_segment_entry(segment.GetName() or "", terminology)


@dataclass(frozen=True)
class AnatomyExport:
    masks: dict[str, np.ndarray]  # structure name -> bool (z, y, x) mask on `geometry`
    geometry: Geometry  # LPS
    used: dict[str, str] = field(default_factory=dict)  # segment name -> structure name
    ignored: tuple[str, ...] = ()  # segment names that map to no structure

    def write(self, path: str | Path) -> Path:
        """Write as the .seg.nrrd `MedSynLib.generate --anatomy` reads, with the library's own writer."""
        from MedSynLib.io.volumes import write_segmentation  # (slicerio, pillow: installed on first use)

        path = Path(path)
        write_segmentation(path, self.masks, self.geometry)
        return path


def _reference_geometry(segmentation_node, reference, first_mask_image) -> Geometry:
    if isinstance(reference, Geometry):
        return reference
    if reference is not None:
        return geometry_of_volume_node(reference)
    serialized = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    if serialized:
        image = slicer.vtkOrientedImageData()
        if slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, image, False):
            return _geometry_of_oriented_image(image)
    return _geometry_of_oriented_image(first_mask_image)


def anatomy_from_segmentation_node(segmentation_node, reference=None) -> AnatomyExport:
    """The segmentation as MedSyn structure masks on a reference grid.

    Segments are matched to structures by terminology, else by name ("left upper lobe",
    "lung_upper_lobe_left", "LUL" ...); others are ignored. `reference` is a volume node, a
    Geometry, or None for the segmentation's own reference geometry. Raises ValueError when
    no segment maps to a structure or the mapped segments are empty.
    """
    segmentation = segmentation_node.GetSegmentation()
    used: dict[str, str] = {}
    ignored: list[str] = []
    by_structure: dict[str, list[str]] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        structure = structure_for_segment(segment)
        if structure is None:
            ignored.append(segment.GetName())
        else:
            used[segment.GetName()] = structure
            by_structure.setdefault(structure, []).append(segment_id)
    if not by_structure:
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        known = sorted(s.display_name for s in STRUCTURES.values())
        raise ValueError(
            f"no segment of {segmentation_node.GetName()!r} matches a MedSyn structure "
            f"(segments: {names}; known structures: {known}; matched by terminology or by name)"
        )

    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if not segmentation.ContainsRepresentation(labelmap_name) and not segmentation_node.CreateBinaryLabelmapRepresentation():
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} cannot be converted to a binary labelmap")

    mask_images = {}
    for segment_ids in by_structure.values():
        for segment_id in segment_ids:
            image = slicer.vtkOrientedImageData()
            if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image):
                raise ValueError(f"cannot read the labelmap of segment {segment_id!r}")
            mask_images[segment_id] = image
    geometry = _reference_geometry(segmentation_node, reference, next(iter(mask_images.values())))
    reference_image = _oriented_image(np.zeros(geometry.shape, dtype=np.uint8), geometry)

    to_world = None
    if segmentation_node.GetParentTransformNode() is not None:
        to_world = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(segmentation_node.GetParentTransformNode(), None, to_world)

    masks: dict[str, np.ndarray] = {}
    for structure in (name for name in STRUCTURES if name in by_structure):  # in anatomy.py's order
        mask = np.zeros(geometry.shape, dtype=bool)
        for segment_id in by_structure[structure]:
            mask |= _resampled_mask(mask_images[segment_id], reference_image, geometry, to_world)
        masks[structure] = mask
    if not any(mask.any() for mask in masks.values()):
        raise ValueError(f"the segments of {segmentation_node.GetName()!r} that match MedSyn structures are empty")
    return AnatomyExport(masks, geometry, used, tuple(ignored))


def _resampled_mask(mask_image, reference_image, geometry: Geometry, to_world) -> np.ndarray:
    extent = mask_image.GetExtent()
    if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return np.zeros(geometry.shape, dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        mask_image, reference_image, resampled, False, False, to_world
    ):
        raise ValueError("resampling a segment onto the reference grid failed")
    array = _array_of_image(resampled)
    if array.shape != tuple(geometry.shape):
        raise ValueError(f"resampled segment has shape {array.shape}, expected {tuple(geometry.shape)}")
    return array > 0


# --------------------------------------------------------------------------------------
# Subject hierarchy and whole results
# --------------------------------------------------------------------------------------


def place_in_subject_hierarchy(scene, volume_node, segmentation_node, folder_name: str, report: str,
                               parameters: dict) -> int:
    """Put the volume and its segmentation in one folder that carries the report and parameters."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), folder_name)
    sh.SetItemAttribute(folder, SYNTHETIC_ATTRIBUTE, "true")
    sh.SetItemAttribute(folder, REPORT_ATTRIBUTE, report)
    sh.SetItemAttribute(folder, PARAMETERS_ATTRIBUTE, json.dumps(parameters, sort_keys=True, default=str))
    for node in (volume_node, segmentation_node):
        if node is None:
            continue
        node.SetAttribute(REPORT_ATTRIBUTE, report)
        item = sh.GetItemByDataNode(node)
        if item == sh.GetInvalidItemID():
            sh.CreateItem(folder, node)  # Slicer makes items on its own; a bare MRML scene does not
        else:
            sh.SetItemParent(item, folder)
    return folder


def result_names(report: str, seed) -> tuple[str, str, str]:
    """Volume, segmentation and folder names from the report's first words and the seed."""
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9'\-]*", report)
    snippet = ""
    for word in words[:6]:
        if len(snippet) + len(word) + 1 > 40:
            break
        snippet = f"{snippet} {word}".strip()
    snippet = snippet or "report"
    suffix = f"{snippet} (seed {seed})"
    return f"Synthetic CT: {suffix}", f"Synthetic anatomy: {suffix}", f"MedSyn synthetic: {suffix}"


@dataclass
class GenerationNodes:
    volume_node: object
    segmentation_node: object
    folder_item: int
    metadata: dict


def _read_image(path: Path) -> sitk.Image:
    if not path.is_file():
        raise GenerationResultError(f"the result folder lacks {path.name} ({path.parent})")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise GenerationResultError(f"cannot read {path}: {str(error).strip().splitlines()[-1]}") from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise GenerationResultError(f"{path.name} is not a 3D scalar image")
    return image


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise GenerationResultError(f"the result folder lacks {path.name} ({path.parent})")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise GenerationResultError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(metadata, dict):
        raise GenerationResultError(f"{path} does not hold a JSON object")
    for key, kind in (("report", str), ("structures", list)):
        if not isinstance(metadata.get(key), kind):
            raise GenerationResultError(f"{path.name} lacks {key!r} ({kind.__name__})")
    if "seed" not in metadata:
        raise GenerationResultError(f"{path.name} lacks 'seed'")
    return metadata


def remove_nodes(scene, nodes) -> None:
    """Remove nodes and their display nodes from the scene (undo of a partial import)."""
    sh = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")  # (do not create one)
    for node in reversed([n for n in nodes if n is not None]):
        if node.GetScene() is not scene:
            continue
        displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        item = sh.GetItemByDataNode(node) if sh is not None else 0
        if item:
            sh.RemoveItem(item, False, False)
        scene.RemoveNode(node)
        for display in displays:
            if display is not None and display.GetScene() is scene:
                scene.RemoveNode(display)


def _read_segmentation(path: Path) -> tuple[dict[str, np.ndarray], Geometry]:
    """Segment ID -> whole bool (z, y, x) mask, and the grid, of a .seg.nrrd (slicerio: layers kept)."""
    import slicerio  # installed on first use

    if not path.is_file():
        raise GenerationResultError(f"the result folder lacks {path.name} ({path.parent})")
    try:
        segmentation = slicerio.read_segmentation(str(path))
        masks = {segment["id"]: slicerio.segment_mask(segmentation, segment).transpose(2, 1, 0)
                 for segment in segmentation["segments"]}
    except Exception as error:  # slicerio/pynrrd raise many types for a broken file
        raise GenerationResultError(f"cannot read {path}: {error}") from error
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3] = LPS_TO_RAS @ np.asarray(segmentation["ijkToLPS"], dtype=float)[:3]
    return masks, geometry_from_ijk_to_ras(ijk_to_ras, segmentation["voxels"].shape[-3:][::-1])


def load_generation_result(scene, out_dir: str | Path, *, show_3d: bool = True,
                           parameters: dict | None = None) -> GenerationNodes:
    """Import a result folder written by `MedSynLib.generate` (ct.nii.gz, anatomy.seg.nrrd, generation.json).

    The anatomy is the library's overlap-preserving segmentation, so what Slicer shows is what
    the model generated. Everything is read and checked before the first node is made; if
    building the nodes fails anyway, the nodes made so far are removed, so the scene is as before.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise GenerationResultError(f"no result folder at {out}")
    metadata = _read_metadata(out / "generation.json")
    ct_image = _read_image(out / "ct.nii.gz")
    masks, anatomy_geometry = _read_segmentation(out / "anatomy.seg.nrrd")
    geometry = Geometry.of_image(ct_image)
    if not geometry.matches(anatomy_geometry):
        raise GenerationResultError("anatomy.seg.nrrd is not on the grid of ct.nii.gz")
    try:
        structures = resolve_structures(tuple(metadata["structures"]))
    except ValueError as error:
        raise GenerationResultError(f"generation.json: {error}") from error
    unexpected = sorted(set(masks) - {s.name for s in structures})
    if unexpected:
        raise GenerationResultError(f"anatomy.seg.nrrd has segments {unexpected} outside the structures "
                                    f"{metadata['structures']}")
    empty = np.zeros(geometry.shape, dtype=bool)
    masks = {s.name: masks.get(s.name, empty) for s in structures}
    ct = sitk.GetArrayFromImage(ct_image)

    volume_name, segmentation_name, folder_name = result_names(metadata["report"], metadata["seed"])
    recorded = {k: v for k, v in metadata.items() if k != "report"}
    if parameters:
        recorded["request"] = parameters
    created = []
    try:
        volume = volume_node_from_array(scene, ct, geometry.spacing, geometry.origin, geometry.direction, volume_name)
        created.append(volume)
        segmentation = segmentation_node_from_masks(scene, masks, geometry, volume, segmentation_name, show_3d=show_3d)
        created.append(segmentation)
        folder = place_in_subject_hierarchy(scene, volume, segmentation, folder_name, metadata["report"], recorded)
    except Exception:
        remove_nodes(scene, created)
        raise
    return GenerationNodes(volume, segmentation, folder, metadata)
