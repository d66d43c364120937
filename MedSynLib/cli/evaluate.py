"""`python -m MedSynLib.evaluate`: compare generated chest CTs with real ones (the paper's Table 1 and more).

Examples:
    python -m MedSynLib.evaluate --real data/real --fake out/generated --out reports/run1
    python -m MedSynLib.evaluate --real real.csv --fake out/generated --features inception-2.5d --out reports/run2
    python -m MedSynLib.evaluate --real data/real --fake out/gen --features med3d:resnet_50.pth --out reports/run3

Writes REPORT_DIR/metrics.json (everything, per volume too), table.md (Method | FID | MMD |
Airway) and PNG plots. See docs/evaluation.md for what each number means.
"""

from __future__ import annotations

import argparse
import sys

from MedSynLib.errors import (
    EXISTING_PATH,
    OUTPUT_FOLDER,
    SEED,
    integer_argument,
    number_argument,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m MedSynLib.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=EXISTING_PATH, required=True,
                        help="real (training) volumes: a folder of case folders or volumes, a DICOM folder, "
                             "or a .csv/.jsonl manifest with case_id, ct[, labels, report]")
    parser.add_argument("--fake", type=EXISTING_PATH, required=True, help="generated volumes (result folders of generate)")
    parser.add_argument("--out", type=OUTPUT_FOLDER, required=True, help="report folder (created; must be empty or new)")
    parser.add_argument("--features", default="chest-ct",
                        help="feature extractor: chest-ct (default), med3d:PATH, inception-2.5d, intensity")
    parser.add_argument("--segmenter", default="classical",
                        help="segmenter run on every CT for airway volume and consistency ('none' to skip)")
    parser.add_argument("--method", default="MedSyn", help="name of the generated set's row in table.md")
    parser.add_argument("--bootstrap", type=integer_argument(1, 100_000), default=200,
                        help="bootstrap resamples for the intervals")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (feature extraction)")
    parser.add_argument("--ms-ssim-size", type=integer_argument(16, 512), default=96,
                        help="cube size volumes are resized to for MS-SSIM")
    parser.add_argument("--max-pairs", type=integer_argument(1, 10**6), default=200,
                        help="most volume pairs for MS-SSIM per set")
    parser.add_argument("--copy-factor", type=number_argument(0, 100), default=0.5,
                        help="flag a generated volume as a possible copy when nearer to a real one than this "
                             "times the median nearest-neighbour distance among real volumes")
    parser.add_argument("--no-findings", action="store_true", help="skip the finding detectors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty report folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from MedSynLib.evaluation.runner import EvaluationOptions, run_evaluation

    options = EvaluationOptions(
        features=args.features, segmenter=None if args.segmenter.lower() == "none" else args.segmenter,
        method=args.method, n_bootstrap=args.bootstrap, seed=args.seed, device=args.device,
        ms_ssim_size=args.ms_ssim_size, max_pairs=args.max_pairs, copy_factor=args.copy_factor,
        findings=not args.no_findings,
    )
    metrics = run_evaluation(args.real, args.fake, args.out, options, overwrite=args.overwrite,
                             progress=not args.no_progress)
    d = metrics["distribution"]
    print(f"FD {d['fd']['value']:.4g}, MMD² {d['mmd2']['value']:.4g} ({metrics['settings']['features']}); "
          f"wrote {args.out / 'metrics.json'}, table.md and {len(metrics['plots'])} plot(s)", file=sys.stderr)
    return 0
