"""Finding and reading the volumes of an evaluation: result folders, flat folders, manifests.

A *source* (``--real`` or ``--fake``) is one of:

- a folder of case folders, each holding ``ct.nii.gz`` (or ``ct.nii``, ``ct.nrrd``, ``ct.mha``)
  and optionally ``anatomy.nii.gz`` (a label map with `anatomy.STRUCTURES` values) or
  ``anatomy.seg.nrrd``, and ``generation.json`` (its "report" is read) — the layout
  ``python -m MedSynLib.generate`` writes; a case folder may instead hold one DICOM series;
- a folder of volumes ``NAME.nii.gz`` / ``.nii`` / ``.nrrd`` / ``.mha`` / ``.mhd``, each with an
  optional label map ``NAME.anatomy.nii.gz`` (any of those extensions) beside it;
- one case folder or one DICOM series folder;
- a CSV or JSON-lines manifest with columns ``case_id``, ``ct`` and optionally ``labels`` and
  ``report``; relative paths are taken from the manifest's folder; ``ct`` may be a DICOM folder.

Every CT is reoriented to LPS (array (z, y, x): z superior, y posterior, x toward the
patient's left), the orientation all metrics assume; label maps are resampled onto the CT's
grid (nearest neighbour) when their grids differ.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MedSynLib.anatomy import LOBES, STRUCTURES, label_map_to_masks, standard_masks
from MedSynLib.errors import MedSynError, read_text
from MedSynLib.geometry import Geometry

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class CaseFiles:
    """Where one volume and its optional anatomy and report are."""

    case_id: str
    ct: Path
    labels: Path | None = None
    report: str | None = None


@dataclass
class LoadedCase:
    """A CT in HU (float32, LPS (z, y, x)), its spacing (x, y, z mm) and its masks, if any."""

    case: CaseFiles
    hu: np.ndarray
    spacing: tuple[float, float, float]
    image: sitk.Image  # the LPS-oriented CT, for segmenters
    masks: dict[str, np.ndarray] | None

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.spacing))


def _volume_stem(path: Path) -> str | None:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _has_dicom(folder: Path) -> bool:
    return any(folder.glob("*.dcm")) or any(folder.glob("*.DCM"))


def _case_folder_ct(folder: Path) -> Path | None:
    for suffix in VOLUME_SUFFIXES:
        candidate = folder / f"ct{suffix}"
        if candidate.is_file():
            return candidate
    return folder if _has_dicom(folder) else None


def _case_folder_labels(folder: Path) -> Path | None:
    for name in [f"anatomy{s}" for s in VOLUME_SUFFIXES] + ["anatomy.seg.nrrd"]:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_report(folder: Path) -> str | None:
    metadata = folder / "generation.json"
    if not metadata.is_file():
        return None
    try:
        report = json.loads(metadata.read_text(encoding="utf-8")).get("report")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return report if isinstance(report, str) else None


def _case_from_folder(folder: Path, case_id: str) -> CaseFiles | None:
    ct = _case_folder_ct(folder)
    if ct is None:
        return None
    return CaseFiles(case_id, ct, _case_folder_labels(folder), _read_report(folder))


def _cases_from_manifest(path: Path) -> list[CaseFiles]:
    base = path.parent
    text = read_text(path, "manifest")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise MedSynError(f"manifest {path} line {number} is not JSON: {error.msg}") from error
    cases = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("ct"):
            raise MedSynError(f"manifest {path} row {number} has no 'ct' (columns: case_id, ct[, labels, report])")
        ct = base / str(row["ct"]).strip()
        labels = base / str(row["labels"]).strip() if row.get("labels") else None
        if not ct.exists():
            raise MedSynError(f"manifest {path} row {number}: {ct} does not exist")
        if labels is not None and not labels.is_file():
            raise MedSynError(f"manifest {path} row {number}: labels {labels} do not exist")
        case_id = str(row.get("case_id") or _volume_stem(ct) or ct.name)
        cases.append(CaseFiles(case_id, ct, labels, row.get("report") or None))
    return cases


def discover_cases(source: str | Path, *, role: str = "input") -> list[CaseFiles]:
    """The cases of a source (see the module docstring); MedSynError when there are none."""
    source = Path(source)
    if not source.exists():
        raise MedSynError(f"{role} {source} does not exist")
    if source.is_file():
        if source.suffix.lower() in MANIFEST_SUFFIXES:
            cases = _cases_from_manifest(source)
        elif _volume_stem(source) is not None:
            cases = [CaseFiles(_volume_stem(source), source)]
        else:
            raise MedSynError(f"{role} {source} is neither a folder, a volume nor a .csv/.jsonl manifest")
    else:
        single = _case_from_folder(source, source.name)
        if single is not None:
            cases = [single]
        else:
            cases = []
            for child in sorted(source.iterdir()):
                if child.name.startswith("."):
                    continue
                if child.is_dir():
                    case = _case_from_folder(child, child.name)
                    if case is not None:
                        cases.append(case)
                    continue
                stem = _volume_stem(child)
                if stem is None or stem.endswith(".anatomy") or child.name.endswith(".seg.nrrd"):
                    continue
                labels = next((source / f"{stem}.anatomy{s}" for s in VOLUME_SUFFIXES
                               if (source / f"{stem}.anatomy{s}").is_file()), None)
                cases.append(CaseFiles(stem, child, labels))
    if not cases:
        raise MedSynError(f"no volumes found in {role} {source} (expected case folders with ct.nii.gz, "
                          f"volumes such as NAME.nii.gz, a DICOM series, or a .csv/.jsonl manifest)")
    ids = [case.case_id for case in cases]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise MedSynError(f"{role} {source}: case ids repeat: {repeated[:5]}")
    return cases


def _read_image(path: Path) -> sitk.Image:
    if path.is_dir():
        from MedSynLib.io.dicom import read_dicom_series

        return read_dicom_series(path)
    from MedSynLib.io.volumes import read_image

    return read_image(path)


def _label_masks(path: Path, reference: sitk.Image) -> dict[str, np.ndarray]:
    """Masks of every structure in a label map (or .seg.nrrd) on the reference (LPS) grid."""
    if path.name.endswith(".seg.nrrd"):
        from MedSynLib.io.volumes import read_anatomy

        masks, geometry = read_anatomy(path, tuple(STRUCTURES))
        labels = np.zeros(geometry.shape, dtype=np.uint8)
        for name, mask in masks.items():
            labels[mask] = STRUCTURES[name].label
        image = geometry.image(labels)
    else:
        image = _read_image(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MedSynError(f"label map {path} must be a 3D single-component image")
    image = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkUInt8), "LPS")
    if not Geometry.of_image(image).matches(Geometry.of_image(reference)):
        image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    label_map = sitk.GetArrayFromImage(image)
    try:
        masks = label_map_to_masks(label_map, tuple(STRUCTURES.values()))
    except ValueError as error:
        raise MedSynError(f"label map {path}: {error}") from error
    return standard_masks({name: mask for name, mask in masks.items() if mask.any()})


def has_lobes(masks: dict[str, np.ndarray] | None) -> bool:
    return bool(masks) and any(lobe in masks for lobe in LOBES)


def load_case(case: CaseFiles) -> LoadedCase:
    """Read a case: the CT oriented to LPS, in float32 HU, and its masks on the same grid."""
    image = _read_image(case.ct)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MedSynError(f"{case.ct} must be a 3D single-component volume, got size {image.GetSize()}")
    if min(image.GetSize()) < 8:
        raise MedSynError(f"{case.ct} is too small for evaluation: size {image.GetSize()}")
    image = sitk.DICOMOrient(image, "LPS")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    masks = _label_masks(case.labels, image) if case.labels is not None else None
    return LoadedCase(case, hu, tuple(float(s) for s in image.GetSpacing()), image, masks)
