"""Folders of phantom cases (NIfTI CT, label map, report in a manifest) that go through the same
`prepare` -> `train` path as real scans; `--findings balanced` gives every combination of
effusion side, cardiomegaly and nodule lobe equally often.
"""

from __future__ import annotations

import contextlib
import csv
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import SimpleITK as sitk
from tqdm import tqdm

from MedSynLib.anatomy import STRUCTURE_SETS, masks_to_label_map
from MedSynLib.errors import MedSynError
from MedSynLib.geometry import Geometry
from MedSynLib.phantoms.chest import VISIBLE_LESIONS, balanced_findings, make_phantom

FINDING_DESIGNS = ("random", "balanced")


def write_phantom_case(out: Path, size: int, case_seed: int, design: str = "random") -> dict[str, str]:
    """One phantom's CT and label map as NIfTI; returns its manifest row."""
    if design == "balanced":
        phantom = make_phantom(size, seed=case_seed, findings=balanced_findings(case_seed), lesions=VISIBLE_LESIONS)
    else:
        phantom = make_phantom(size, seed=case_seed)
    geometry = Geometry.centered(phantom.ct_hu.shape, phantom.spacing)
    case_id = f"phantom_{case_seed:05d}"
    ct_path, labels_path = out / "volumes" / f"{case_id}_ct.nii.gz", out / "volumes" / f"{case_id}_labels.nii.gz"
    sitk.WriteImage(geometry.image(phantom.ct_hu), str(ct_path), True)
    masks = {name: phantom.masks[name] for name in STRUCTURE_SETS["lobes"]}
    sitk.WriteImage(geometry.image(masks_to_label_map(masks)), str(labels_path), True)
    findings = ";".join(f"{f.kind}:{f.location or ''}" for f in phantom.findings)
    return {"case_id": case_id, "ct": ct_path.relative_to(out).as_posix(),
            "labels": labels_path.relative_to(out).as_posix(), "report": phantom.report, "findings": findings}


def write_phantom_cases(out: Path, count: int, *, size: int = 128, seed: int = 0, workers: int = 1,
                        findings: str = "random") -> Path:
    """Write `count` phantoms (seeds seed..seed+count-1) and manifest.csv; returns the manifest."""
    if count < 1:
        raise MedSynError("count must be at least 1")
    if findings not in FINDING_DESIGNS:
        raise MedSynError(f"findings must be one of {FINDING_DESIGNS}, got {findings!r}")
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    seeds = range(seed, seed + count)
    with ProcessPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        results = pool.map(write_phantom_case, repeat(out), repeat(size), seeds, repeat(findings)) if pool else (
            write_phantom_case(out, size, s, findings) for s in seeds)
        rows = list(tqdm(results, total=count, desc="phantoms", unit="case"))
    manifest = out / "manifest.csv"
    with open(manifest, "w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
