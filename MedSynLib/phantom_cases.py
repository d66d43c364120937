"""`python -m MedSynLib.phantom_cases`: a folder of phantom CTs, label maps and a manifest for `prepare`.

    python -m MedSynLib.phantom_cases --out phantoms/ --count 64 --size 160 [--seed 0] [--findings balanced]

Each case is a NIfTI CT (int16 HU), a NIfTI label map of the lobes, airway and vessels
(MedSyn label values) and a report in the manifest, so phantoms go through the same
`prepare` -> `train` path as real scans. `--findings random` draws each case's findings
from its seed (often none); `--findings balanced` gives every combination of effusion side,
cardiomegaly and nodule lobe equally often, with lesions large enough for a 32^3 stage 1
(a set made for teaching a model the report).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import SimpleITK as sitk
from tqdm import tqdm

from .anatomy import STRUCTURE_SETS, masks_to_label_map
from .errors import MAX_SEED, OUTPUT_FOLDER, WORKERS, MedSynError, integer_argument, run_command
from .geometry import Geometry
from .phantom import VISIBLE_LESIONS, balanced_findings, make_phantom

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSynLib.phantom_cases", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=OUTPUT_FOLDER, required=True)
    parser.add_argument("--count", type=integer_argument(1, 100_000), default=16)
    parser.add_argument("--size", type=integer_argument(16, 512), default=128)
    parser.add_argument("--seed", type=integer_argument(0, MAX_SEED - 100_000), default=0)
    parser.add_argument("--workers", type=WORKERS, default=1, help="phantoms made in parallel")
    parser.add_argument("--findings", choices=FINDING_DESIGNS, default="random",
                        help="random: drawn from each seed; balanced: every combination equally often")
    args = parser.parse_args(argv)
    manifest = write_phantom_cases(args.out, args.count, size=args.size, seed=args.seed, workers=args.workers,
                                   findings=args.findings)
    print(f"wrote {manifest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
