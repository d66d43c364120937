"""Time and peak memory of one denoising step (one network forward) of a stage.

    python benchmarks/bench_step.py --preset tiny --stage 1
    python benchmarks/bench_step.py --preset paper --stage 2 --size 128 --tile 64
    python benchmarks/bench_step.py --preset paper --stage 2 --size 128 --tile 64 --device cuda --dtype bfloat16

Each run measures one configuration in a fresh process, so the peak resident memory
(CPU) or peak allocated memory (CUDA) belongs to that configuration alone. Stage 1 is
measured with the doubled batch of classifier-free guidance unless --guidance 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from MedSynLib.networks.unet import UNet3D
from MedSynLib.pipeline.presets import stage_configs
from MedSynLib.pipeline.sampling import DTYPES, resolve_device
from MedSynLib.pipeline.tiling import Tiling, apply_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True)
    parser.add_argument("--size", type=int, default=None, help="cube side (default: the preset's)")
    parser.add_argument("--tile", default=None, help="stage-2 tiling, e.g. 64 (slabs) or 64x128x128")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--text-dim", type=int, default=768)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    device = resolve_device(args.device)
    stage1, stage2 = stage_configs(args.preset, channels=args.channels, text_dim=args.text_dim)
    config = stage1 if args.stage == 1 else stage2
    size = args.size or config.size
    torch.manual_seed(0)
    network = UNet3D(config.network).eval().to(device)
    batch = 2 if args.stage == 1 and args.guidance != 1 else 1
    x = torch.randn(batch, args.channels, size, size, size, device=device)
    t = torch.full((batch,), 0.5, device=device)
    text = torch.randn(batch, 192, args.text_dim, device=device)
    tiling = Tiling.parse(args.tile) if args.tile else None

    def step() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, DTYPES[args.dtype], enabled=args.dtype != "float32"):
            if args.stage == 1:
                return network(x, t, text=text)
            return apply_network(lambda v: network(v[:, : args.channels], t, cond=v[:, args.channels :]),
                                 torch.cat([x, x], dim=1), tiling)

    times = []
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({
        "preset": args.preset, "stage": args.stage, "size": size, "tile": args.tile, "batch": batch,
        "device": str(device), "dtype": args.dtype, "params_M": round(sum(p.numel() for p in network.parameters()) / 1e6, 1),
        "step_s_min": round(min(times), 3), "step_s_all": [round(v, 3) for v in times],
        "peak_memory_GB": round(peak / 2**30, 2), "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }))


if __name__ == "__main__":
    main()
