"""Helpers shared by the Slicer-extension tests (Testing/test_slicer_*.py).

Not a pytest conftest (the name keeps it from being collected): the test modules import
it. It holds
- the paths of the extension's sources, put on sys.path the way Slicer puts a module's folder;
- the one shim headless MRML needs: the segmentation converter rules that 3D Slicer
  registers at startup (qSlicerSegmentationsModule::setup) and `slicer-core` does not;
- a stand-in for `python -m MedSynLib.generate` that speaks the same command line and
  progress protocol and writes a result folder the way the library does (with its writer),
  so the process handling and the import run for real without a model;
- a stand-in for `PythonSlicer`: a launcher that runs the interpreter as its child and, like
  CTKAppLauncher, passes no signal on, so cancelling must reach the whole process tree.
"""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap
import time
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
# It returns the --anatomy segmentation's masks as its anatomy, whole, as the model would
# draw them; without one, lobes with a vessel running through one of them.
FAKE_GENERATOR = textwrap.dedent(
    '''
    import argparse, json, os, shutil, sys, time
    import numpy as np
    import SimpleITK as sitk
    import slicerio
    from MedSynLib.anatomy import STRUCTURE_SETS
    from MedSynLib.geometry import Geometry
    from MedSynLib.io.volumes import write_segmentation

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
    emit(event="log", message="loading model: Ödem – 5 mm")  # non-ASCII, as reports are
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
        given = slicerio.read_segmentation(args.anatomy)
        ijk_to_lps = np.asarray(given["ijkToLPS"], dtype=float)
        spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
        geometry = Geometry(given["voxels"].shape[-3:][::-1], tuple(spacing), tuple(ijk_to_lps[:3, 3]),
                            tuple((ijk_to_lps[:3, :3] / spacing).ravel()))
        masks = {s["name"].replace(" ", "_"): slicerio.segment_mask(given, s).transpose(2, 1, 0)
                 for s in given["segments"]}
    else:
        geometry = Geometry((16, 20, 24), (1.5, 1.25, 2.0), (-12.0, 30.0, -40.0))
        masks = {name: np.zeros(geometry.shape, bool) for name in STRUCTURE_SETS["lobes"]}
        masks["left_upper_lobe"][2:10, 3:15, 2:10] = True
        masks["right_upper_lobe"][2:10, 3:15, 14:22] = True
        masks["airway"][4:12, 8:11, 10:14] = True
        masks["vessels"][5, 4:14, 5] = True  # through the left upper lobe
    rng = np.random.default_rng(args.seed)
    ct = rng.integers(-1024, 600, size=geometry.shape).astype(np.int16)
    partial = args.out + ".partial"
    os.makedirs(partial)
    sitk.WriteImage(geometry.image(ct), os.path.join(partial, "ct.nii.gz"))
    write_segmentation(os.path.join(partial, "anatomy.seg.nrrd"), masks, geometry)
    metadata = {
        "report": report, "seed": args.seed, "model": args.model, "steps": args.steps,
        "guidance": args.guidance, "synthetic": True, "structures": list(masks),
        "timings": {"total_s": 0.01}, "versions": {"medsyn": "fake"}, "argv": sys.argv[1:],
    }
    with open(os.path.join(partial, "generation.json"), "w", encoding="utf-8") as f:
        json.dump(metadata, f)
    os.replace(partial, args.out)
    emit(event="done", out=args.out)
    '''
)


# A stand-in for PythonSlicer: `launcher.py PID_FILE PROGRAM ARGS...` runs PROGRAM as its child,
# writes "launcher-pid child-pid" to PID_FILE and exits with the child's code. Like
# CTKAppLauncher (a QProcess child), it passes no signal on: killed, it leaves the child running.
FAKE_PYTHONSLICER = textwrap.dedent(
    '''
    import os, subprocess, sys
    child = subprocess.Popen(sys.argv[2:])
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    sys.exit(child.wait())
    '''
)


def write_fake_generator(folder: Path) -> Path:
    """The stand-in generator script, with the PythonSlicer stand-in beside it."""
    (Path(folder) / "fake_pythonslicer.py").write_text(FAKE_PYTHONSLICER, encoding="utf-8")
    script = Path(folder) / "fake_medsyn_generate.py"
    script.write_text(FAKE_GENERATOR, encoding="utf-8")
    return script


def fake_launcher(script: Path, calls: list | None = None, mode: str = "ok", launch=None):
    """A launcher that runs the fake generator, with the arguments meant for MedSynLib.generate,
    under the PythonSlicer stand-in, through `launch` (default: the module's subprocess_launcher).
    Each call records its arguments and the file the stand-in writes its and its child's pid to."""
    from MedSynSlicerLib import job

    def launcher(args, environment, cwd, **options):
        args = list(args)
        if args[1:3] != ["-m", "MedSynLib.generate"]:
            raise AssertionError(f"unexpected command {args}")
        pid_file = Path(tempfile.mkdtemp(dir=script.parent)) / "pids"
        if calls is not None:
            calls.append({"args": args, "environment": dict(environment), "cwd": cwd, "pid_file": pid_file})
        command = [sys.executable, str(script.with_name("fake_pythonslicer.py")), str(pid_file),
                   sys.executable, str(script), *args[3:]]
        return (launch or job.subprocess_launcher)(command, {**environment, "FAKE_MEDSYN_MODE": mode}, cwd, **options)

    return launcher


def read_pids(pid_file: Path, timeout: float = 20.0) -> tuple[int, int]:
    """The launcher stand-in's pid and its child's, once written."""
    deadline = time.monotonic() + timeout
    while not pid_file.is_file():
        assert time.monotonic() < deadline, "the launcher stand-in did not start"
        time.sleep(0.02)
    launcher_pid, child_pid = (int(p) for p in pid_file.read_text().split())
    return launcher_pid, child_pid


def processes_end(pids, timeout: float = 10.0) -> bool:
    """Whether every pid ends within `timeout`: a SIGKILL lands at once, the exit a moment later."""
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def process_alive(pid: int) -> bool:
    """Whether a process runs; on Linux a zombie (ended, not yet reaped by init) does not."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").is_file():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
