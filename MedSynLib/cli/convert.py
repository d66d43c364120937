"""`python -m MedSynLib.convert`: import the reference implementation's released checkpoints.

    python -m MedSynLib.convert reference --stage1 PATH --stage2 PATH \\
        [--text-encoder DIR|reference|embedded] [--weights ema|model] [--up-order evaluation|training] \\
        --out MODEL_DIR

What is read, refused and converted, and how: pipeline/convert.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from MedSynLib.configuration import config_from_dict
from MedSynLib.errors import MedSynError
from MedSynLib.networks.reference import (
    UP_ORDERS,
    ReferenceUNetConfig,
    reference_stage1_config,
    reference_stage2_config,
)
from MedSynLib.pipeline.convert import WEIGHT_CHOICES, convert_reference


def _network_config(path: str | None, default: ReferenceUNetConfig) -> ReferenceUNetConfig:
    if path is None:
        return default
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MedSynError(f"cannot read network config {path}: {error}") from error
    return config_from_dict(ReferenceUNetConfig, data, source=str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSynLib.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ref = commands.add_parser("reference", help="import the reference implementation's two checkpoints")
    ref.add_argument("--stage1", required=True, help="stage-1 weights file or accelerate checkpoint folder")
    ref.add_argument("--stage2", required=True, help="stage-2 weights file or accelerate checkpoint folder")
    ref.add_argument("--text-encoder", default=None,
                     help="fine-tuned CXR-BERT folder (copied in), a hub id, 'reference' (default) or 'embedded'; "
                          "with --text-encoder-weights: the base encoder")
    ref.add_argument("--text-encoder-weights", default=None,
                     help="the authors' fine-tuned encoder state dict (pytorch_model.bin): loaded onto the base "
                          "with positions extended to 2048, saved whole into the model folder")
    ref.add_argument("--weights", choices=WEIGHT_CHOICES, default=None,
                     help="both stages' weights (default: what the authors' scripts load: stage 1 ema, stage 2 model)")
    ref.add_argument("--up-order", choices=UP_ORDERS, default=None,
                     help="both stages' up levels: the reference's evaluation scripts' order (default) or its "
                          "training scripts' (upsampling right after each level's first block)")
    ref.add_argument("--out", required=True, help="model folder to write (must not exist or be empty)")
    ref.add_argument("--stage1-config", help="JSON ReferenceUNetConfig (default: the released stage-1 sizes)")
    ref.add_argument("--stage2-config", help="JSON ReferenceUNetConfig (default: the released stage-2 sizes)")
    ref.add_argument("--stage1-size", type=int, default=64)
    ref.add_argument("--stage2-size", type=int, default=256)
    args = parser.parse_args(argv)
    networks = [_network_config(args.stage1_config, reference_stage1_config()),
                _network_config(args.stage2_config, reference_stage2_config())]
    if args.up_order is not None:
        networks = [dataclasses.replace(n, up_order=args.up_order) for n in networks]
    pipeline, report = convert_reference(
        args.stage1, args.stage2, args.out, text_encoder=args.text_encoder,
        text_encoder_weights=args.text_encoder_weights, weights=args.weights,
        stage1_network=networks[0], stage2_network=networks[1],
        stage1_size=args.stage1_size, stage2_size=args.stage2_size,
    )
    print("\n".join(report))
    print(f"wrote {args.out}: stage 1 {sum(p.numel() for p in pipeline.stage1.network.parameters()):,} parameters, "
          f"stage 2 {sum(p.numel() for p in pipeline.stage2.network.parameters()):,}")
    return 0
