"""`python -m MedSynLib.train`: train either MedSyn stage on a prepared dataset, one GPU to many.

    python -m MedSynLib.train stage1 --data prepared/ --out runs/s1 [--config cfg.yaml] [key=value ...] [--resume]
    torchrun --nproc_per_node 4 -m MedSynLib.train stage2 --data prepared/ --out runs/s2
    python -m MedSynLib.train export --run runs/s1 --run runs/s2 --out models/mine

The recipe follows the reference (AdamW 1e-4, weight decay 0.01, batch 1 x accumulation 4,
gradient clipping 1.0, EMA 0.999 from step 10k, text dropped with p = 0.1, x0 objective).
Every sample is a function of (seed, sample number), so `--resume` continues exactly and
N processes with batch b train exactly like one process with batch N*b. Checkpoints
(safetensors + JSON) are written to a temporary folder, fsynced and renamed; the last K
are kept and an unreadable one is skipped for the one before.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from MedSynLib.errors import (
    EXISTING_FILE,
    EXISTING_FOLDER,
    OUTPUT_FOLDER,
    MedSynError,
)
from MedSynLib.training.config import STAGES, resolve_config
from MedSynLib.training.export import export
from MedSynLib.training.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSynLib.train", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*STAGES, "export"])
    parser.add_argument("overrides", nargs="*", help="key=value settings of TrainConfig")
    parser.add_argument("--data", type=EXISTING_FOLDER, help="prepared dataset folder")
    parser.add_argument("--out", type=OUTPUT_FOLDER, required=True, help="run folder (or model folder for export)")
    parser.add_argument("--config", type=EXISTING_FILE, default=None, help="YAML or JSON file of TrainConfig settings")
    parser.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint")
    parser.add_argument("--run", type=EXISTING_FOLDER, action="append", default=[],
                        help="export: a run folder (one per stage)")
    parser.add_argument("--base", type=EXISTING_FOLDER, default=None,
                        help="export: a model folder giving the stage without a run")
    args = parser.parse_intermixed_args(argv)
    if args.command == "export":
        print(f"wrote {export(args.run, args.out, base=args.base)}", file=sys.stderr)
        return 0
    if args.data is None:
        raise MedSynError("--data is required for training")
    config = resolve_config(args.config, args.overrides)
    existed = args.out.exists()
    try:
        train(args.command, args.data, args.out, config, resume=args.resume)
    except BaseException:  # a run that failed before its first checkpoint leaves nothing behind
        if not existed and not any((args.out / "checkpoints").glob("step_*")):
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    return 0
