"""How few sampling steps keep the quality: each sampler and step count against a many-step solution.

    python benchmarks/few_steps.py [--model DIR] [--seeds 4] [--steps 2,3,4,6,8,12,16] [--reference-steps 100]

For each seed and report, stage 1 is solved with a many-step DDIM (the reference solution of
the same noise); then every sampler x step count starts from the same x_T and its result is
compared with that reference: RMS of the CT difference in HU, and Dice of each anatomy channel.
Stage 2 is measured the same way given the reference stage-1 volume, so the two stages' errors
do not mix. Prints one JSON line per (stage, sampler, steps) with the means over seeds and reports
(and each single comparison on stderr as it is made). Nearly all the time is stage 2 at 128^3:
on 2 cores the defaults take about 45 min, `--seeds 1 --steps 2,3,4,8 --reference-steps 32` about 6.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from MedSynLib.pipeline import EMBEDDED_MODEL, MedSynPipeline
from MedSynLib.pipeline.sampling import (
    nearest_resize,
    run_sampler,
    super_resolution_output,
    text_guided_output,
)

REPORTS = (
    "Findings: Moderate left pleural effusion. Impression: Left pleural effusion.",
    "Findings: The lungs are clear. No effusion. The heart is not enlarged. Impression: Normal chest CT.",
)


def compare(pipeline: MedSynPipeline, x: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """RMS HU difference of the CT channel and mean Dice of the anatomy channels."""
    layout = pipeline.config.layout
    hu, masks = layout.decode(x[0].float())
    truth_hu, truth = layout.decode(reference[0].float())
    rms = float((hu.float() - truth_hu.float()).pow(2).mean().sqrt())
    dice = [float(2 * (masks[n] & truth[n]).sum() / max(1, int(masks[n].sum() + truth[n].sum()))) for n in truth
            if truth[n].any()]
    return {"rms_hu": rms, "dice": statistics.mean(dice) if dice else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", default="2,3,4,6,8,12,16")
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--samplers", default="ddim,dpm++2m")
    args = parser.parse_args()
    pipeline = MedSynPipeline.from_pretrained(args.model)
    s1, s2 = pipeline.stage1, pipeline.stage2
    channels, guidance = pipeline.config.layout.num_channels, s1.config.diffusion.guidance_scale
    rows: dict[tuple[str, str, int], list[dict]] = {}
    for report in REPORTS:
        text = pipeline.encode_report(report)
        stage1 = text_guided_output(s1.network, text.features, text.mask, guidance)
        for seed in range(args.seeds):
            generator = torch.Generator().manual_seed(seed)
            x_low = torch.randn((1, channels) + (s1.config.size,) * 3, generator=generator)
            x_high = torch.randn((1, channels) + (s2.config.size,) * 3, generator=generator)
            low_ref = run_sampler("stage1", stage1, x_low, s1.config, args.reference_steps, sampler_name="ddim")
            stage2 = super_resolution_output(s2.network, nearest_resize(low_ref.clamp(-1, 1), s2.config.size), None)
            high_ref = run_sampler("stage2", stage2, x_high, s2.config, args.reference_steps // 4, sampler_name="ddim")
            for sampler in args.samplers.split(","):
                for steps in map(int, args.steps.split(",")):
                    low = run_sampler("stage1", stage1, x_low, s1.config, steps, sampler_name=sampler)
                    high = run_sampler("stage2", stage2, x_high, s2.config, steps, sampler_name=sampler)
                    for stage, x, reference in (("stage1", low, low_ref), ("stage2", high, high_ref)):
                        rows.setdefault((stage, sampler, steps), []).append(compare(pipeline, x, reference))
                        print(json.dumps({"stage": stage, "sampler": sampler, "steps": steps, "seed": seed,
                                          **rows[(stage, sampler, steps)][-1]}), file=sys.stderr, flush=True)
    for (stage, sampler, steps), values in sorted(rows.items()):
        print(json.dumps({"stage": stage, "sampler": sampler, "steps": steps, "n": len(values),
                          "rms_hu_vs_reference": round(statistics.mean(v["rms_hu"] for v in values), 1),
                          "dice_vs_reference": round(statistics.mean(v["dice"] for v in values), 3),
                          "reference_steps": args.reference_steps if stage == "stage1" else args.reference_steps // 4}))


if __name__ == "__main__":
    main()
