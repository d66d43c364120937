"""Preparing a training set: chest CTs + reports -> cubic, lung-centred case files of CT, anatomy and
encoded report at both stages' grids (the command is cli/prepare.py, `python -m MedSynLib.prepare`).

For each case: read, check it is a calibrated CT, reorient to LPS, segment the anatomy,
take a cubic field of view around the lungs (with a margin), resample it to the stage-2
grid (linear for the CT, by fraction > 0.5 for masks) and, by nearest-neighbour x1/4 as
the reference does, to the stage-1 grid; encode the report; write one compressed case
file. Finished cases are skipped when run again; failures are listed with their reason
in failed.json and do not stop the others.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from MedSynLib.anatomy import STRUCTURE_SETS, STRUCTURES, label_map_to_masks, resolve_structures
from MedSynLib.configuration import atomic_write_bytes, write_json
from MedSynLib.data.prepared import INDEX, PreparedCase, read_case_meta, write_case, write_index
from MedSynLib.errors import (
    MedSynError,
    integer_argument,
    read_text,
)
from MedSynLib.geometry import Geometry, resample
from MedSynLib.hounsfield import STORED_HU_RANGE
from MedSynLib.io.dicom import read_dicom_series
from MedSynLib.io.volumes import read_image
from MedSynLib.text_encoder import EMBEDDED_ENCODER, ReportEncoder, TextEncoderConfig, check_report

MIN_SIZE = 16  # voxels per axis: anything smaller is not a chest CT
GRID_SIZE = integer_argument(MIN_SIZE, 1024)


@dataclass(frozen=True)
class PrepareOptions:
    size: int = 256
    low_size: int = 64
    margin_mm: float = 15.0
    segmenter: str = "classical"
    structures: str = ""  # a STRUCTURE_SETS name; empty: what the segmenter finds


@dataclass
class ManifestRow:
    case_id: str
    ct: Path
    report: str
    labels: Path | None
    masks: dict[str, Path]


# ----------------------------------------------------------------------------- manifest
def read_manifest(path: Path) -> list[ManifestRow | tuple[str, str]]:
    """Rows of the manifest; a row that cannot be used becomes (case_id, reason)."""
    text = read_text(path, "manifest")
    if path.suffix == ".jsonl":
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise MedSynError(f"{path} is not valid JSON lines: {error}") from error
    else:
        records = list(csv.DictReader(text.splitlines()))
    if not records:
        raise MedSynError(f"manifest {path} has no cases")
    if "case_id" not in records[0] or "ct" not in records[0]:
        raise MedSynError(f"manifest {path} needs the columns case_id and ct (and report or report_file)")
    rows, seen = [], set()
    for number, record in enumerate(records, start=1):
        case_id = str(record.get("case_id") or "").strip()
        if not case_id or "/" in case_id or case_id.startswith("."):
            rows.append((case_id or f"row{number}", "missing or unusable case_id"))
            continue
        if case_id in seen:
            rows.append((case_id, "duplicate case_id (the first row with it is used)"))
            continue
        seen.add(case_id)
        try:
            rows.append(_manifest_row(record, case_id, path.parent))
        except MedSynError as error:
            rows.append((case_id, str(error)))
    return rows


def _manifest_row(record: dict, case_id: str, base: Path) -> ManifestRow:
    def resolve(value) -> Path | None:
        return (base / str(value)).resolve() if value not in (None, "") else None

    report = record.get("report") or ""
    if not report and record.get("report_file"):
        report_path = resolve(record["report_file"])
        try:
            report = read_text(report_path, "report file")
        except OSError as error:
            raise MedSynError(f"cannot read report file {report_path}: {error.strerror}") from error
    if not str(report).strip():
        raise MedSynError("empty report")
    check_report(str(report))
    masks = {key[len("mask_"):]: resolve(v) for key, v in record.items() if key.startswith("mask_") and v}
    unknown = [name for name in masks if name not in STRUCTURES]
    if unknown:
        raise MedSynError(f"mask columns name unknown structures {unknown}")
    return ManifestRow(case_id, resolve(record["ct"]), str(report).strip(), resolve(record.get("labels")), masks)


def ct_rate_manifest(reports_csv: Path, volumes: Path, out: Path) -> int:
    """A manifest for CT-RATE-style data: NIfTI volumes + a CSV with VolumeName, Findings_EN, Impressions_EN."""
    if not reports_csv.is_file() or not volumes.is_dir():
        raise MedSynError(f"need a reports CSV ({reports_csv}) and a volumes folder ({volumes})")
    files = {p.name: p for p in volumes.rglob("*.nii.gz")}
    rows = []
    for record in csv.DictReader(read_text(reports_csv, "reports CSV").splitlines()):
        name = record.get("VolumeName", "")
        if name in files:
            report = " ".join(filter(None, (record.get("Findings_EN", ""), record.get("Impressions_EN", ""))))
            rows.append({"case_id": name.removesuffix(".nii.gz"), "ct": str(files[name].resolve()), "report": report})
    if not rows:
        raise MedSynError(f"no volume of {volumes} is named in {reports_csv}")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["case_id", "ct", "report"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out, text.getvalue().encode("utf-8"))
    return len(rows)


# ----------------------------------------------------------------------------- one case
def read_ct(path: Path) -> sitk.Image:
    """A CT in HU as a 3D image, from a DICOM series folder or a volume file."""
    if not path.exists():
        raise MedSynError(f"{path} does not exist")
    try:
        image = read_dicom_series(path) if path.is_dir() else read_image(path, "CT")
    except RuntimeError as error:
        raise MedSynError(f"cannot read {path}: {str(error).strip().splitlines()[-1][:200]}") from error
    if image.GetDimension() != 3 or min(image.GetSize()) < MIN_SIZE:
        raise MedSynError(f"not a 3D volume of at least {MIN_SIZE}^3 voxels (size {image.GetSize()})")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedSynError("not a single-channel (grey-level) volume")
    return image




def check_calibration(hu: np.ndarray) -> None:
    """Air must read about -1000 HU and the body 0..100 HU: otherwise this is no calibrated CT."""
    low, high = np.percentile(hu, [1, 99])
    if low > -800:
        raise MedSynError(f"no air near -1000 HU (1st percentile {low:.0f}): not a CT, or HU calibration "
                          "(rescale slope/intercept) missing")
    if high < -200:
        raise MedSynError(f"no soft tissue (99th percentile {high:.0f} HU): not a chest CT")


def lung_field_of_view(masks: dict[str, np.ndarray], geometry: Geometry, size: int, margin_mm: float) -> Geometry:
    """A size^3 isotropic grid (LPS, identity direction) centred on the lungs' bounding box plus a margin."""
    lungs = np.zeros(geometry.shape, dtype=bool)
    for name in ("left_lung", "right_lung", "airway", *STRUCTURE_SETS["lobes"][:5]):
        if name in masks:
            lungs |= masks[name]
    if lungs.sum() < 100:
        raise MedSynError("no lungs found (fewer than 100 lung voxels)")
    indices = np.argwhere(lungs)[:, ::-1]  # (x, y, z) voxel indices
    corners = np.array([indices.min(0) - 0.5, indices.max(0) + 0.5])
    direction = np.array(geometry.direction).reshape(3, 3)
    points = np.array(geometry.origin) + (corners * np.array(geometry.spacing)) @ direction.T
    low, high = points.min(0), points.max(0)
    side = float((high - low).max()) + 2 * margin_mm
    spacing = side / size
    origin = (low + high) / 2 - side / 2 + spacing / 2
    return Geometry((size,) * 3, (spacing,) * 3, tuple(origin))


def _read_mask(path: Path, reference: sitk.Image) -> sitk.Image:
    mask = read_image(path, "mask")
    if mask.GetSize() != reference.GetSize():
        raise MedSynError(f"mask {path} has size {mask.GetSize()}, the CT {reference.GetSize()}")
    mask.CopyInformation(reference)
    return sitk.DICOMOrient(mask, "LPS")


def case_anatomy(row: ManifestRow, image: sitk.Image, structures: tuple[str, ...], segmenter: str) -> dict[str, np.ndarray]:
    """Masks on the LPS image grid: the user's label map / masks first, the segmenter for the rest."""
    from MedSynLib.data.segmentation import get_segmenter

    original = image
    image = sitk.DICOMOrient(image, "LPS")
    masks: dict[str, np.ndarray] = {}
    if row.labels is not None:
        label_map = sitk.GetArrayFromImage(_read_mask(row.labels, original)).astype(np.int64)
        try:
            masks.update(label_map_to_masks(label_map, resolve_structures(structures)))
        except ValueError as error:
            raise MedSynError(f"label map {row.labels}: {error}") from error
    for name, path in row.masks.items():
        masks[name] = sitk.GetArrayFromImage(_read_mask(path, original)) > 0
    missing = [n for n in structures if n not in masks or not masks[n].any()]
    if missing:
        found = get_segmenter(segmenter)(image).masks
        for name in missing:
            if name not in found:
                raise MedSynError(f"the {segmenter!r} segmenter cannot find {name!r}; give it as a mask column")
            masks[name] = found[name]
    return {n: masks[n] for n in structures}


def prepare_case(row: ManifestRow, options: PrepareOptions, structures: tuple[str, ...], text: tuple[np.ndarray, np.ndarray],
                 out: Path) -> str:
    """Process one case end to end and write its file; raises MedSynError with the reason on failure."""
    image = read_ct(row.ct)
    check_calibration(sitk.GetArrayViewFromImage(image))
    masks = case_anatomy(row, image, structures, options.segmenter)
    lps = sitk.DICOMOrient(image, "LPS")
    source = Geometry.of_image(lps)
    grid = lung_field_of_view(masks, source, options.size, options.margin_mm)
    ct = resample(sitk.GetArrayFromImage(lps).astype(np.float32), source, grid, labels=False)
    high_masks = {n: resample(m.astype(np.float32), source, grid, labels=False) > 0.5 for n, m in masks.items()}
    step = options.size // options.low_size
    case = PreparedCase(
        case_id=row.case_id,
        ct_hu=np.clip(np.round(ct), *STORED_HU_RANGE).astype(np.int16),
        ct_hu_low=np.clip(np.round(ct[::step, ::step, ::step]), *STORED_HU_RANGE).astype(np.int16),
        masks=high_masks,
        masks_low={n: m[::step, ::step, ::step] for n, m in high_masks.items()},
        text_features=text[0], text_mask=text[1], report=row.report, geometry=grid,
    )
    write_case(out / "cases" / f"{row.case_id}.npz", case, structures)
    return row.case_id


def _prepare_case_safely(row, options, structures, text, out) -> tuple[str, str | None]:
    try:
        return prepare_case(row, options, structures, text, out), None
    except MedSynError as error:
        return row.case_id, str(error)
    except (RuntimeError, ValueError, MemoryError, OSError) as error:  # a broken case must not stop the others
        return row.case_id, f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}"


# ----------------------------------------------------------------------------- the dataset
def prepare(manifest: Path, out: Path, options: PrepareOptions, *, workers: int = 1,
            text_encoder: TextEncoderConfig | None = None) -> dict:
    """Prepare every case of the manifest into `out`; returns the summary also written to failed.json."""
    from MedSynLib.data.segmentation import SEGMENTER_STRUCTURE_SETS

    if min(options.size, options.low_size) < MIN_SIZE:
        raise MedSynError(f"grid sizes must be at least {MIN_SIZE}, got {options.size} and {options.low_size}")
    if options.size % options.low_size:
        raise MedSynError(f"size {options.size} must be a multiple of low_size {options.low_size}")
    structure_set = options.structures or SEGMENTER_STRUCTURE_SETS.get(options.segmenter, "")
    if structure_set not in STRUCTURE_SETS:
        raise MedSynError(f"unknown structure set or segmenter: {structure_set or options.segmenter!r}")
    structures = STRUCTURE_SETS[structure_set]
    text_encoder = text_encoder or TextEncoderConfig(EMBEDDED_ENCODER)
    rows = read_manifest(manifest)
    settings = {"structures": list(structures), "size": options.size, "low_size": options.low_size,
                "text_encoder": dataclasses.asdict(text_encoder), "options": dataclasses.asdict(options)}
    previous = json.loads((out / INDEX).read_text()) if (out / INDEX).is_file() else None
    if previous and {k: previous.get(k) for k in settings} != settings:
        raise MedSynError(f"{out} was prepared with other settings; use a new --out")

    failed = {case_id: reason for item in rows if isinstance(item, tuple) for case_id, reason in [item]}
    todo = [r for r in rows if isinstance(r, ManifestRow) and not (out / "cases" / f"{r.case_id}.npz").is_file()]
    done = [r.case_id for r in rows if isinstance(r, ManifestRow) and r not in todo]
    encoder = ReportEncoder(text_encoder, cache_dir=out / "text_cache") if todo else None
    features = encoder.encode([r.report for r in todo]) if todo else None
    texts = {r.case_id: (features.features[i].numpy(), features.mask[i].numpy()) for i, r in enumerate(todo)}
    (out / "cases").mkdir(parents=True, exist_ok=True)  # only now: a bad text encoder leaves nothing behind

    bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=None)  # not on a non-terminal stderr
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_prepare_case_safely, r, options, structures, texts[r.case_id], out) for r in todo]
            results = []
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(1)
    else:
        results = []
        for row in todo:
            results.append(_prepare_case_safely(row, options, structures, texts[row.case_id], out))
            bar.update(1)
    bar.close()
    for case_id, reason in results:
        if reason is None:
            done.append(case_id)
        else:
            failed[case_id] = reason

    spacings = [read_case_meta(out / "cases" / f"{c}.npz")["geometry"]["spacing"][0] for c in done]
    write_index(out, structures=structures, size=options.size, low_size=options.low_size,
                text_encoder=dataclasses.asdict(text_encoder),
                text_hidden=encoder.hidden_size if encoder else (previous or {}).get("text_hidden", 0),
                text_tokens=text_encoder.max_tokens, case_ids=done,
                extra={"options": dataclasses.asdict(options),
                       "spacing_mm": [float(np.median(spacings))] * 3 if spacings else None})
    summary = {"prepared": len(done), "failed": [{"case_id": c, "reason": r} for c, r in sorted(failed.items())]}
    write_json(out / "failed.json", summary)
    return summary
