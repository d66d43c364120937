"""`python -m MedSynLib.generate`: a radiology report in, a synthetic CT and its anatomy out.

Examples:
    python -m MedSynLib.generate --report "Small left pleural effusion." --out out/case1
    python -m MedSynLib.generate --report-file report.txt --out out/case2 --seed 7 --anatomy labels.nii.gz
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from MedSynLib.diffusion.samplers import SAMPLERS
from MedSynLib.errors import (
    EXISTING_FILE,
    EXISTING_FOLDER,
    GUIDANCE,
    LOWPASS_VOXELS,
    OUTPUT_FOLDER,
    SEED,
    STEPS,
    MedSynError,
    read_text,
)
from MedSynLib.geometry import Geometry, fitted_grid, resample
from MedSynLib.io.volumes import check_output_folder, read_anatomy, write_result
from MedSynLib.pipeline.generation import GenerationResult, MedSynPipeline
from MedSynLib.pipeline.model_folder import EMBEDDED_MODEL
from MedSynLib.pipeline.sampling import DTYPE_CHOICES, resolve_device
from MedSynLib.pipeline.tiling import Tiling
from MedSynLib.text_encoder import check_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m MedSynLib.generate", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--report", help="report text")
    source.add_argument("--report-file", type=EXISTING_FILE, help="UTF-8 text file holding the report")
    parser.add_argument("--out", type=OUTPUT_FOLDER, required=True, help="result folder (created; must be empty or new)")
    parser.add_argument("--model", type=EXISTING_FOLDER, default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--steps", type=STEPS, default=None, help="stage-1 sampling steps (default: the model's)")
    parser.add_argument("--stage2-steps", type=STEPS, default=None, help="stage-2 sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=GUIDANCE, default=None, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                        help="default: the model's (ddim_reference for converted reference models)")
    parser.add_argument("--stage2-consistency", type=LOWPASS_VOXELS, default=None, metavar="SIGMA",
                        help="keep stage 1's CT and lungs below a Gaussian low-pass of SIGMA output voxels in "
                             "stage 2 (0 = off; default: the model's)")
    parser.add_argument("--anatomy", type=EXISTING_FILE, default=None,
                        help="label map (anatomy label values) or .seg.nrrd to generate a CT for; "
                             "the result is returned on its grid")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="network arithmetic; auto (default): bfloat16 on CPUs with native bf16, else float32")
    parser.add_argument("--tile", default="auto",
                        help="stage 2 in tiles: auto (64^3 tiles when the whole volume would not fit in memory), "
                             "whole, 64 (slabs of 64 slices) or DxHxW, optional :overlap")
    parser.add_argument("--progress", choices=["bar", "jsonl", "none"], default="bar",
                        help="progress bars (bar), JSON lines on stdout for other programs (jsonl), or nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def read_report(args: argparse.Namespace) -> str:
    return args.report if args.report is not None else read_text(args.report_file, "report file")


class Progress:
    """Progress as tqdm bars, JSON lines (for the Slicer module) or nothing."""

    def __init__(self, mode: str):
        self.mode, self.bars = mode, {}

    def emit(self, event: dict) -> None:
        if self.mode == "jsonl":
            print(json.dumps(event), flush=True)
        elif event["event"] == "log" and self.mode == "bar":
            print(event["message"], file=sys.stderr)

    def __call__(self, stage: str, step: int, steps: int) -> None:
        if self.mode == "bar":
            bar = self.bars.get(stage) or self.bars.setdefault(stage, tqdm(total=steps, desc=stage, unit="step"))
            bar.update(step - bar.n)
            if step == steps:
                bar.close()
        else:
            self.emit({"event": "progress", "stage": stage, "step": step, "steps": steps})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = Progress(args.progress)
    report = read_report(args)
    check_report(report)
    check_output_folder(args.out, overwrite=args.overwrite)
    try:
        tiling = Tiling.parse(args.tile) if args.tile not in ("auto", "whole") else None
    except ValueError as error:
        raise MedSynError(str(error)) from error

    device = resolve_device(args.device)
    model_dir = args.model or EMBEDDED_MODEL
    if args.model is None and not EMBEDDED_MODEL.is_dir():
        raise MedSynError("no embedded model is installed; pass --model (make one: python -m MedSynLib.init_model)")
    pipeline = MedSynPipeline.from_pretrained(model_dir)
    if args.tile == "auto":
        tiling = pipeline.automatic_tiling(device)

    anatomy, grid, given_geometry = None, None, None
    if args.anatomy is not None:
        given, given_geometry = read_anatomy(args.anatomy, pipeline.config.structures)
        grid = fitted_grid(given_geometry, pipeline.stage2.config.size)
        anatomy = {n: resample(m.astype(np.uint8), given_geometry, grid, labels=True).astype(bool)
                   for n, m in given.items()}
    pipeline.check_inputs(report, anatomy, tiling)  # every input, the text encoder too, before the warning
    pipeline.text_encoder  # noqa: B018 - loads it
    if not pipeline.config.trained:
        progress.emit({"event": "log", "message": f"warning: the model in {model_dir} is UNTRAINED (random weights); "
                                                  "its output is noise, useful only to test the tool chain"})

    result = pipeline.generate(
        report, seed=args.seed, steps=args.steps, stage2_steps=args.stage2_steps, guidance=args.guidance,
        sampler=args.sampler, stage2_consistency=args.stage2_consistency, anatomy=anatomy, geometry=grid,
        device=device, dtype=args.dtype, tiling=tiling, progress=progress,
    )
    if given_geometry is not None:
        result = back_to_grid(result, given_geometry)

    out = write_result(result, args.out, overwrite=args.overwrite,
                       extra_metadata={"model": str(model_dir), "anatomy_file": str(args.anatomy or "")})
    progress.emit({"event": "done", "out": str(out)})
    if args.progress == "bar":
        print(f"wrote {out} (synthetic CT, {len(result.masks)} structures)", file=sys.stderr)
    return 0


def back_to_grid(result: GenerationResult, geometry: Geometry) -> GenerationResult:
    """The result resampled onto the grid of the anatomy it was conditioned on."""
    ct = resample(result.ct_hu, result.geometry, geometry, labels=False).astype(np.int16)
    masks = {n: resample(m.astype(np.uint8), result.geometry, geometry, labels=True).astype(bool)
             for n, m in result.masks.items()}
    return replace(result, ct_hu=ct, masks=masks, geometry=geometry)
