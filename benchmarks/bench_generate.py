"""End-to-end `generate` time with a model (default: the shipped one), as a user runs it.

    python benchmarks/bench_generate.py [--model DIR] [--runs 5] [--threads 2] [--device cuda --dtype bfloat16]

Each run is a fresh process (imports, model and encoder loading included), writing a
result folder to a temporary directory. Prints the median wall time and the median of
each stage's time from generation.json, as a markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPORT = ("Findings: Moderate left pleural effusion. There are no lung nodules. The heart is not enlarged. "
          "Impression: Left pleural effusion.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tile", default=None, help="stage-2 tiling, passed to generate")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    walls, stages = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            out = Path(tmp) / f"run{run}"
            command = [sys.executable, "-m", "MedSynLib.generate", "--report", REPORT, "--out", str(out),
                       "--seed", str(run), "--progress", "none", "--device", args.device, "--dtype", args.dtype]
            if args.tile:
                command += ["--tile", args.tile]
            if args.model:
                command += ["--model", str(args.model)]
            start = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            walls.append(time.perf_counter() - start)
            stages.append(json.loads((out / "generation.json").read_text())["timings"])
            print(f"run {run}: {walls[-1]:.1f} s {stages[-1]}", file=sys.stderr)
    median = {key: statistics.median(s[key] for s in stages) for key in stages[0]}
    parts = " | ".join(f"{median[k]:.1f}" for k in ("text_encoder_s", "stage1_s", "stage2_s"))
    print(f"| {args.model or 'shipped default'} | {args.device} {args.dtype} | {args.runs} | {statistics.median(walls):.1f} | {parts} | "
          f"{min(walls):.1f}-{max(walls):.1f} |")


if __name__ == "__main__":
    main()
