"""Time and peak memory of one denoising step (one network forward) of a stage.

    python benchmarks/bench_step.py --preset tiny --stage 1
    python benchmarks/bench_step.py --preset paper --stage 2 --size 128 --tile 64
    python benchmarks/bench_step.py --preset paper --stage 2 --size 128 --tile 64 --device cuda --dtype bfloat16
    python benchmarks/bench_step.py --preset paper --stage 2 --size 256 --tile 64x64x64 --max-tiles 2

Each run measures one configuration in a fresh process, so the peak resident memory
(CPU) or peak allocated memory (CUDA) belongs to that configuration alone. Stage 1 is
measured with the doubled batch of classifier-free guidance unless --guidance 1.

--max-tiles K stops a tiled step after its first K tiles: the tiles all have one shape and the
whole-volume buffers (inputs, blended output, weights) are allocated before the first tile
is stitched, so the peak memory is already reached, and the step time is the time per tile
times the tile count. It makes stage 2 of the paper preset at 256^3 measurable on a CPU,
where the full step takes over an hour.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import time

import torch

from MedSynLib.networks.unet import UNet3D
from MedSynLib.pipeline.presets import stage_configs
from MedSynLib.pipeline.sampling import DTYPES, resolve_device, super_resolution_output
from MedSynLib.pipeline.tiling import Tiling, apply_network


class TileLimitReached(Exception):
    """Raised by the counting network after --max-tiles tiles."""


def tile_count(size: int, tiling: Tiling) -> int:
    """How many tiles the sliding window visits on a cube of `size`: a dry pass on one channel."""
    visited = 0

    def count(tile: torch.Tensor) -> torch.Tensor:
        nonlocal visited
        visited += 1
        return tile

    apply_network(count, torch.zeros(1, 1, size, size, size), tiling)
    return visited


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
    parser.add_argument("--max-tiles", type=int, default=0, help="tiled: stop each step after this many tiles")
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
    if args.max_tiles and tiling is None:
        parser.error("--max-tiles needs --tile")
    tiles = tile_count(size, tiling) if tiling else 1
    tiles_run = 0

    def counted_network(v: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        nonlocal tiles_run
        if args.max_tiles and tiles_run == args.max_tiles:
            raise TileLimitReached
        tiles_run += 1
        return network(v, t, cond=cond)

    # Stage 2 as generation runs it: the condition and x_T live beside x for the whole step.
    condition = torch.randn_like(x) if args.stage == 2 else None
    stage2_output = super_resolution_output(counted_network, condition, tiling) if args.stage == 2 else None

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, DTYPES[args.dtype], enabled=args.dtype != "float32"):
            if args.stage == 1:
                network(x, t, text=text)
            else:
                stage2_output(x, t)

    times = []
    for _ in range(args.repeat):
        tiles_run = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with contextlib.suppress(TileLimitReached):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        times.append(elapsed * tiles / tiles_run if args.max_tiles else elapsed)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({
        "preset": args.preset, "stage": args.stage, "size": size, "tile": args.tile, "batch": batch,
        "device": str(device), "dtype": args.dtype, "params_M": round(sum(p.numel() for p in network.parameters()) / 1e6, 1),
        "tiles": tiles, "tiles_run": args.max_tiles or None,
        "step_s_min": round(min(times), 3), "step_s_all": [round(v, 3) for v in times],
        "peak_memory_GB": round(peak / 2**30, 2), "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }))


if __name__ == "__main__":
    main()
