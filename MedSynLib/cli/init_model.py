"""`python -m MedSynLib.init_model`: a model folder of a preset with random (untrained) weights.

Lets the whole tool chain run before any trained model exists, and is the starting point
of training. The folder's model_index.json says `"trained": false`, and `generate` warns.
"""

from __future__ import annotations

import argparse
import sys

from MedSynLib.anatomy import STRUCTURE_SETS
from MedSynLib.errors import OUTPUT_FOLDER, SEED
from MedSynLib.pipeline.presets import PRESETS, build_pipeline
from MedSynLib.text_encoder import TextEncoderConfig, encoder_hidden_size


def hu_window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU (e.g. -150,150), got {text!r}") from None
    return low, high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSynLib.init_model", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=OUTPUT_FOLDER, required=True)
    parser.add_argument("--structures", default="lobes", help=f"one of {sorted(STRUCTURE_SETS)} or names joined by ','")
    parser.add_argument("--channel-encoding", choices=["binary", "reference"], default="binary")
    parser.add_argument("--ct-window", type=hu_window, default=None, metavar="LOW,HIGH",
                        help="also generate a soft-tissue window channel over these HU, e.g. -150,150")
    parser.add_argument("--text-encoder", default=None,
                        help="'embedded' (offline MiniLM), 'reference' (CXR-BERT, needs the hub), a hub id or a folder; "
                             "default: reference for the paper preset, embedded otherwise")
    parser.add_argument("--seed", type=SEED, default=0)
    args = parser.parse_args(argv)
    text_encoder = TextEncoderConfig.named(args.text_encoder or ("reference" if args.preset == "paper" else "embedded"))
    pipeline = build_pipeline(
        args.preset, structures=args.structures, channel_encoding=args.channel_encoding, ct_window=args.ct_window,
        text_encoder=text_encoder, text_dim=encoder_hidden_size(text_encoder), seed=args.seed,
    )
    pipeline.save_pretrained(args.out)
    print(f"wrote untrained {args.preset} model to {args.out}", file=sys.stderr)
    return 0
