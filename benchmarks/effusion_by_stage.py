"""Which stage loses the effusion? The detector on stage 1's output and on the final volume.

    python benchmarks/effusion_by_stage.py --model DIR [--seeds 8] [--stage2-time-spacing quadratic]

For the left-, right- and no-effusion reports and the same seeds, runs the effusion detector
(`MedSynLib.evaluation.findings.detect_effusion`, with the generated lung masks) on stage 1's
volume upsampled to the output grid (nearest, as stage 2 receives it) and on stage 2's output.
A detection rate that drops or rises between the two is stage 2's doing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from MedSynLib.diffusion.schedules import TIME_SPACINGS
from MedSynLib.evaluation.findings import detect_effusion
from MedSynLib.pipeline import MedSynPipeline
from MedSynLib.pipeline.sampling import nearest_resize, run_sampler, super_resolve, text_guided_output

REPORTS = {
    "left": "Findings: Moderate left pleural effusion. No pulmonary nodules. Normal heart size.",
    "right": "Findings: There is a moderate right pleural effusion. No pulmonary nodules. Normal heart size.",
    "none": "Findings: No pleural effusion. No pulmonary nodules. Normal heart size.",
}


def detect(pipeline: MedSynPipeline, volume: torch.Tensor) -> dict:
    ct_hu, masks = pipeline.config.layout.decode(pipeline._to_network_axes(volume[0].float()))
    found = detect_effusion(ct_hu.numpy(), pipeline.config.spacing_mm, {n: m.numpy() for n, m in masks.items()})
    return {"side": found.location, **{side: round(ml) for side, ml in found.details["volume_ml"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=1000, help="seeds not used by evaluation.control")
    parser.add_argument("--stage2-steps", type=int, default=None)
    parser.add_argument("--stage2-time-spacing", choices=TIME_SPACINGS, default=None)
    parser.add_argument("--stage2-consistency", type=float, default=None, help="low-pass sigma (voxels); default: the model's")
    args = parser.parse_args()
    pipeline = MedSynPipeline.from_pretrained(args.model)
    s1, s2 = pipeline.stage1.config, pipeline.stage2.config
    if args.stage2_time_spacing:
        s2 = replace(s2, diffusion=replace(s2.diffusion, time_spacing=args.stage2_time_spacing))
    layout = pipeline.config.layout
    channels = layout.num_channels
    consistency = s2.diffusion.lowres_consistency if args.stage2_consistency is None else args.stage2_consistency
    summary = {}
    for name, report in REPORTS.items():
        text = pipeline.encode_report(report)
        stage1_output = text_guided_output(pipeline.stage1.network, text.features, text.mask, s1.diffusion.guidance_scale)
        rows = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            generator = torch.Generator().manual_seed(seed)
            with torch.inference_mode():
                x_T = torch.randn((1, channels) + (s1.size,) * 3, generator=generator)
                low = run_sampler("stage1", stage1_output, x_T, s1, s1.diffusion.num_steps)
                x_T = torch.randn((1, channels) + (s2.size,) * 3, generator=generator)
                high = super_resolve(pipeline.stage2.network, s2, low, x_T, args.stage2_steps or s2.diffusion.num_steps,
                                     ct_channels=layout.ct_channels, exempt_channels=layout.thin_structure_channels,
                                     lung_channels=layout.lung_channels, consistency=consistency)
            upsampled = nearest_resize(low.clamp(-1, 1), s2.size)
            rows.append({"seed": seed, "stage1": detect(pipeline, upsampled), "stage2": detect(pipeline, high)})
            print(json.dumps({"report": name, **rows[-1]}), flush=True)
        summary[name] = {stage: {side: float(np.mean([r[stage]["side"] == side for r in rows])) for side in ("left", "right")}
                         for stage in ("stage1", "stage2")}
    print(json.dumps({"detected_side_rate": summary}))


if __name__ == "__main__":
    main()
