"""Does the report move the lungs? Lung volumes per side for left / right / no effusion reports.

    python benchmarks/effusion_room.py [--model DIR] [--seeds 8] [--stage2-steps 1]

An effusion takes the room of the lung on its side, so a model that follows the report draws a
smaller lung there than for a "no effusion" report from the same seed. This measure needs only
the generated lobe masks, not the fluid's exact Hounsfield units (which the finding detectors
of `MedSynLib.evaluation.control` need), so it shows text control a model has learned before its
CT intensities are calibrated enough for the detectors.
"""

from __future__ import annotations

import argparse

import numpy as np

from MedSynLib.anatomy import standard_masks
from MedSynLib.evaluation.control import DEFAULT_PROMPTS
from MedSynLib.pipeline.generation import MedSynPipeline
from MedSynLib.pipeline.model_folder import EMBEDDED_MODEL

PROMPTS = {"left effusion": DEFAULT_PROMPTS[0], "right effusion": DEFAULT_PROMPTS[1], "normal": DEFAULT_PROMPTS[5]}


def lung_volumes(pipeline: MedSynPipeline, report: str, seed: int, stage2_steps: int) -> dict[str, float]:
    result = pipeline.generate(report, seed=seed, stage2_steps=stage2_steps)
    masks = standard_masks(result.masks)
    voxel_ml = float(np.prod(result.geometry.spacing)) / 1000
    return {side: float(masks[f"{side}_lung"].sum()) * voxel_ml for side in ("left", "right")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--stage2-steps", type=int, default=1)
    args = parser.parse_args()
    pipeline = MedSynPipeline.from_pretrained(args.model)
    volumes = {name: [lung_volumes(pipeline, report, seed, args.stage2_steps) for seed in range(args.seeds)]
               for name, report in PROMPTS.items()}
    print(f"{args.seeds} seeds; mean lung volume (mL) and how often the named side's lung is smaller than "
          f"for the normal report of the same seed\n")
    print("| report | left lung | right lung | smaller than normal on the named side |\n|---|---|---|---|")
    for name in PROMPTS:
        left, right = (np.mean([v[side] for v in volumes[name]]) for side in ("left", "right"))
        side = name.split()[0]
        if side in ("left", "right"):
            smaller = np.mean([v[side] < n[side] for v, n in zip(volumes[name], volumes["normal"], strict=True)])
            share = f"{smaller:.0%}"
        else:
            share = "-"
        print(f"| {name} | {left:.0f} | {right:.0f} | {share} |")


if __name__ == "__main__":
    main()
