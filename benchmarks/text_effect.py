"""How much does the report change a stage-1 prediction? A cheap probe of text control.

    python benchmarks/text_effect.py [--model DIR] [--weights CHECKPOINT.safetensors] [--data PREPARED] [--t 0.85]

For prepared cases without an effusion: noise a case to time t, predict x0 with the built-in
left-effusion, right-effusion and normal prompts, and print the mean predicted HU in the
posterior half of each lung. A model that follows the report puts fluid (higher HU) on the
side asked for; one that ignores it prints the same numbers for every prompt. Four forward
passes per case instead of whole generations, so it can follow a training run.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from MedSynLib.anatomy import LEFT_LOBES, RIGHT_LOBES
from MedSynLib.data.prepared import PreparedDataset
from MedSynLib.diffusion.schedules import add_noise
from MedSynLib.evaluation.control import DEFAULT_PROMPTS
from MedSynLib.evaluation.findings import asks_for
from MedSynLib.pipeline.generation import MedSynPipeline
from MedSynLib.pipeline.model_folder import EMBEDDED_MODEL, load_weights

PROMPTS = {"left effusion": DEFAULT_PROMPTS[0], "right effusion": DEFAULT_PROMPTS[1], "normal": DEFAULT_PROMPTS[5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=EMBEDDED_MODEL)
    parser.add_argument("--weights", type=Path, help="stage-1 weights to use instead (a training checkpoint)")
    parser.add_argument("--pooled-text", action="store_true", help="the weights have the pooled-text path")
    parser.add_argument("--data", type=Path, default=Path("out/demo/data64"), help="prepared 64^3 dataset")
    parser.add_argument("--t", type=float, default=0.85)
    parser.add_argument("--cases", type=int, default=2)
    args = parser.parse_args()
    pipeline = MedSynPipeline.from_pretrained(args.model)
    config = pipeline.stage1.config
    network = pipeline.stage1.network
    if args.weights:
        network = type(network)(replace(config.network, pooled_text=args.pooled_text))
        load_weights(network, args.weights, source=str(args.weights))
    network.eval()
    layout, schedule = pipeline.config.layout, config.diffusion.make_schedule()
    features = {name: pipeline.encode_report(report) for name, report in PROMPTS.items()}
    dataset = PreparedDataset(args.data)
    cases = (dataset.load(i, low_only=True) for i in range(len(dataset)))
    for i, case in enumerate(islice((c for c in cases if not asks_for(c.report, "effusion")), args.cases)):
        x0 = layout.encode_arrays(case.ct_hu_low, case.masks_low)[None]
        t = torch.tensor([args.t])
        x_t = add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(i)), t, schedule)
        regions = {}
        for side, lobes in (("left", LEFT_LOBES), ("right", RIGHT_LOBES)):
            lung = np.logical_or.reduce([case.masks_low[n] for n in lobes])
            posterior = np.zeros_like(lung)
            posterior[:, int(np.nonzero(lung)[1].mean()):, :] = True
            regions[side] = torch.from_numpy(lung & posterior)
        for name, text in features.items():
            with torch.no_grad():
                hu, _ = layout.decode(network(x_t, t, text=text.features, text_mask=text.mask)[0])
            means = ", ".join(f"{side} {float(hu[r].float().mean()):7.1f}" for side, r in regions.items())
            print(f"case {case.case_id}, t {args.t}, report '{name}': mean predicted HU in the posterior lungs: {means}")


if __name__ == "__main__":
    main()
