"""Reduced precision on the CPU: which way of running a network in bf16 is fast, and what it costs.

    python benchmarks/bench_precision.py --preset demo --stage 1
    python benchmarks/bench_precision.py --preset paper --stage 1 --size 16 --repeat 2

One denoising forward of a preset's network (stage 1 with the guided batch of 2, stage 2 with
its condition), in each of these ways, measured in one process so the ratios compare:
fp32 (contiguous and channels-last), bf16 by autocast (each op casts its inputs), and bf16
weights cast once (inputs cast once; contiguous and channels-last). Each line gives the
fastest of `--repeat` timed calls after one warm-up call, the speed-up over fp32 contiguous,
and the output's difference from fp32 (max absolute, and RMS relative to the fp32 output's RMS).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import time

import torch

from MedSynLib.networks.unet import UNet3D
from MedSynLib.pipeline.presets import stage_configs

CHANNELS_LAST = torch.channels_last_3d


def variants(network: UNet3D):
    """name -> (network, input dtype, memory format, autocast on)."""
    channels_last = copy.deepcopy(network).to(memory_format=CHANNELS_LAST)
    bf16 = copy.deepcopy(network).to(torch.bfloat16)
    bf16_channels_last = copy.deepcopy(bf16).to(memory_format=CHANNELS_LAST)
    return {
        "fp32": (network, torch.float32, torch.contiguous_format, False),
        "fp32 channels-last": (channels_last, torch.float32, CHANNELS_LAST, False),
        "bf16 autocast": (network, torch.float32, torch.contiguous_format, True),
        "bf16 autocast channels-last": (channels_last, torch.float32, CHANNELS_LAST, True),
        "bf16 weights": (bf16, torch.bfloat16, torch.contiguous_format, False),
        "bf16 weights channels-last": (bf16_channels_last, torch.bfloat16, CHANNELS_LAST, False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True)
    parser.add_argument("--size", type=int, default=None, help="cube side (default: the preset's)")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = parser.parse_args()

    stage1, stage2 = stage_configs(args.preset, channels=args.channels, text_dim=args.text_dim)
    config = stage1 if args.stage == 1 else stage2
    size = args.size or config.size
    torch.manual_seed(0)
    network = UNet3D(config.network).eval().requires_grad_(False)
    batch = 2 if args.stage == 1 else 1
    x = torch.randn(batch, args.channels, size, size, size)
    t = torch.full((batch,), 0.5)
    text = torch.randn(batch, 192, args.text_dim) if args.stage == 1 else None
    cond = torch.randn(batch, args.channels, size, size, size) if args.stage == 2 else None

    def forward(model, dtype, memory_format, autocast):
        inputs = [v if v is None else v.to(dtype=dtype, memory_format=memory_format) if v.dim() == 5 else v.to(dtype)
                  for v in (x, text, cond)]
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), context:
            return model(inputs[0], t, text=inputs[1], cond=inputs[2]).float()

    chosen = variants(network)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    reference, base = forward(*variants(network)["fp32"]), None
    for name, variant in chosen.items():
        forward(*variant)  # warm-up: oneDNN picks and builds its kernels
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = forward(*variant)
            times.append(time.perf_counter() - start)
        best = min(times)
        base = base or (best if name == "fp32" else None)
        error = (out - reference)
        print(json.dumps({
            "preset": args.preset, "stage": args.stage, "size": size, "variant": name, "step_s": round(best, 4),
            "speedup_vs_fp32": round(base / best, 2) if base else None,
            "max_abs_diff": float(error.abs().max()), "rel_rms_diff": float(error.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        }), flush=True)


if __name__ == "__main__":
    main()
