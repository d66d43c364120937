"""How precisely does each stage's denoiser give back a known volume, per noise level t?

    python benchmarks/denoiser_precision.py --model DIR --data32 PREPARED_LOW --data128 PREPARED_HIGH

A sample can be no more precise than the x_0 estimate of the sampler's last steps. Here each
network gets x_t = alpha_t x_0 + sigma_t noise of a prepared case (with the case's report for
stage 1, and the case's own nearest x1/4 volume as the stage-2 condition) and its x_0 estimate
is compared with x_0 in the case's soft tissue (-200..300 HU), where fluid (10 HU) and muscle
(40 HU) must stay apart: mean error (bias) and standard deviation, in HU.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from MedSynLib.data.prepared import PreparedDataset
from MedSynLib.diffusion.schedules import add_noise, prediction_to_x0
from MedSynLib.pipeline import MedSynPipeline
from MedSynLib.pipeline.channels import ChannelLayout
from MedSynLib.pipeline.sampling import nearest_resize, super_resolution_output

TIMES = (0.02, 0.1, 0.3, 0.5, 0.7, 0.9)


def soft_tissue_error(layout: ChannelLayout, x0_hat: torch.Tensor, x0: torch.Tensor) -> tuple[float, float]:
    truth = layout.decode(x0[0])[0].float().numpy()
    error = layout.decode(x0_hat[0])[0].float().numpy() - truth
    soft = (truth > -200) & (truth < 300)
    return float(error[soft].mean()), float(error[soft].std())


def stage_errors(stage, layout: ChannelLayout, x0: torch.Tensor, output_fn, seed: int) -> dict[float, tuple[float, float]]:
    diffusion = stage.config.diffusion
    schedule = diffusion.make_schedule()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = {}
    for value in TIMES:
        t = torch.tensor([value])
        x_t = add_noise(x0, noise, t, schedule)
        with torch.inference_mode():
            x0_hat = prediction_to_x0(output_fn(x_t, t), x_t, t, schedule, diffusion.prediction_type).clamp(-1, 1)
        rows[value] = soft_tissue_error(layout, x0_hat, x0)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data32", required=True, help="prepared dataset at the stage-1 size")
    parser.add_argument("--data128", required=True, help="prepared dataset at the stage-2 size")
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args()
    pipeline = MedSynPipeline.from_pretrained(args.model)
    layout = pipeline.config.layout
    results: dict[str, dict[float, list[tuple[float, float]]]] = {"stage1": {}, "stage2": {}}

    low_data = PreparedDataset(args.data32)
    for index in range(min(args.cases, len(low_data))):
        case = low_data.load(index, low_only=True)
        text = torch.from_numpy(case.text_features.astype(np.float32))[None]
        mask = torch.from_numpy(case.text_mask)[None]

        def stage1_output(x, t, text=text, mask=mask):
            return pipeline.stage1.network(x, t, text=text, text_mask=mask)

        x0 = layout.encode_arrays(case.ct_hu_low, case.masks_low)[None]
        for t, row in stage_errors(pipeline.stage1, layout, x0, stage1_output, index).items():
            results["stage1"].setdefault(t, []).append(row)

    high_data = PreparedDataset(args.data128)
    factor = high_data.size // high_data.low_size
    for index in range(min(args.cases, len(high_data))):
        case = high_data.load(index)
        x0 = layout.encode_arrays(case.ct_hu, case.masks)[None]
        condition = nearest_resize(x0[:, :, ::factor, ::factor, ::factor], high_data.size)
        output = super_resolution_output(pipeline.stage2.network, condition, None)
        for t, row in stage_errors(pipeline.stage2, layout, x0, output, index).items():
            results["stage2"].setdefault(t, []).append(row)

    for stage, per_t in results.items():
        prediction = getattr(pipeline, stage).config.diffusion.prediction_type
        for t, rows in per_t.items():
            bias, spread = np.mean(rows, axis=0)
            print(json.dumps({"stage": stage, "prediction": prediction, "t": t, "cases": len(rows),
                              "soft_tissue_bias_hu": round(float(bias), 1), "soft_tissue_std_hu": round(float(spread), 1)}))


if __name__ == "__main__":
    main()
