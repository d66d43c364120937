"""Training throughput (samples/s) of a stage on a prepared dataset, alone or beside another run.

    python benchmarks/bench_train.py --data32 out/demo/data32 --data128 out/demo/data128 [--steps 60]

Each configuration trains a fresh run of the recipe's config (`recipes/demo_model/stageN.json`)
for `--steps` steps in its own process with OMP_NUM_THREADS set, and reads samples/s from its
metrics.jsonl, leaving out the first logging window (oneDNN set-up). "together" runs start both
stages at once, each on its own thread count, as the recipe's train step does on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo_model"


def start(stage: str, data: Path, run: Path, threads: int, steps: int, overrides: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "MedSynLib.train", stage, "--data", str(data), "--out", str(run),
               "--config", str(RECIPE / f"{stage}.json"), f"steps={steps}", "log_every=10",
               f"checkpoint_every={steps}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def samples_per_s(run: Path) -> float:
    rates = [json.loads(line)["samples_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = rates[1:] or rates
    return sum(steady) / len(steady)


def measure(jobs: list[tuple[str, Path, int, list[str]]], steps: int) -> list[float]:
    """Run the jobs at once; samples/s of each."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = [Path(tmp) / f"run{i}" for i in range(len(jobs))]
        processes = [start(stage, data, run, threads, steps, overrides)
                     for (stage, data, threads, overrides), run in zip(jobs, runs, strict=True)]
        for process in processes:
            _, err = process.communicate()
            if process.returncode:
                raise SystemExit(f"training failed: {err.strip().splitlines()[-1]}")
        return [samples_per_s(run) for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data32", type=Path, required=True, help="stage-1 dataset (32^3 low grid)")
    parser.add_argument("--data128", type=Path, required=True, help="stage-2 dataset (128^3)")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    s1 = ("stage1", args.data32)
    s2 = ("stage2", args.data128)
    plans = {
        "stage 1 alone, 2 threads, 1 loader": [(*s1, 2, [])],
        "stage 1 alone, 2 threads, no loader process": [(*s1, 2, ["num_workers=0"])],
        "stage 1 alone, 2 threads, batch 8": [(*s1, 2, ["batch_size=8"])],
        "stage 1 alone, 2 threads, contiguous (not channels-last)": [(*s1, 2, ["channels_last=false"])],
        "stage 2 alone, 2 threads, 1 loader": [(*s2, 2, [])],
        "stage 2 alone, 2 threads, no loader process": [(*s2, 2, ["num_workers=0"])],
        "together, 1 thread each (stage 1, stage 2)": [(*s1, 1, []), (*s2, 1, [])],
    }
    print("| configuration | samples/s |\n|---|---|")
    for name, jobs in plans.items():
        try:
            rates = measure(jobs, args.steps)
        except SystemExit as error:
            print(f"| {name} | {error} |")
            continue
        print(f"| {name} | {' / '.join(f'{r:.2f}' for r in rates)} |", flush=True)


if __name__ == "__main__":
    main()
