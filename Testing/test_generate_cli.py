"""`python -m MedSynLib.generate` end to end, its files, and every bad input it must refuse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from MedSynLib.anatomy import STRUCTURES
from MedSynLib.cli.generate import main
from MedSynLib.errors import run_command

REPORT = "Moderate right pleural effusion. Heart size is normal."


def generate(*args):
    return run_command(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def result_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "case"
    assert generate("--model", tiny_model_dir, "--report", REPORT, "--out", out, "--seed", 5, "--progress", "none") == 0
    return out


def test_result_folder_holds_every_file_marked_synthetic(result_dir, tiny_pipeline):
    assert sorted(p.name for p in result_dir.iterdir()) == [
        "anatomy.nii.gz", "anatomy.seg.nrrd", "ct.nii.gz", "generation.json", "preview.png"]
    ct = sitk.ReadImage(str(result_dir / "ct.nii.gz"))
    assert ct.GetPixelID() == sitk.sitkInt16 and ct.GetSize() == (32, 32, 32)
    assert ct.GetSpacing() == pytest.approx(tiny_pipeline.config.spacing_mm)
    assert "SYNTHETIC" in ct.GetMetaData("descrip")
    labels = sitk.ReadImage(str(result_dir / "anatomy.nii.gz"))
    assert labels.GetOrigin() == pytest.approx(ct.GetOrigin()) and "SYNTHETIC" in labels.GetMetaData("descrip")
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0} | {s.label for s in STRUCTURES.values()}
    metadata = json.loads((result_dir / "generation.json").read_text())
    assert metadata["synthetic"] is True and metadata["report"] == REPORT and metadata["seed"] == 5
    assert metadata["steps"] == {"stage1": 4, "stage2": 4} and metadata["versions"]["medsyn"]
    assert set(metadata["timings"]) == {"text_encoder_s", "stage1_s", "stage2_s"}


def test_segmentation_round_trips_through_slicerio(result_dir, tiny_pipeline):
    segmentation = slicerio.read_segmentation(str(result_dir / "anatomy.seg.nrrd"))
    by_id = {s["id"]: s for s in segmentation["segments"]}
    assert list(by_id) == list(tiny_pipeline.config.structures)
    for name, segment in by_id.items():
        structure = STRUCTURES[name]
        assert segment["name"] == structure.display_name
        assert segment["color"] == pytest.approx(structure.color, abs=1e-4)
        assert segment["terminology"]["type"] == list(structure.snomed_type)
    ct = sitk.ReadImage(str(result_dir / "ct.nii.gz"))
    assert np.asarray(segmentation["ijkToLPS"])[:3, 3] == pytest.approx(ct.GetOrigin())
    # Voxels agree with the label map (structures drawn over each other in the same priority).
    label_map = sitk.GetArrayFromImage(sitk.ReadImage(str(result_dir / "anatomy.nii.gz")))
    airway = slicerio.segment_mask(segmentation, by_id["airway"]).transpose(2, 1, 0)
    assert np.array_equal(airway & (label_map != STRUCTURES["vessels"].label), label_map == STRUCTURES["airway"].label)


def test_segmentation_names_a_terminology_context_that_lists_each_code(result_dir):
    """Slicer looks a type code up in the context an entry names: the General Anatomy list has the
    lobes and lungs, not the airway (89187006) or blood vessels (59820001), which the DICOM master list has."""
    segmentation = slicerio.read_segmentation(str(result_dir / "anatomy.seg.nrrd"))
    contexts = {s["terminology"]["type"][1]: s["terminology"]["contextName"] for s in segmentation["segments"]}
    master, general = "Segmentation category and type - DICOM master list", \
        "Segmentation category and type - 3D Slicer General Anatomy list"
    assert contexts.pop("89187006") == master and contexts.pop("59820001") == master
    assert set(contexts.values()) == {general}


def test_a_segmentation_conditions_with_its_overlaps_kept(tmp_path):
    """A vessel drawn inside a lobe stays in the lobe: the .seg.nrrd is read as whole masks, not
    flattened into a label map where the vessel would cut a hole in the lobe."""
    from MedSynLib.geometry import Geometry
    from MedSynLib.io.volumes import read_anatomy, write_segmentation

    lobe = np.zeros((8, 8, 8), dtype=bool)
    lobe[1:7, 1:7, 1:4] = True
    vessels = np.zeros_like(lobe)
    vessels[3:5, 3:5, 2:6] = True  # half inside the lobe
    path = tmp_path / "given.seg.nrrd"
    write_segmentation(path, {"left_upper_lobe": lobe, "vessels": vessels}, Geometry((8, 8, 8), (2.0, 2.0, 2.0)))
    masks, geometry = read_anatomy(path, ("left_upper_lobe", "vessels", "left_lung"))
    assert np.array_equal(masks["left_upper_lobe"], lobe) and np.array_equal(masks["vessels"], vessels)
    assert np.array_equal(masks["left_lung"], lobe)  # a lung-level model gets the union of its lobes
    assert geometry.matches(Geometry((8, 8, 8), (2.0, 2.0, 2.0)))


def test_anatomy_file_conditions_the_result_on_its_grid(result_dir, tmp_path, tiny_model_dir):
    # Use a previous result's label map, on a coarser grid of its own: it must come back on that grid.
    labels = sitk.ReadImage(str(result_dir / "anatomy.nii.gz"))
    coarse = sitk.Resample(labels, [24, 24, 24], sitk.Transform(), sitk.sitkNearestNeighbor, labels.GetOrigin(),
                           [s * 32 / 24 for s in labels.GetSpacing()], labels.GetDirection(), 0, labels.GetPixelID())
    sitk.WriteImage(coarse, str(tmp_path / "given.nrrd"))
    out = tmp_path / "conditioned"
    assert generate("--model", tiny_model_dir, "--report", REPORT, "--out", out, "--anatomy", tmp_path / "given.nrrd",
                    "--progress", "none") == 0
    result = sitk.ReadImage(str(out / "anatomy.nii.gz"))
    assert result.GetSize() == (24, 24, 24) and result.GetSpacing() == pytest.approx(coarse.GetSpacing())
    given, got = sitk.GetArrayFromImage(coarse), sitk.GetArrayFromImage(result)
    assert (given == got).mean() > 0.97  # equal up to the round trip through the 32^3 model grid


def _stored_as(image: sitk.Image, flip_xyz: tuple[bool, bool, bool]) -> sitk.Image:
    """The same voxels in physical space, stored in the other order along the flipped axes."""
    array = sitk.GetArrayFromImage(image)[tuple(slice(None, None, -1 if f else 1) for f in flip_xyz[::-1])]
    first = [n - 1 if f else 0 for n, f in zip(image.GetSize(), flip_xyz, strict=True)]
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array))
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint(first))
    signs = np.diag([-1.0 if f else 1.0 for f in flip_xyz])
    flipped.SetDirection(tuple((np.reshape(image.GetDirection(), (3, 3)) @ signs).ravel()))
    return flipped


def test_anatomy_gives_the_same_result_whatever_order_its_file_stores_voxels_in(result_dir, tmp_path, tiny_model_dir):
    # The network runs on an LPS grid over the given field of view; RAS (as nibabel's canonical
    # form writes it) and slices top to bottom must not mirror what the model draws freely.
    labels = sitk.ReadImage(str(result_dir / "anatomy.nii.gz"))
    orders = {"lps": (False, False, False), "ras": (True, True, False), "z_flipped": (False, False, True)}
    results = {}
    for name, flip in orders.items():
        sitk.WriteImage(_stored_as(labels, flip), str(tmp_path / f"{name}.nii.gz"))
        out = tmp_path / f"out_{name}"
        assert generate("--model", tiny_model_dir, "--report", REPORT, "--out", out, "--anatomy",
                        tmp_path / f"{name}.nii.gz", "--seed", 3, "--progress", "none") == 0
        ct = sitk.ReadImage(str(out / "ct.nii.gz"))
        assert ct.GetDirection() == pytest.approx(_stored_as(labels, flip).GetDirection())
        back = _stored_as(ct, flip)  # back to LPS storage
        assert back.GetDirection() == pytest.approx(labels.GetDirection())
        results[name] = sitk.GetArrayFromImage(back)
    assert np.abs(results["ras"].astype(int) - results["lps"]).max() <= 1
    assert np.abs(results["z_flipped"].astype(int) - results["lps"]).max() <= 1


def test_jsonl_progress_is_machine_readable(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "jsonl"
    assert generate("--model", tiny_model_dir, "--report", REPORT, "--out", out, "--progress", "jsonl",
                    "--steps", 2, "--tile", "16:0.5") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress if e["stage"] == "stage1"] == [1, 2]
    assert [e["step"] for e in progress if e["stage"] == "stage2"] == [1, 2, 3, 4]
    assert any("UNTRAINED" in e.get("message", "") for e in events)
    assert events[-1] == {"event": "done", "out": str(out)}
    assert json.loads((out / "generation.json").read_text())["tiling"] == {"size": [16, -1, -1], "overlap": 0.5}


def _bad_report_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Épanchement pleural".encode("latin-1"))
    return path


def _corrupt_model(tiny_model_dir, tmp_path):
    broken = tmp_path / "corrupt_model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "stage1" / "model.safetensors").write_bytes(b"garbage")
    return broken


def _label_map(tmp_path, array, name="labels.nii.gz"):
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


BAD_INPUTS = {
    "missing model": (lambda d, t: ["--model", t / "nowhere"], "does not exist"),
    "corrupt weights": (lambda d, t: ["--model", _corrupt_model(d, t)], "cannot read"),
    "empty report": (lambda d, t: ["--model", d, "--report", "  "], "empty"),
    "non-UTF-8 report": (lambda d, t: ["--model", d, "--report-file", _bad_report_file(t)], "not UTF-8"),
    "missing report file": (lambda d, t: ["--model", d, "--report-file", t / "none.txt"], "does not exist"),
    "anatomy with unknown labels": (
        lambda d, t: ["--model", d, "--anatomy", _label_map(t, np.full((8, 8, 8), 77, np.uint8))], "name no structure"),
    "2D anatomy": (lambda d, t: ["--model", d, "--anatomy", _label_map(t, np.ones((8, 8), np.uint8), "a.nrrd")], "3D"),
    "anatomy without structures": (
        lambda d, t: ["--model", d, "--anatomy", _label_map(t, np.zeros((8, 8, 8), np.uint8))], "none of the model"),
    "CUDA absent": (lambda d, t: ["--model", d, "--device", "cuda"], "CUDA"),
    "bad tile": (lambda d, t: ["--model", d, "--tile", "abc"], "tile"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_exit_2_and_no_output(case, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_args, message = BAD_INPUTS[case]
    args = make_args(tiny_model_dir, tmp_path)
    if "--report" not in args and "--report-file" not in args:
        args += ["--report", REPORT]
    out = tmp_path / "out"
    assert generate(*args, "--out", out, "--progress", "none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("medsyn: error:")]) == 1
    assert any(__import__("re").search(message, line) for line in err), err
    assert not out.exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # no temporary leftovers


def test_non_empty_or_unwritable_output_is_refused(tiny_model_dir, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert generate("--model", tiny_model_dir, "--report", REPORT, "--out", occupied) == 2
    assert (occupied / "keep.txt").read_text() == "mine"
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert generate("--model", tiny_model_dir, "--report", REPORT, "--out", locked / "x") == 2
    assert generate("--model", tiny_model_dir, "--report", REPORT, "--out", "/proc/medsyn-out") == 2
    assert "cannot write" in capsys.readouterr().err


def test_step_counts_must_be_positive(tiny_model_dir, tmp_path, capsys):
    assert generate("--model", tiny_model_dir, "--report", REPORT, "--out", tmp_path / "x", "--steps", "-3") == 2
    assert "--steps: must be an integer from 1 to" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_module_runs_as_a_command_and_reports_errors_without_traceback(tiny_model_dir, tmp_path):
    command = [sys.executable, "-m", "MedSynLib.generate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x")]
    done = subprocess.run(command + ["--report", ""], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "medsyn: error: the report is empty"


def test_the_medsyn_command_runs_each_tool_and_lists_them(tmp_path, capsys):
    """`medsyn COMMAND ...` (the console script) reaches the same mains as `python -m MedSynLib.COMMAND`."""
    from MedSynLib.cli import COMMANDS
    from MedSynLib.cli import main as medsyn

    assert medsyn(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    assert medsyn(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert medsyn(["init_model", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert medsyn(["generate", "--out", str(tmp_path / "x")]) == 2  # a report is required: one line, exit 2
    assert "medsyn: error:" in capsys.readouterr().err
