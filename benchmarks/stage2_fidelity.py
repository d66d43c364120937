"""Stage 2 alone: given the true low-resolution volume of prepared cases, how close is its output to the truth?

    python benchmarks/stage2_fidelity.py --model DIR --data PREPARED [--cases 2] [--steps 1,3,10] [--time-spacing quadratic]
        [--consistency 0,1.5]

Separates stage 2's error from stage 1's: the condition is the case's own nearest x1/4 grid
(as in training), so a perfect stage 2 would give the case back. Per step count: the soft-tissue
HU distribution (median, 10th and 90th percentile of voxels in -200..300 HU, against the truth's),
the mean error (a density bias) and the RMS error in HU, and the same for nearest-neighbour
upsampling of the condition (what the output would be with no stage 2), per low-frequency
consistency sigma (`diffusion.consistency`; 0 = off). Each row also gives the
fluid volume (mL, left / right) the effusion detector finds with the case's own lung masks, so
that a stage 2 which loses or invents an effusion shows against the truth's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from MedSynLib.data.prepared import PreparedDataset
from MedSynLib.diffusion.schedules import TIME_SPACINGS
from MedSynLib.evaluation.findings import detect_effusion
from MedSynLib.hounsfield import MODEL_HU_RANGE
from MedSynLib.pipeline import MedSynPipeline
from MedSynLib.pipeline.sampling import nearest_resize, super_resolve


def soft_tissue(hu: np.ndarray) -> dict[str, float]:
    values = hu[(hu > -200) & (hu < 300)]
    return {"median": float(np.median(values)), "p10": float(np.percentile(values, 10)),
            "p90": float(np.percentile(values, 90))}


def errors(hu: np.ndarray, truth: np.ndarray, masks: dict[str, np.ndarray], spacing) -> dict[str, float]:
    difference = hu.astype(np.float32) - truth
    fluid = detect_effusion(hu, spacing, masks).details["volume_ml"]
    return {"mean_error_hu": float(difference.mean()), "rms_error_hu": float(np.sqrt((difference**2).mean())),
            **soft_tissue(hu), "effusion_left_ml": fluid["left"], "effusion_right_ml": fluid["right"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="prepared dataset at the stage-2 size")
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--steps", default="1,3,10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-spacing", choices=TIME_SPACINGS, default=None, help="default: the model's")
    parser.add_argument("--consistency", default="0", help="low-pass sigmas (voxels) to compare, 0 = off")
    args = parser.parse_args()
    pipeline, dataset = MedSynPipeline.from_pretrained(args.model), PreparedDataset(args.data)
    stage2, layout = pipeline.stage2, pipeline.config.layout
    config = stage2.config
    if args.time_spacing:
        config = replace(config, diffusion=replace(config.diffusion, time_spacing=args.time_spacing))
    if dataset.size != stage2.config.size:
        raise SystemExit(f"the dataset's grid is {dataset.size}^3, stage 2 makes {stage2.config.size}^3")
    for index in range(min(args.cases, len(dataset))):
        case = dataset.load(index)
        truth = np.clip(case.ct_hu, *MODEL_HU_RANGE).astype(np.float32)
        full = layout.encode_arrays(case.ct_hu, case.masks)
        factor = dataset.size // dataset.low_size
        low = full[None, :, ::factor, ::factor, ::factor]
        condition = nearest_resize(low, dataset.size)
        spacing = pipeline.config.spacing_mm
        rows = {"truth": errors(truth, truth, case.masks, spacing),
                "nearest upsampling": errors(layout.decode(condition[0])[0].numpy(), truth, case.masks, spacing)}
        for sigma in map(float, args.consistency.split(",")):
            for steps in map(int, args.steps.split(",")):
                x_T = torch.randn(condition.shape, generator=torch.Generator().manual_seed(args.seed))
                with torch.inference_mode():
                    high = super_resolve(stage2.network, config, low, x_T, steps, ct_channels=layout.ct_channels,
                                         exempt_channels=layout.thin_structure_channels,
                                         lung_channels=layout.lung_channels, consistency=sigma)
                name = f"stage 2, {steps} steps" + (f", consistency {sigma:g}" if sigma else "")
                rows[name] = errors(layout.decode(high[0])[0].numpy(), truth, case.masks, spacing)
        print(json.dumps({"case": dataset.case_ids[index],
                          **{k: {m: round(v, 1) for m, v in r.items()} for k, r in rows.items()}}), flush=True)


if __name__ == "__main__":
    main()
