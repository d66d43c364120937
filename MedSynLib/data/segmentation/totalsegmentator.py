"""TotalSegmentator adapter: five lung lobes, airway and vessels from its trained models.

For users who have TotalSegmentator installed (``pip install TotalSegmentator``; it
downloads its weights on first use, so it cannot run offline here). This is the anatomy
the MedSyn paper trained on. The adapter runs its command-line tool twice, as the
reference implementation did:

1. ``TotalSegmentator -i ct.nii.gz -o OUT --roi_subset lung_upper_lobe_left ...``: the five
   lobes from the default ``total`` task;
2. ``TotalSegmentator -i ct.nii.gz -o OUT -ta lung_vessels``: ``lung_vessels`` and
   ``lung_trachea_bronchia``. Older releases crop this task with the lobe masks found in
   the output folder, which is why both runs share it and the lobes run first.

TotalSegmentator writes one ``<class>.nii.gz`` per structure in the input's grid; the
files are read back, mapped to this project's structure names (``OUTPUT_NAMES``) and
resampled onto the input image's grid if the NIfTI round trip changed it. The lungs are
the unions of their lobes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MedSynLib.anatomy import LEFT_LOBES, RIGHT_LOBES
from MedSynLib.data.segmentation.classical import AnatomyMasks
from MedSynLib.errors import MedSynError
from MedSynLib.geometry import Geometry

EXECUTABLE = "TotalSegmentator"

# TotalSegmentator class (file stem) -> this project's structure name.
LOBE_OUTPUTS: dict[str, str] = {
    "lung_upper_lobe_left": "left_upper_lobe",
    "lung_lower_lobe_left": "left_lower_lobe",
    "lung_upper_lobe_right": "right_upper_lobe",
    "lung_middle_lobe_right": "right_middle_lobe",
    "lung_lower_lobe_right": "right_lower_lobe",
}
VESSEL_TASK_OUTPUTS: dict[str, str] = {
    "lung_trachea_bronchia": "airway",
    "lung_vessels": "vessels",
}
OUTPUT_NAMES: dict[str, str] = {**LOBE_OUTPUTS, **VESSEL_TASK_OUTPUTS}


def build_commands(input_path: str | Path, output_dir: str | Path, *, executable: str = EXECUTABLE,
                   device: str | None = None, fast: bool = False) -> list[list[str]]:
    """The two command lines, lobes first: the vessel task may crop with the lobe masks.

    ``device`` is passed as ``--device`` (e.g. "gpu", "cpu"); ``fast`` adds ``--fast`` to the
    lobe run only (TotalSegmentator refuses it for the lung_vessels task).
    """
    common = [executable, "-i", str(input_path), "-o", str(output_dir)]
    options = ["--device", device] if device else []
    lobes = common + ["--roi_subset", *LOBE_OUTPUTS] + (["--fast"] if fast else []) + options
    vessels = common + ["-ta", "lung_vessels"] + options
    return [lobes, vessels]


def find_executable(executable: str = EXECUTABLE) -> str:
    """Full path of the TotalSegmentator command, or a MedSynError saying how to get it."""
    path = shutil.which(executable)
    if path is None:
        raise MedSynError(
            f"TotalSegmentator is not installed: no {executable!r} command on PATH. Install it with "
            "'pip install TotalSegmentator' (it downloads its model weights on first use), or use "
            "the weight-free 'classical' segmenter."
        )
    return path


def run_totalsegmentator(input_path: str | Path, output_dir: str | Path, *, executable: str = EXECUTABLE,
                         device: str | None = None, fast: bool = False) -> None:
    """Run both TotalSegmentator tasks on a NIfTI file, writing their masks into output_dir."""
    resolved = find_executable(executable)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    for command in build_commands(input_path, output_dir, executable=resolved, device=device, fast=fast):
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise MedSynError(f"TotalSegmentator failed (exit code {result.returncode}) running "
                              f"{' '.join(command)}: {tail or 'no output'}")


def read_outputs(output_dir: str | Path, reference: sitk.Image | None = None) -> AnatomyMasks:
    """Masks from TotalSegmentator's per-structure files, under this project's names.

    With a ``reference`` image every mask is brought onto its grid (nearest neighbour when
    the file's geometry differs). Adds ``left_lung`` and ``right_lung`` as lobe unions.
    """
    output_dir = Path(output_dir)
    missing = [f"{stem}.nii.gz" for stem in OUTPUT_NAMES if not (output_dir / f"{stem}.nii.gz").is_file()]
    if missing:
        found = sorted(p.name for p in output_dir.glob("*.nii*")) if output_dir.is_dir() else []
        raise MedSynError(f"TotalSegmentator output in {output_dir} lacks {missing}; found {found[:10]}"
                          + (" ..." if len(found) > 10 else ""))
    masks: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for stem, name in OUTPUT_NAMES.items():
        image = sitk.ReadImage(str(output_dir / f"{stem}.nii.gz"))
        if reference is not None and not Geometry.of_image(image).matches(Geometry.of_image(reference)):
            image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            notes.append(f"totalsegmentator: {stem} resampled onto the input grid")
        masks[name] = sitk.GetArrayFromImage(image) > 0
    masks["left_lung"] = np.logical_or.reduce([masks[lobe] for lobe in LEFT_LOBES])
    masks["right_lung"] = np.logical_or.reduce([masks[lobe] for lobe in RIGHT_LOBES])
    return AnatomyMasks(masks, notes)


def segment_totalsegmentator(image: sitk.Image, *, work_dir: str | Path | None = None,
                             device: str | None = None, executable: str = EXECUTABLE) -> AnatomyMasks:
    """Lobes, lungs, airway and vessels of a CT in HU via TotalSegmentator, in the image's grid.

    ``work_dir`` keeps the NIfTI input and TotalSegmentator's outputs; by default they go to
    a temporary folder removed afterwards.
    """
    find_executable(executable)  # fail before writing anything
    with tempfile.TemporaryDirectory(prefix="medsyn-totalseg-") as scratch:
        folder = Path(work_dir) if work_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        input_path = folder / "ct.nii.gz"
        sitk.WriteImage(image, str(input_path))
        output_dir = folder / "segmentations"
        run_totalsegmentator(input_path, output_dir, executable=executable, device=device)
        return read_outputs(output_dir, reference=image)
