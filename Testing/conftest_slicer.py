"""Helpers shared by the Slicer-extension tests (Testing/test_slicer_*.py).

Not a pytest conftest (the name keeps it from being collected): the test modules import
it. It holds
- the paths of the extension's sources, put on sys.path the way Slicer puts a module's folder;
- the one shim headless MRML needs: the segmentation converter rules that 3D Slicer
  registers at startup (qSlicerSegmentationsModule::setup) and `slicer-core` does not;
- a stand-in for `python -m MedSynLib.generate` that speaks the same command line and
  progress protocol and writes a result folder the way the library does, so the process
  handling and the import run for real without a model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO_ROOT / "MedSynExtension" / "MedSyn"

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def import_slicer_core():
    """`slicer` from slicer-core, or skip (also when the unrelated PyPI package `slicer` is installed)."""
    import pytest

    slicer = pytest.importorskip("slicer", reason="needs slicer-core: pip install slicer-core")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
    return slicer


def register_segmentation_converters(slicer) -> None:
    """What Slicer's Segmentations module does at startup: register the representation converters."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    present = {rule.GetName() for rule in factory.GetConverterRules()}
    for rule_class in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
    ):
        rule = rule_class()
        if rule.GetName() not in present:
            factory.RegisterConverterRule(rule)


# A stand-in for `python -m MedSynLib.generate`. FAKE_MEDSYN_MODE selects the behaviour:
# ok (default), error (bad input: one line on stderr, exit 2), crash (traceback, exit 1),
# slow (progress every 0.1 s for a minute: for cancelling), noresult (exit 0, writes nothing).
FAKE_GENERATOR = textwrap.dedent(
    '''
    import argparse, json, os, shutil, sys, time
    import numpy as np
    import SimpleITK as sitk

    parser = argparse.ArgumentParser()
    parser.add_argument("--report-file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--anatomy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress")
    parser.add_argument("--tile")
    args = parser.parse_args()
    mode = os.environ.get("FAKE_MEDSYN_MODE", "ok")

    def emit(**event):
        print(json.dumps(event), flush=True)

    report = open(args.report_file, encoding="utf-8").read()
    if mode == "error":
        print("medsyn: error: the report is too short", file=sys.stderr, flush=True)
        sys.exit(2)
    if mode == "crash":
        print("Traceback (most recent call last):", flush=True)
        print("RuntimeError: CUDA out of memory", flush=True)
        sys.exit(1)
    emit(event="log", message="loading model")
    print("a stray warning line", flush=True)
    if mode == "slow":
        for step in range(600):
            emit(event="progress", stage="stage1", step=step + 1, steps=600)
            time.sleep(0.1)
    for stage in ("stage1", "stage2"):
        for step in range(args.steps):
            emit(event="progress", stage=stage, step=step + 1, steps=args.steps)
    if mode == "noresult":
        sys.exit(0)

    if args.anatomy:
        reference = sitk.ReadImage(args.anatomy)
        labels = sitk.GetArrayFromImage(reference).astype(np.uint8)
    else:
        reference = sitk.Image(24, 20, 16, sitk.sitkUInt8)
        reference.SetSpacing((1.5, 1.25, 2.0))
        reference.SetOrigin((-12.0, 30.0, -40.0))
        labels = np.zeros((16, 20, 24), np.uint8)
        labels[2:10, 3:15, 2:10] = 1
        labels[2:10, 3:15, 14:22] = 3
        labels[4:12, 8:11, 10:14] = 6
    rng = np.random.default_rng(args.seed)
    ct = rng.integers(-1024, 600, size=labels.shape).astype(np.int16)
    partial = args.out + ".partial"
    os.makedirs(partial)
    for name, array in (("ct.nii.gz", ct), ("anatomy.nii.gz", labels)):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(reference)
        sitk.WriteImage(image, os.path.join(partial, name))
    metadata = {
        "report": report, "seed": args.seed, "model": args.model, "steps": args.steps,
        "guidance": args.guidance, "synthetic": True,
        "structures": ["left_upper_lobe", "left_lower_lobe", "right_upper_lobe", "right_middle_lobe",
                       "right_lower_lobe", "airway", "vessels"],
        "timings": {"total_s": 0.01}, "versions": {"medsyn": "fake"}, "argv": sys.argv[1:],
    }
    with open(os.path.join(partial, "generation.json"), "w", encoding="utf-8") as f:
        json.dump(metadata, f)
    os.replace(partial, args.out)
    emit(event="done", out=args.out)
    '''
)


def write_fake_generator(folder: Path) -> Path:
    script = Path(folder) / "fake_medsyn_generate.py"
    script.write_text(FAKE_GENERATOR, encoding="utf-8")
    return script


def fake_launcher(script: Path, calls: list | None = None, mode: str = "ok"):
    """A launcher that runs the fake generator with the arguments meant for MedSynLib.generate."""

    def launch(args, environment, cwd):
        args = list(args)
        if args[1:3] != ["-m", "MedSynLib.generate"]:
            raise AssertionError(f"unexpected command {args}")
        if calls is not None:
            calls.append({"args": args, "environment": dict(environment), "cwd": cwd})
        return subprocess.Popen(
            [sys.executable, str(script), *args[3:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            env={**os.environ, **environment, "FAKE_MEDSYN_MODE": mode},
            cwd=cwd,
        )

    return launch
