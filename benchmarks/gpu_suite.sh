#!/usr/bin/env bash
# Every benchmark of the performance work on a lent GPU, in one run (issue 17), so that a session
# with a GPU spends its minutes measuring: one denoising step of the paper preset (stage 1 at 64^3
# with guidance; stage 2 at 256^3 whole and in slabs) in fp32 and bf16 with time and peak memory,
# the paper preset end to end (untrained weights: time and memory are what is measured), and the
# shipped model end to end. Results: JSON lines and markdown rows in OUT/results.txt.
#
#   benchmarks/gpu_suite.sh [OUT]                          # on the GPU machine, from the repository root
#   PRESET=tiny DEVICE=cpu SIZE2=32 TILE=16 RUNS=0 benchmarks/gpu_suite.sh out/dry   # the same steps, small, on CPU
# RUNS=0 leaves out the shipped model's end-to-end runs.
set -uo pipefail
OUT=${1:-out/gpu}
PRESET=${PRESET:-paper}
DEVICE=${DEVICE:-cuda}
SIZE2=${SIZE2:-256}
TILE=${TILE:-64}
RUNS=${RUNS:-3}
LIMIT=${LIMIT:-540}  # seconds per measurement: one slow configuration never eats the whole lease
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"

measure() {  # label command...: run it with a time limit; its stdout goes to the results, a failure is noted
  local label=$1; shift
  echo "## $label" | tee -a "$RESULTS"
  if ! timeout "$LIMIT" "$@" >> "$RESULTS" 2>> "$OUT/errors.txt"; then
    echo "FAILED or over ${LIMIT}s: $label" | tee -a "$RESULTS"
  fi
}

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"; } > "$OUT/machine.txt"

for dtype in float32 bfloat16; do
  measure "stage 1, $PRESET, guided, $dtype" "$PYTHON" benchmarks/bench_step.py --preset "$PRESET" --stage 1 --device "$DEVICE" --dtype "$dtype"
  measure "stage 2, $PRESET, ${SIZE2}^3 whole, $dtype" "$PYTHON" benchmarks/bench_step.py --preset "$PRESET" --stage 2 --size "$SIZE2" --device "$DEVICE" --dtype "$dtype"
  measure "stage 2, $PRESET, ${SIZE2}^3 in slabs of $TILE, $dtype" "$PYTHON" benchmarks/bench_step.py --preset "$PRESET" --stage 2 --size "$SIZE2" --tile "$TILE" --device "$DEVICE" --dtype "$dtype"
done

rm -rf "$OUT/${PRESET}_model"
if timeout "$LIMIT" "$PYTHON" -m MedSynLib.init_model --preset "$PRESET" --out "$OUT/${PRESET}_model" 2>> "$OUT/errors.txt"; then
  measure "$PRESET preset end to end (untrained), bf16, slabs of $TILE" "$PYTHON" benchmarks/bench_generate.py --model "$OUT/${PRESET}_model" --runs 1 --device "$DEVICE" --dtype bfloat16 --tile "$TILE"
fi
[ "$RUNS" -gt 0 ] && measure "shipped model end to end, fp32" "$PYTHON" benchmarks/bench_generate.py --runs "$RUNS" --device "$DEVICE"
echo "wrote $RESULTS"
