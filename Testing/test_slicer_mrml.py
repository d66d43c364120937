"""The Slicer module's MRML side on a real, headless MRML scene (`slicer-core` from PyPI).

What 3D Slicer would show is checked on the nodes themselves: volume geometry (LPS files ->
RAS IJKToRAS) and HU values, segment names/colors/terminology, anatomy round trips (whole,
overlapping masks), segment-to-structure mapping, the subject hierarchy, MRML storage round
trips into a fresh scene, and whole result folders imported all-or-nothing. Skipped when
slicer-core is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_slicer import (  # noqa: E402
    fake_launcher,
    import_slicer_core,
    register_segmentation_converters,
    write_fake_generator,
)

slicer = import_slicer_core()
sitk = pytest.importorskip("SimpleITK")
slicerio_segmentation = pytest.importorskip("slicerio.segmentation")

import vtk  # noqa: E402
from MedSynSlicerLib import mrml, runner  # noqa: E402
from MedSynSlicerLib.job import GenerationRequest  # noqa: E402

from MedSynLib.anatomy import (  # noqa: E402
    SLICER_CATEGORY_CONTEXT,
    STRUCTURE_SETS,
    STRUCTURES,
    label_map_to_masks,
    resolve_structures,
)
from MedSynLib.geometry import Geometry  # noqa: E402
from MedSynLib.io.volumes import read_anatomy, write_segmentation  # noqa: E402

# An oblique-free but axis-permuted, anisotropic grid away from the origin: a wrong LPS/RAS
# flip, a transposed direction or swapped spacing all show.
GEOMETRY = Geometry(
    shape=(12, 16, 20),
    spacing=(0.8, 1.25, 2.5),
    origin=(31.0, -17.5, 42.0),
    direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
)
LOBES = resolve_structures("lobes")


def sample_labels(shape=GEOMETRY.shape) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:6, 2:14, 1:9] = STRUCTURES["left_upper_lobe"].label
    labels[6:11, 2:14, 1:9] = STRUCTURES["left_lower_lobe"].label
    labels[1:5, 2:14, 11:19] = STRUCTURES["right_upper_lobe"].label
    labels[5:8, 2:14, 11:19] = STRUCTURES["right_middle_lobe"].label
    labels[8:11, 2:14, 11:19] = STRUCTURES["right_lower_lobe"].label
    labels[0:9, 7:9, 9:11] = STRUCTURES["airway"].label
    labels[3, 4:12, 3] = STRUCTURES["vessels"].label  # a vessel inside the left upper lobe
    return labels


def sample_ct(shape=GEOMETRY.shape) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) % 1624 - 1024).astype(np.int16)


def masks_of(labels: np.ndarray, structures=LOBES) -> dict[str, np.ndarray]:
    return label_map_to_masks(labels, resolve_structures(structures) if isinstance(structures, str) else structures)


def overlapping_masks() -> dict[str, np.ndarray]:
    """The lobes with a vessel running through the left upper one, which has no hole there."""
    masks = masks_of(sample_labels())
    masks["left_upper_lobe"] |= masks["vessels"]
    assert (masks["left_upper_lobe"] & masks["vessels"]).any()
    return masks


def segmentation_from_labels(scene, labels, structures=LOBES, volume=None, name="anatomy", *, show_3d=False):
    return mrml.segmentation_node_from_masks(scene, masks_of(labels, structures), GEOMETRY, volume, name,
                                             show_3d=show_3d)


def segment_mask(node, segment_id: str, geometry=GEOMETRY) -> np.ndarray:
    image = slicer.vtkOrientedImageData()
    assert node.GetBinaryLabelmapRepresentation(segment_id, image), segment_id
    return mrml._resampled_mask(image, mrml._oriented_image(np.zeros(geometry.shape, np.uint8), geometry),
                                geometry, None)


def assert_same_masks(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, mask in expected.items():
        np.testing.assert_array_equal(actual[name], mask, err_msg=name)


@pytest.fixture(scope="module", autouse=True)
def converters():
    register_segmentation_converters(slicer)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def node_classes(scene) -> list[str]:
    return sorted(scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes()))


def sh_item_count(scene) -> int:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return ids.GetNumberOfIds()


def matrix_of(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def sitk_image(array, geometry: Geometry):
    return geometry.image(array)


def ras_of_index(image, index_ijk) -> np.ndarray:
    """Independent reference: SimpleITK's physical (LPS) point, flipped to RAS."""
    lps = np.array(image.TransformIndexToPhysicalPoint(tuple(int(i) for i in index_ijk)))
    return lps * np.array([-1.0, -1.0, 1.0])


def segments_of(segmentation_node) -> list:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]


def terminology_of(segment) -> dict:
    value = vtk.mutable("")
    assert segment.GetTag(mrml.TERMINOLOGY_TAG, value)
    return slicerio_segmentation.terminology_entry_from_string(str(value))


def add_segment(segmentation_node, name, mask, geometry, terminology: dict | None = None):
    segment = slicer.vtkSegment()
    segment.SetName(name)
    if terminology is not None:
        segment.SetTag(mrml.TERMINOLOGY_TAG, slicerio_segmentation.terminology_entry_to_string(terminology))
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segment.AddRepresentation(labelmap, mrml._oriented_image(mask.astype(np.uint8), geometry))
    segmentation_node.GetSegmentation().AddSegment(segment)


def empty_segmentation(scene, geometry=GEOMETRY):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user segmentation")
    reference = mrml._oriented_image(np.zeros(geometry.shape, np.uint8), geometry)
    node.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(reference),
    )
    return node


# ---------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------


def test_ijk_to_ras_agrees_with_simpleitk_physical_points():
    image = sitk_image(np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY)
    matrix = mrml.ijk_to_ras(GEOMETRY)
    for index in [(0, 0, 0), (19, 0, 0), (0, 15, 0), (0, 0, 11), (7, 3, 9), (19, 15, 11)]:
        ras = (matrix @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(ras, ras_of_index(image, index), atol=1e-9)
    round_trip = mrml.geometry_from_ijk_to_ras(matrix, GEOMETRY.shape)
    assert round_trip.shape == GEOMETRY.shape
    np.testing.assert_allclose(round_trip.spacing, GEOMETRY.spacing)
    np.testing.assert_allclose(round_trip.origin, GEOMETRY.origin)
    np.testing.assert_allclose(round_trip.direction, GEOMETRY.direction, atol=1e-12)


def test_volume_node_geometry_values_display_and_marking(scene):
    ct = sample_ct()
    node = mrml.volume_node_from_array(scene, ct, GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction, "Synthetic CT")

    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetScene() is scene
    assert node.GetName() == "Synthetic CT"
    np.testing.assert_allclose(node.GetSpacing(), GEOMETRY.spacing)
    # RAS origin = LPS origin with x and y negated.
    np.testing.assert_allclose(node.GetOrigin(), (-31.0, 17.5, 42.0))
    np.testing.assert_allclose(matrix_of(node), mrml.ijk_to_ras(GEOMETRY), atol=1e-12)
    # Direction columns: i runs along LPS -y (= RAS +y), j along LPS +x (= RAS -x), k along S.
    np.testing.assert_allclose(matrix_of(node)[:3, :3], [[0, -1.25, 0], [0.8, 0, 0], [0, 0, 2.5]], atol=1e-12)

    image = node.GetImageData()
    assert image.GetDimensions() == (20, 16, 12)
    assert image.GetScalarType() == vtk.VTK_SHORT
    np.testing.assert_array_equal(mrml._array_of_image(image), ct)
    assert image.GetPointData().GetScalars().GetValue(0) == ct[0, 0, 0]

    display = node.GetDisplayNode()
    assert display.IsA("vtkMRMLScalarVolumeDisplayNode")
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == (1400.0, -500.0)  # Slicer's CT-Lung preset
    assert node.GetAttribute(mrml.SYNTHETIC_ATTRIBUTE) == "true"

    again = mrml.volume_node_from_array(scene, ct, GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction, "Synthetic CT")
    assert again.GetName() != node.GetName()  # unique names in the scene


def test_geometry_of_volume_node_inverts_volume_creation(scene):
    node = mrml.volume_node_from_array(
        scene, sample_ct(), GEOMETRY.spacing, GEOMETRY.origin, np.reshape(GEOMETRY.direction, (3, 3)), "ct"
    )
    geometry = mrml.geometry_of_volume_node(node)
    assert geometry.shape == GEOMETRY.shape
    np.testing.assert_allclose(geometry.spacing, GEOMETRY.spacing)
    np.testing.assert_allclose(geometry.origin, GEOMETRY.origin)
    np.testing.assert_allclose(geometry.direction, GEOMETRY.direction, atol=1e-12)


def test_volume_needs_a_3d_array(scene):
    with pytest.raises(ValueError, match="3D"):
        mrml.volume_node_from_array(scene, np.zeros((4, 4)), (1, 1, 1), (0, 0, 0), np.eye(3), "flat")


# ---------------------------------------------------------------------------------------
# Segmentations
# ---------------------------------------------------------------------------------------


def test_segmentation_has_one_segment_per_structure_with_name_color_terminology(scene):
    masks = overlapping_masks()
    volume = mrml.volume_node_from_array(scene, sample_ct(), GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction, "ct")
    node = mrml.segmentation_node_from_masks(scene, masks, GEOMETRY, volume, "anatomy")

    segments = segments_of(node)
    assert [s.GetName() for s in segments] == [s.display_name for s in LOBES]
    assert list(node.GetSegmentation().GetSegmentIDs()) == [s.name for s in LOBES]
    for segment, structure in zip(segments, LOBES, strict=True):
        np.testing.assert_allclose(segment.GetColor(), structure.color, atol=1e-6)
        assert terminology_of(segment) == structure.terminology()
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    assert node.GetAttribute(mrml.SYNTHETIC_ATTRIBUTE) == "true"
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume

    # Each segment holds exactly its mask: the lobe keeps the voxels the vessel runs through.
    for structure in LOBES:
        np.testing.assert_array_equal(segment_mask(node, structure.name), masks[structure.name], err_msg=structure.name)

    # Shown in 3D as closed surfaces (converter rules registered as Slicer does).
    assert node.GetSegmentation().ContainsRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    )
    assert node.GetDisplayNode().GetVisibility3D()
    polydata = vtk.vtkPolyData()
    node.GetClosedSurfaceRepresentation("left_upper_lobe", polydata)
    assert polydata.GetNumberOfPoints() > 0


def test_segmentation_keeps_empty_structures_and_works_without_reference_volume(scene):
    labels = np.zeros(GEOMETRY.shape, np.uint8)
    labels[2:5, 2:5, 2:5] = STRUCTURES["airway"].label
    node = segmentation_from_labels(scene, labels, "lobes")
    assert node.GetSegmentation().GetNumberOfSegments() == len(STRUCTURE_SETS["lobes"])
    assert not node.GetSegmentation().ContainsRepresentation("Closed surface")
    export = mrml.anatomy_from_segmentation_node(node)
    assert_same_masks(export.masks, masks_of(labels))


def test_segmentation_rejects_unknown_structures_and_wrong_shapes(scene):
    with pytest.raises(ValueError, match="spleen"):
        mrml.segmentation_node_from_masks(scene, {"spleen": np.zeros(GEOMETRY.shape, bool)}, GEOMETRY)
    with pytest.raises(ValueError, match="shape"):
        mrml.segmentation_node_from_masks(scene, masks_of(sample_labels()[:-1]), GEOMETRY)


def test_lung_structure_set_merges_lobes_into_lungs(scene):
    labels = sample_labels()
    node = segmentation_from_labels(scene, labels, "lungs", name="lungs")
    assert [s.GetName() for s in segments_of(node)] == ["left lung", "right lung", "airway", "vessels"]
    export = mrml.anatomy_from_segmentation_node(node, GEOMETRY)
    assert_same_masks(export.masks, {
        "left_lung": np.isin(labels, [1, 2]), "right_lung": np.isin(labels, [3, 4, 5]),
        "airway": labels == 6, "vessels": labels == 7,
    })


# Which of Slicer's terminology contexts lists each MedSyn type code, read from Slicer's
# Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-*.json (v5.6.2, v5.8.1,
# main): the General Anatomy list has the lobes (45653009, 90572001, 72481006) and the lung
# (39607008) but neither 89187006 (airway) nor 59820001 (blood vessel); the DICOM master list has
# both, under category 123037004 "Anatomical Structure". (Not vendored: re-read them on a change.)
CONTEXT_OF_TYPE = {
    "45653009": SLICER_CATEGORY_CONTEXT, "90572001": SLICER_CATEGORY_CONTEXT, "72481006": SLICER_CATEGORY_CONTEXT,
    "39607008": SLICER_CATEGORY_CONTEXT,
    "89187006": "Segmentation category and type - DICOM master list",
    "59820001": "Segmentation category and type - DICOM master list",
}  # fmt: skip


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_each_segment_names_a_terminology_context_that_lists_its_code(scene, name):
    structure = STRUCTURES[name]
    node = mrml.segmentation_node_from_masks(scene, {name: np.zeros(GEOMETRY.shape, bool)}, GEOMETRY)
    terminology = terminology_of(segments_of(node)[0])
    assert terminology["contextName"] == CONTEXT_OF_TYPE[structure.snomed_type[1]]
    assert terminology["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert terminology["type"][:2] == list(structure.snomed_type[:2])
    assert mrml.structure_for_segment(segments_of(node)[0]) == name  # and it is still recognised


# ---------------------------------------------------------------------------------------
# Segmentation -> label map (conditioning)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference_kind", ["volume", "geometry", "own"])
def test_anatomy_round_trips_through_a_segmentation_node_with_overlaps(scene, reference_kind):
    masks = overlapping_masks()
    volume = mrml.volume_node_from_array(scene, sample_ct(), GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction, "ct")
    node = mrml.segmentation_node_from_masks(scene, masks, GEOMETRY, volume, "anatomy", show_3d=False)
    reference = {"volume": volume, "geometry": GEOMETRY, "own": None}[reference_kind]

    export = mrml.anatomy_from_segmentation_node(node, reference)

    assert_same_masks(export.masks, masks)
    assert export.geometry.shape == GEOMETRY.shape
    np.testing.assert_allclose(export.geometry.origin, GEOMETRY.origin, atol=1e-9)
    np.testing.assert_allclose(export.geometry.spacing, GEOMETRY.spacing, atol=1e-9)
    np.testing.assert_allclose(export.geometry.direction, GEOMETRY.direction, atol=1e-9)
    assert export.used == {s.display_name: s.name for s in LOBES}
    assert export.ignored == ()


def test_anatomy_export_onto_a_sub_grid_and_to_the_file_the_library_reads(scene, tmp_path):
    masks = overlapping_masks()
    node = mrml.segmentation_node_from_masks(scene, masks, GEOMETRY, None, "anatomy", show_3d=False)
    # A reference grid covering voxels [2:10, 3:13, 4:18] of the original.
    full = sitk_image(np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY)
    sub = Geometry((8, 10, 14), GEOMETRY.spacing, full.TransformIndexToPhysicalPoint((4, 3, 2)), GEOMETRY.direction)
    cropped = {name: mask[2:10, 3:13, 4:18] for name, mask in masks.items()}

    export = mrml.anatomy_from_segmentation_node(node, sub)
    assert_same_masks(export.masks, cropped)

    written = export.write(tmp_path / "anatomy-input.seg.nrrd")
    stored, geometry = mrml._read_segmentation(written)  # whole masks: the lobe keeps the vessel's voxels
    assert_same_masks(stored, cropped)
    np.testing.assert_allclose(geometry.origin, sub.origin, atol=1e-4)
    np.testing.assert_allclose(geometry.direction, sub.direction, atol=1e-6)
    # MedSynLib.generate --anatomy reads it by segment name, on that grid.
    given, given_geometry = read_anatomy(written, STRUCTURE_SETS["lobes"])
    assert set(given) == {name for name, mask in cropped.items() if mask.any()}  # (the vessel is outside)
    np.testing.assert_array_equal(given["airway"], cropped["airway"])
    np.testing.assert_allclose(given_geometry.origin, sub.origin, atol=1e-4)


def test_anatomy_export_applies_the_parent_transform(scene):
    labels = sample_labels()
    node = segmentation_from_labels(scene, labels)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(2, 3, 2 * GEOMETRY.spacing[2])  # two slices towards superior
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())

    export = mrml.anatomy_from_segmentation_node(node, GEOMETRY)
    for name, mask in masks_of(labels).items():
        np.testing.assert_array_equal(export.masks[name][2:], mask[:-2], err_msg=name)
        assert not export.masks[name][:2].any()


@pytest.mark.parametrize(
    ("name", "structure"),
    [
        ("left upper lobe", "left_upper_lobe"),
        ("Left Upper Lobe", "left_upper_lobe"),
        ("left_upper_lobe", "left_upper_lobe"),
        ("lung_upper_lobe_left", "left_upper_lobe"),  # TotalSegmentator
        ("Left upper lobe of lung", "left_upper_lobe"),
        ("LUL", "left_upper_lobe"),
        ("lung_lower_lobe_left", "left_lower_lobe"),
        ("lung_upper_lobe_right", "right_upper_lobe"),
        ("lung_middle_lobe_right", "right_middle_lobe"),
        ("Right-Middle-Lobe", "right_middle_lobe"),
        ("lung_lower_lobe_right", "right_lower_lobe"),
        ("lung_trachea_bronchia", "airway"),  # TotalSegmentator lung_vessels task
        ("Airways", "airway"),
        ("lung_vessels", "vessels"),  # TotalSegmentator lung_vessels task
        ("Pulmonary vessels", "vessels"),
        ("left lung", "left_lung"),
        ("lung_left", "left_lung"),
        ("Right Lung", "right_lung"),
        ("lung", None),
        ("liver", None),
        ("Segment_1", None),
        ("upper lobe", None),
        ("", None),
    ],
)
def test_segments_map_to_structures_by_name(name, structure):
    segment = slicer.vtkSegment()
    segment.SetName(name)
    assert mrml.structure_for_segment(segment) == structure


def test_terminology_comes_before_the_name():
    segment = slicer.vtkSegment()
    segment.SetName("left upper lobe")
    segment.SetTag(mrml.TERMINOLOGY_TAG, mrml.terminology_string(STRUCTURES["right_lower_lobe"]))
    assert mrml.structure_for_segment(segment) == "right_lower_lobe"

    unnamed = slicer.vtkSegment()
    unnamed.SetName("Segment_1")
    unnamed.SetTag(mrml.TERMINOLOGY_TAG, mrml.terminology_string(STRUCTURES["left_lung"]))
    assert mrml.structure_for_segment(unnamed) == "left_lung"

    # A lung without a side in its terminology is ambiguous: the name decides.
    generic = slicer.vtkSegment()
    generic.SetName("lung_right")
    generic.SetTag(mrml.TERMINOLOGY_TAG, slicerio_segmentation.terminology_entry_to_string({
        "contextName": "x", "category": ["SCT", "123037004", "Anatomical Structure"],
        "type": ["SCT", "39607008", "Lung"],
    }))
    assert mrml.structure_for_segment(generic) == "right_lung"

    broken = slicer.vtkSegment()
    broken.SetName("vessels")
    broken.SetTag(mrml.TERMINOLOGY_TAG, "not a terminology")
    assert mrml.structure_for_segment(broken) == "vessels"


# SlicerTotalSegmentator's lung, airway and vessel rows (Resources/totalsegmentator_snomed_mapping.csv):
# class name, type, type modifier, anatomic region, the standard segment name it sets, and the
# MedSyn structure. Lobe and lung names come from Slicer's DICOM list, the others from its own.
_TS_LEFT, _TS_RIGHT, _TS_LUNG = "SCT^7771000^Left", "SCT^24028007^Right", "SCT^39607008^Lung"
TOTALSEGMENTATOR_SEGMENTS = [
    ("lung_upper_lobe_left", "SCT^45653009^Upper lobe of lung", _TS_LEFT, "", "left upper lobe of lung",
     "left_upper_lobe"),
    ("lung_lower_lobe_left", "SCT^90572001^Lower lobe of lung", _TS_LEFT, "", "left lower lobe of lung",
     "left_lower_lobe"),
    ("lung_upper_lobe_right", "SCT^45653009^Upper lobe of lung", _TS_RIGHT, "", "right upper lobe of lung",
     "right_upper_lobe"),
    ("lung_middle_lobe_right", "SCT^72481006^Middle lobe of right lung", "", "", "middle lobe of right lung",
     "right_middle_lobe"),
    ("lung_lower_lobe_right", "SCT^90572001^Lower lobe of lung", _TS_RIGHT, "", "right lower lobe of lung",
     "right_lower_lobe"),
    ("lung_left", "SCT^39607008^Lung", _TS_LEFT, "", "left lung", "left_lung"),
    ("lung_right", "SCT^39607008^Lung", _TS_RIGHT, "", "right lung", "right_lung"),
    ("lung_trachea_bronchia", "SCT^110726009^Trachea and bronchus", "", "", "trachea and bronchus", "airway"),
    ("lung_airways", "SCT^110726009^Trachea and bronchus", "", "", "trachea and bronchus", "airway"),
    ("lung_vessels", "SCT^59820001^Blood vessel", "", _TS_LUNG, "blood vessel", "vessels"),
    # Not MedSyn structures: both lungs in one, the trachea alone, the airway wall, the central
    # pulmonary artery and vein, and vessels of another organ.
    ("lung", "SCT^39607008^Lung", "", "", "lung", None),
    ("trachea", "SCT^44567001^Trachea", "", "", "trachea", None),
    ("lung_airways_wall", "SCT^955009^Bronchus", "", "", "airway wall", None),
    ("pulmonary_artery", "SCT^81040000^Pulmonary artery", "", "", "pulmonary artery", None),
    ("pulmonary_vein", "SCT^122972007^Pulmonary vein", "", "", "pulmonary vein", None),
    ("liver_vessels", "SCT^59820001^Blood vessel", "", "SCT^10200004^Liver", "blood vessel", None),
]


def _totalsegmentator_terminology(kind: str, modifier: str, region: str) -> str:
    """The tag SlicerTotalSegmentator writes (loadTotalSegmentatorLabelTerminology)."""
    context = "Total Segmentator" if kind.split("^")[1] in {"110726009", "59820001", "955009"} else "DICOM master list"
    return (f"Segmentation category and type - {context}~SCT^123037004^Anatomical Structure~{kind}~"
            f"{modifier or '^^'}~Anatomic codes - DICOM master list~{region or '^^'}~^^|")


@pytest.mark.parametrize(("class_name", "kind", "modifier", "region", "standard_name", "structure"),
                         TOTALSEGMENTATOR_SEGMENTS, ids=[row[0] for row in TOTALSEGMENTATOR_SEGMENTS])
@pytest.mark.parametrize("named", ["class name", "standard name", "name only"])
def test_totalsegmentator_segments_map_by_code_and_by_name(class_name, kind, modifier, region, standard_name,
                                                           structure, named):
    segment = slicer.vtkSegment()
    segment.SetName(class_name if named == "class name" else standard_name)
    if named != "name only":
        segment.SetTag(mrml.TERMINOLOGY_TAG, _totalsegmentator_terminology(kind, modifier, region))
    expected = structure
    if named == "name only" and class_name == "liver_vessels":
        expected = "vessels"  # without its terminology, "blood vessel" cannot say which organ
    assert mrml.structure_for_segment(segment) == expected


def test_totalsegmentator_style_segmentation_exports(scene):
    labels = sample_labels()
    node = empty_segmentation(scene)
    names = {
        "lung_upper_lobe_left": 1, "lung_lower_lobe_left": 2, "lung_upper_lobe_right": 3,
        "lung_middle_lobe_right": 4, "lung_lower_lobe_right": 5, "lung_trachea_bronchia": 6, "lung_vessels": 7,
    }  # fmt: skip
    for name, label in names.items():
        add_segment(node, name, labels == label, GEOMETRY)
    add_segment(node, "liver", labels == 0, GEOMETRY)  # a segment MedSyn has no use for

    export = mrml.anatomy_from_segmentation_node(node)
    assert_same_masks(export.masks, masks_of(labels))
    assert export.ignored == ("liver",)
    assert export.used["lung_vessels"] == "vessels"


def test_segments_of_one_structure_are_merged_and_overlaps_kept(scene):
    node = empty_segmentation(scene)
    a = np.zeros(GEOMETRY.shape, bool)
    a[1:4, 1:4, 1:4] = True
    b = np.zeros(GEOMETRY.shape, bool)
    b[6:9, 6:9, 6:9] = True
    vessel = np.zeros(GEOMETRY.shape, bool)
    vessel[2, 2, :] = True
    add_segment(node, "left lung", a, GEOMETRY)
    add_segment(node, "Segment_2", b, GEOMETRY, STRUCTURES["left_lung"].terminology())
    add_segment(node, "vessels", vessel, GEOMETRY)

    masks = mrml.anatomy_from_segmentation_node(node).masks
    assert_same_masks(masks, {"left_lung": a | b, "vessels": vessel})  # the lung keeps the vessel's voxels


def test_unusable_segmentations_raise_clear_errors(scene):
    node = empty_segmentation(scene)
    with pytest.raises(ValueError, match="no segment"):
        mrml.anatomy_from_segmentation_node(node)
    add_segment(node, "liver", sample_labels() > 0, GEOMETRY)
    add_segment(node, "spleen", sample_labels() > 3, GEOMETRY)
    with pytest.raises(ValueError, match=r"no segment .* matches.*liver.*spleen"):
        mrml.anatomy_from_segmentation_node(node)
    add_segment(node, "left upper lobe", np.zeros(GEOMETRY.shape, bool), GEOMETRY)
    with pytest.raises(ValueError, match="empty"):
        mrml.anatomy_from_segmentation_node(node)


# ---------------------------------------------------------------------------------------
# Subject hierarchy
# ---------------------------------------------------------------------------------------


def test_volume_and_segmentation_share_one_folder_with_the_report(scene):
    volume = mrml.volume_node_from_array(scene, sample_ct(), GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction, "ct")
    segmentation = segmentation_from_labels(scene, sample_labels(), volume=volume, name="seg")
    report = "Severe emphysema in both upper lobes."
    folder = mrml.place_in_subject_hierarchy(scene, volume, segmentation, "MedSyn synthetic: test", report,
                                             {"seed": 3, "steps": 2})

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemName(folder) == "MedSyn synthetic: test"
    assert sh.GetItemParent(folder) == sh.GetSceneItemID()
    children = vtk.vtkIdList()
    sh.GetItemChildren(folder, children)
    assert [sh.GetItemDataNode(children.GetId(i)) for i in range(children.GetNumberOfIds())] == [volume, segmentation]
    assert sh.GetItemAttribute(folder, mrml.REPORT_ATTRIBUTE) == report
    assert sh.GetItemAttribute(folder, mrml.SYNTHETIC_ATTRIBUTE) == "true"
    assert json.loads(sh.GetItemAttribute(folder, mrml.PARAMETERS_ATTRIBUTE)) == {"seed": 3, "steps": 2}
    assert volume.GetAttribute(mrml.REPORT_ATTRIBUTE) == report

    # Nodes that already have items (as in Slicer) are moved, not duplicated.
    other = mrml.place_in_subject_hierarchy(scene, volume, None, "second", report, {})
    assert sh.GetItemParent(sh.GetItemByDataNode(volume)) == other
    assert sh.GetItemParent(sh.GetItemByDataNode(segmentation)) == folder


def test_result_names_use_the_report_and_seed():
    volume, segmentation, folder = mrml.result_names("Severe centrilobular emphysema, both upper lobes.", 42)
    assert volume == "Synthetic CT: Severe centrilobular emphysema both (seed 42)"  # at most 40 characters
    assert segmentation.startswith("Synthetic anatomy: Severe") and segmentation.endswith("(seed 42)")
    assert folder.startswith("MedSyn synthetic: ")
    assert mrml.result_names("   ", 1)[0] == "Synthetic CT: report (seed 1)"


# ---------------------------------------------------------------------------------------
# MRML storage round trip into a fresh scene
# ---------------------------------------------------------------------------------------


def test_storage_round_trip_into_a_fresh_scene(scene, tmp_path):
    labels, ct = sample_labels(), sample_ct()
    volume = mrml.volume_node_from_array(scene, ct, GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction, "ct")
    segmentation = segmentation_from_labels(scene, labels, volume=volume, name="seg", show_3d=True)
    for node, storage_class, name in (
        (volume, "vtkMRMLVolumeArchetypeStorageNode", "ct.nrrd"),
        (segmentation, "vtkMRMLSegmentationStorageNode", "anatomy.seg.nrrd"),
    ):
        storage = scene.AddNewNodeByClass(storage_class)
        storage.SetFileName(str(tmp_path / name))
        assert storage.WriteData(node), name

    fresh = slicer.vtkMRMLScene()
    volume2 = fresh.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    reader = fresh.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    reader.SetFileName(str(tmp_path / "ct.nrrd"))
    assert reader.ReadData(volume2)
    segmentation2 = fresh.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    reader = fresh.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(tmp_path / "anatomy.seg.nrrd"))
    assert reader.ReadData(segmentation2)

    np.testing.assert_allclose(matrix_of(volume2), matrix_of(volume), atol=1e-9)
    np.testing.assert_array_equal(mrml._array_of_image(volume2.GetImageData()), ct)
    for before, after in zip(segments_of(segmentation), segments_of(segmentation2), strict=True):
        assert after.GetName() == before.GetName()
        np.testing.assert_allclose(after.GetColor(), before.GetColor(), atol=1e-6)
        assert terminology_of(after) == terminology_of(before)
    assert_same_masks(mrml.anatomy_from_segmentation_node(segmentation2, volume2).masks, masks_of(labels))

    # Read independently of MRML: slicerio sees what anatomy.py defines.
    stored = slicerio_segmentation.read_segmentation(str(tmp_path / "anatomy.seg.nrrd"))
    for segment, structure in zip(stored["segments"], LOBES, strict=True):
        assert segment["name"] == structure.display_name
        assert segment["terminology"] == structure.terminology()
        np.testing.assert_allclose(segment["color"], structure.color, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Whole result folders
# ---------------------------------------------------------------------------------------

REPORT = "Severe centrilobular emphysema in both upper lobes."


def write_result(folder: Path, *, masks=None, metadata=None) -> Path:
    """A result folder as MedSynLib.generate writes it (its anatomy.seg.nrrd with its own writer)."""
    folder.mkdir(parents=True, exist_ok=True)
    masks = overlapping_masks() if masks is None else masks
    sitk.WriteImage(GEOMETRY.image(sample_ct()), str(folder / "ct.nii.gz"))
    write_segmentation(folder / "anatomy.seg.nrrd", masks, GEOMETRY)
    metadata = metadata or {
        "report": REPORT, "seed": 42, "model": "tiny", "steps": {"stage1": 2, "stage2": 2}, "guidance": 3.0,
        "synthetic": True, "structures": list(masks), "timings": {"total_s": 1.0},
        "versions": {"medsyn": "0.1.0"},
    }  # fmt: skip
    (folder / "generation.json").write_text(json.dumps(metadata), encoding="utf-8")
    return folder


def test_load_generation_result_builds_marked_nodes(scene, tmp_path):
    result = mrml.load_generation_result(scene, write_result(tmp_path / "result"), parameters={"device": "cpu"})

    volume, segmentation = result.volume_node, result.segmentation_node
    assert volume.GetName() == "Synthetic CT: Severe centrilobular emphysema in both (seed 42)"
    assert segmentation.GetName() == "Synthetic anatomy: Severe centrilobular emphysema in both (seed 42)"
    ct_file = sitk.ReadImage(str(tmp_path / "result" / "ct.nii.gz"))
    for index in [(0, 0, 0), (19, 15, 11), (5, 7, 3)]:
        ras = (matrix_of(volume) @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(ras, ras_of_index(ct_file, index), atol=1e-4)
    np.testing.assert_array_equal(mrml._array_of_image(volume.GetImageData()), sitk.GetArrayFromImage(ct_file))
    assert [s.GetName() for s in segments_of(segmentation)] == [s.display_name for s in LOBES]

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = result.folder_item
    assert sh.GetItemName(folder) == "MedSyn synthetic: Severe centrilobular emphysema in both (seed 42)"
    assert sh.GetItemParent(sh.GetItemByDataNode(volume)) == folder
    assert sh.GetItemParent(sh.GetItemByDataNode(segmentation)) == folder
    assert sh.GetItemAttribute(folder, mrml.REPORT_ATTRIBUTE) == REPORT
    recorded = json.loads(sh.GetItemAttribute(folder, mrml.PARAMETERS_ATTRIBUTE))
    assert recorded["seed"] == 42 and recorded["synthetic"] is True and recorded["request"] == {"device": "cpu"}
    assert result.metadata["report"] == REPORT


def test_imported_lobes_have_no_holes_where_vessels_run_through_them(scene, tmp_path):
    """What Slicer shows is what the model generated: anatomy.nii.gz (one label per voxel) would
    punch the vessel out of the lobe; anatomy.seg.nrrd keeps both whole."""
    masks = overlapping_masks()
    result = mrml.load_generation_result(scene, write_result(tmp_path / "result", masks=masks), show_3d=False)
    node = result.segmentation_node
    for name, mask in masks.items():
        np.testing.assert_array_equal(segment_mask(node, name), mask, err_msg=name)
    assert (segment_mask(node, "left_upper_lobe") & segment_mask(node, "vessels")).any()


def test_load_result_fills_in_structures_the_file_lacks(scene, tmp_path):
    masks = {name: mask for name, mask in masks_of(sample_labels(), "lungs").items() if name != "airway"}
    metadata = {"report": "x", "seed": 1, "structures": list(STRUCTURE_SETS["lungs"])}
    result = mrml.load_generation_result(scene, write_result(tmp_path / "r", masks=masks, metadata=metadata),
                                         show_3d=False)
    assert [s.GetName() for s in segments_of(result.segmentation_node)] == ["left lung", "right lung", "airway", "vessels"]
    assert not segment_mask(result.segmentation_node, "airway").any()


def _drop(name):
    def damage(folder: Path):
        (folder / name).unlink()

    return damage


def _write(name, content: bytes):
    def damage(folder: Path):
        (folder / name).write_bytes(content)

    return damage


def _metadata(**changes):
    def damage(folder: Path):
        metadata = json.loads((folder / "generation.json").read_text())
        metadata.update(changes)
        metadata = {k: v for k, v in metadata.items() if v is not None}
        (folder / "generation.json").write_text(json.dumps(metadata))

    return damage


def _other_anatomy_grid(folder: Path):
    moved = Geometry(GEOMETRY.shape, GEOMETRY.spacing, (0.0, 0.0, 0.0), GEOMETRY.direction)
    write_segmentation(folder / "anatomy.seg.nrrd", overlapping_masks(), moved)


def _foreign_segment(folder: Path):
    write_segmentation(folder / "anatomy.seg.nrrd", {**overlapping_masks(), "left_lung": np.ones(GEOMETRY.shape, bool)},
                       GEOMETRY)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop("ct.nii.gz"), "lacks ct.nii.gz"),
        (_drop("anatomy.seg.nrrd"), "lacks anatomy.seg.nrrd"),
        (_write("anatomy.seg.nrrd", b"NRRD0004\nbroken"), "cannot read"),
        (_drop("generation.json"), "lacks generation.json"),
        (_write("generation.json", b'{"report": "x", "seed": '), "not valid JSON"),
        (_write("generation.json", b"[1, 2]"), "JSON object"),
        (_write("generation.json", b"\xff\xfe\x00garbage"), "not valid JSON"),
        (_write("ct.nii.gz", b"this is not a NIfTI file"), "cannot read"),
        (_metadata(structures=None), "structures"),
        (_metadata(seed=None), "seed"),
        (_metadata(structures=["left_upper_lobe", "spleen"]), "spleen"),
        (_other_anatomy_grid, "not on the grid"),
        (_foreign_segment, "left_lung"),
    ],
)
def test_broken_result_folder_raises_and_leaves_the_scene_alone(scene, tmp_path, damage, message):
    mrml.volume_node_from_array(scene, sample_ct(), GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction, "existing")
    before_items = sh_item_count(scene)  # (makes the subject hierarchy node, as Slicer always has one)
    before_nodes = node_classes(scene)
    folder = write_result(tmp_path / "result")
    damage(folder)
    with pytest.raises(mrml.GenerationResultError, match=message):
        mrml.load_generation_result(scene, folder)
    assert node_classes(scene) == before_nodes
    assert sh_item_count(scene) == before_items


def test_missing_result_folder_raises(scene, tmp_path):
    with pytest.raises(mrml.GenerationResultError, match="no result folder"):
        mrml.load_generation_result(scene, tmp_path / "nothing")
    assert scene.GetNumberOfNodes() == 0


def test_failure_while_building_nodes_removes_the_nodes_made_so_far(scene, tmp_path, monkeypatch):
    before_items = sh_item_count(scene)
    before_nodes = node_classes(scene)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while building segments")

    monkeypatch.setattr(mrml, "segmentation_node_from_masks", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        mrml.load_generation_result(scene, write_result(tmp_path / "result"))
    assert node_classes(scene) == before_nodes
    assert sh_item_count(scene) == before_items


# ---------------------------------------------------------------------------------------
# A whole generation: process -> result folder -> nodes (stand-in generator)
# ---------------------------------------------------------------------------------------


def test_run_generation_end_to_end_with_a_stand_in_generator(scene, tmp_path):
    calls, events = [], []
    request = GenerationRequest(REPORT, seed=9, steps=2, model_dir=str(tmp_path))
    result = runner.run_generation(
        scene, request, launcher=fake_launcher(write_fake_generator(tmp_path), calls), on_event=events.append
    )
    assert events[-1].kind.value == "done"
    assert result.volume_node.GetScene() is scene and result.segmentation_node.GetScene() is scene
    assert result.volume_node.GetName().endswith("(seed 9)")
    assert result.segmentation_node.GetSegmentation().GetNumberOfSegments() == 7
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    recorded = json.loads(sh.GetItemAttribute(result.folder_item, mrml.PARAMETERS_ATTRIBUTE))
    assert recorded["request"]["seed"] == 9 and recorded["request"]["model"] == str(tmp_path)
    work_dir = Path(calls[0]["args"][calls[0]["args"].index("--out") + 1]).parent
    assert not work_dir.exists()  # the work folder is cleaned up


def test_run_generation_sends_the_conditioning_segmentation_whole(scene, tmp_path):
    """The --anatomy file is a .seg.nrrd with whole masks: a label map would have cut the
    vessel out of the lobe before the generator saw it."""
    masks = overlapping_masks()
    user = mrml.segmentation_node_from_masks(scene, masks, GEOMETRY, None, "user anatomy", show_3d=False)
    calls, sent = [], {}

    def launcher(args, environment, cwd):  # reads the file before the job's folder is removed
        anatomy = Path(args[args.index("--anatomy") + 1])
        sent["name"], (sent["masks"], _) = anatomy.name, mrml._read_segmentation(anatomy)
        return fake_launcher(write_fake_generator(tmp_path), calls)(args, environment, cwd)

    result = runner.run_generation(scene, GenerationRequest(REPORT, seed=3, model_dir=str(tmp_path)),
                                   conditioning_segmentation=user, launcher=launcher, show_3d=False)
    assert sent["name"] == "anatomy-input.seg.nrrd"
    assert_same_masks(sent["masks"], masks)
    # The stand-in returns its results on the grid of the --anatomy file, as the library does.
    np.testing.assert_allclose(matrix_of(result.volume_node), mrml.ijk_to_ras(GEOMETRY), atol=1e-4)
    assert_same_masks(mrml.anatomy_from_segmentation_node(result.segmentation_node, result.volume_node).masks, masks)


@pytest.mark.parametrize(("mode", "message"), [("error", "the report is too short"), ("crash", "exit code 1")])
def test_failed_generation_adds_nothing(scene, tmp_path, mode, message):
    before = node_classes(scene)
    with pytest.raises(runner.GenerationFailed, match=message):
        runner.run_generation(scene, GenerationRequest(REPORT, seed=3, model_dir=str(tmp_path)),
                              launcher=fake_launcher(write_fake_generator(tmp_path), mode=mode))
    assert node_classes(scene) == before


def test_unusable_conditioning_fails_before_any_process(scene, tmp_path):
    node = empty_segmentation(scene)
    add_segment(node, "liver", sample_labels() > 0, GEOMETRY)
    calls = []
    with pytest.raises(ValueError, match="no segment"):
        runner.run_generation(scene, GenerationRequest(REPORT, seed=3, model_dir=str(tmp_path)),
                              conditioning_segmentation=node, launcher=fake_launcher(Path("unused"), calls))
    assert calls == []


MEDSYN_CLI_PRESENT = all(
    importlib.util.find_spec(name) is not None for name in ("torch", "MedSynLib.generate", "MedSynLib.init_model")
)


@pytest.fixture(scope="module")
def tiny_cli_model(tmp_path_factory):
    if not MEDSYN_CLI_PRESENT:
        pytest.skip("needs torch and MedSynLib.generate / MedSynLib.init_model")
    from MedSynSlicerLib import job

    model = tmp_path_factory.mktemp("tiny-model") / "model"
    subprocess.run(
        [sys.executable, "-m", "MedSynLib.init_model", "--preset", "tiny", "--out", str(model)],
        check=True, cwd=str(job.library_root()), env={**os.environ, **job.child_environment()},
        capture_output=True, text=True, timeout=300,
    )
    return model


def test_run_generation_with_the_real_library_and_a_tiny_model(scene, tiny_cli_model):
    model = tiny_cli_model
    events = []
    result = runner.run_generation(
        scene, GenerationRequest(REPORT, seed=5, steps=2, model_dir=str(model), device="cpu"),
        python_executable=sys.executable, on_event=events.append, show_3d=False,
    )
    kinds = {e.kind.value for e in events}
    assert {"progress", "done"} <= kinds, [e.describe() for e in events]
    ct = mrml._array_of_image(result.volume_node.GetImageData())
    assert ct.ndim == 3 and ct.min() >= -1024 and ct.max() <= 600
    assert result.segmentation_node.GetSegmentation().GetNumberOfSegments() >= 1
    assert result.volume_node.GetAttribute(mrml.SYNTHETIC_ATTRIBUTE) == "true"


def test_conditioning_gives_the_same_result_whatever_order_the_reference_stores_voxels_in(scene, tiny_cli_model):
    # Slicer volumes often have negative direction cosines (IJK -> RAS identity is LPS diag(-1, -1, 1)):
    # the library must run the network on an LPS grid, so the freely drawn CT does not mirror.
    lps = Geometry(shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0), origin=(-15.0, -15.0, -15.0))
    stored = Geometry(shape=lps.shape, spacing=lps.spacing, origin=(15.0, 15.0, -15.0),
                      direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # x and y reversed
    labels = sample_labels((16, 16, 16))
    cts = {}
    for name, geometry, array in (("lps", lps, labels), ("reversed", stored, labels[:, ::-1, ::-1].copy())):
        user = mrml.segmentation_node_from_masks(scene, masks_of(array), geometry, None, f"user {name}", show_3d=False)
        result = runner.run_generation(
            scene, GenerationRequest(REPORT, seed=4, steps=2, model_dir=str(tiny_cli_model), device="cpu"),
            conditioning_segmentation=user, reference=geometry, python_executable=sys.executable, show_3d=False,
        )
        np.testing.assert_allclose(matrix_of(result.volume_node), mrml.ijk_to_ras(geometry), atol=1e-4)
        cts[name] = mrml._array_of_image(result.volume_node.GetImageData()).astype(int)
    assert np.abs(cts["reversed"][:, ::-1, ::-1] - cts["lps"]).max() <= 1
