"""`python -m MedSynLib.prepare`: chest CTs + reports -> a training-ready dataset, in one command.

    python -m MedSynLib.prepare --manifest cases.csv --out prepared/ [--segmenter classical] [--workers 2]
    python -m MedSynLib.prepare --from-ct-rate reports.csv volumes/ --write-manifest cases.csv

The manifest (CSV or JSONL) has one row per case: `case_id`, `ct` (a DICOM series folder,
or a NIfTI / NRRD / MHA file), `report` (the text) or `report_file`, and optionally
`labels` (a label map with MedSyn label values) and `mask_<structure>` (binary masks) that
replace what the segmenter would find. Relative paths are relative to the manifest.

For each case: read, check it is a calibrated CT, reorient to LPS, segment the anatomy,
take a cubic field of view around the lungs (with a margin), resample it to the stage-2
grid (linear for the CT, by fraction > 0.5 for masks) and, by nearest-neighbour x1/4 as
the reference does, to the stage-1 grid; encode the report; write one compressed case
file. Finished cases are skipped when run again; failures are listed with their reason
in failed.json and do not stop the others; the command fails only if every case failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from MedSynLib.anatomy import STRUCTURE_SETS
from MedSynLib.data.prepare import GRID_SIZE, PrepareOptions, ct_rate_manifest, prepare
from MedSynLib.errors import (
    EXISTING_FILE,
    EXISTING_PATH,
    OUTPUT_FILE,
    OUTPUT_FOLDER,
    WORKERS,
    MedSynError,
    number_argument,
)
from MedSynLib.text_encoder import TextEncoderConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSynLib.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=EXISTING_FILE, help="CSV or JSONL, one row per case")
    parser.add_argument("--out", type=OUTPUT_FOLDER, help="prepared dataset folder")
    parser.add_argument("--segmenter", default="classical", help="classical (no weights) or totalsegmentator")
    parser.add_argument("--structures", default="", help=f"structure set {sorted(STRUCTURE_SETS)} (default: the segmenter's)")
    parser.add_argument("--size", type=GRID_SIZE, default=256, help="stage-2 grid size")
    parser.add_argument("--low-size", type=GRID_SIZE, default=64, help="stage-1 grid size")
    parser.add_argument("--margin-mm", type=number_argument(0, 1000), default=15.0, help="margin around the lungs")
    parser.add_argument("--workers", type=WORKERS, default=1, help="cases processed in parallel")
    parser.add_argument("--text-encoder", default="embedded",
                        help="'embedded' (offline MiniLM, default), 'reference' (CXR-BERT as in the paper; needs the "
                             "hub), a Hugging Face id or a folder")
    parser.add_argument("--from-ct-rate", nargs=2, type=EXISTING_PATH, metavar=("REPORTS_CSV", "VOLUMES_DIR"),
                        help="write a manifest for CT-RATE-style data (with --write-manifest) and stop")
    parser.add_argument("--write-manifest", type=OUTPUT_FILE, help="where --from-ct-rate writes the manifest")
    args = parser.parse_args(argv)
    if args.from_ct_rate:
        if not args.write_manifest:
            raise MedSynError("--from-ct-rate needs --write-manifest FILE")
        count = ct_rate_manifest(*args.from_ct_rate, args.write_manifest)
        print(f"wrote {args.write_manifest} with {count} cases", file=sys.stderr)
        return 0
    if not args.manifest or not args.out:
        raise MedSynError("--manifest and --out are required")
    options = PrepareOptions(args.size, args.low_size, args.margin_mm, args.segmenter, args.structures)
    existed = args.out.exists()
    summary = prepare(args.manifest, args.out, options, workers=args.workers,
                      text_encoder=TextEncoderConfig.named(args.text_encoder))
    failed = summary["failed"]
    if summary["prepared"] == 0:  # nothing of use was made: leave nothing behind, say why in one line
        if not existed:
            shutil.rmtree(args.out, ignore_errors=True)
        first = failed[0] if failed else {"case_id": "-", "reason": "no case"}
        raise MedSynError(f"every case failed ({len(failed)}); case {first['case_id']}: {first['reason']}")
    for failure in failed:
        print(f"medsyn: case {failure['case_id']} failed: {failure['reason']}", file=sys.stderr)
    print(f"prepared {summary['prepared']} case(s), {len(failed)} failed; see {args.out / 'failed.json'}",
          file=sys.stderr)
    return 0
