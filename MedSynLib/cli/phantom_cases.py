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
import sys

from MedSynLib.errors import MAX_SEED, OUTPUT_FOLDER, WORKERS, integer_argument
from MedSynLib.phantoms.cases import FINDING_DESIGNS, write_phantom_cases


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
