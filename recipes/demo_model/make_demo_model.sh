#!/usr/bin/env bash
# The shipped demonstration model (MedSynLib/pretrained/default), made from nothing on 2 CPU cores:
#
#   recipes/demo_model/make_demo_model.sh [WORK_DIR]                      # every step, into out/demo
#   STEPS="train export" recipes/demo_model/make_demo_model.sh WORK_DIR   # some steps
#   TIME_LIMIT=60 STEPS=train recipes/demo_model/make_demo_model.sh       # train for an hour, resume later
#   TIME_LIMIT=35 TRAIN_STAGES=stage1 STEPS=train recipes/demo_model/make_demo_model.sh  # stage 1 alone
#
# Steps: data (balanced phantoms -> prepare: data32, 2,400 cases whose 32^3 grids teach stage 1;
# data128, 240 cases at 128^3 for stage 2), train (both stages at once, each on one thread of
# its own; resumable: run it again to continue), export (model folder), evaluate (text and
# anatomy control over the built-in prompts, and a guidance x steps sweep; SAMPLES and
# SWEEP_SAMPLES, ANATOMY_SAMPLES set how many volumes per prompt and setting),
# install (copy into the package and print the checksums for the model card).
# TIME_LIMIT (minutes, default 0 = none) stops both trainings with a checkpoint; TRAIN_ARGS adds
# key=value settings to both stages, e.g. TRAIN_ARGS="steps=2000"; STAGE1_ARGS and STAGE2_ARGS to
# one, e.g. STAGE2_ARGS='network={"residual":true}' (settings are split at spaces). RUNS and MODEL
# name the run folder and the model folder under WORK (default runs, model), so that a fine-tune
# of the recipe's model lives beside it, e.g. with the soft-tissue window channel added:
#   RUNS=runs_window MODEL=model_window TRAIN_ARGS="init_weights=WORK/model ct_window=[-150,150]" \
#     STEPS="train export" recipes/demo_model/make_demo_model.sh WORK
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-out/demo}
STEPS=${STEPS:-"data train export evaluate"}
CASES=${CASES:-2400}
STAGE2_CASES=${STAGE2_CASES:-240}
WORKERS=${WORKERS:-$(nproc)}
PYTHON=${PYTHON:-python}
TIME_LIMIT=${TIME_LIMIT:-0}
TRAIN_ARGS=${TRAIN_ARGS:-}
TRAIN_STAGES=${TRAIN_STAGES:-"stage1 stage2"}
RUNS=${RUNS:-runs}
MODEL=${MODEL:-model}
SAMPLES=${SAMPLES:-16}
SWEEP_SAMPLES=${SWEEP_SAMPLES:-4}
ANATOMY_SAMPLES=${ANATOMY_SAMPLES:-8}

train() {  # stage dataset threads
  local own="${1^^}_ARGS"  # STAGE1_ARGS or STAGE2_ARGS
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$3 "$PYTHON" -m MedSynLib.train "$1" --data "$WORK/$2" --out "$WORK/$RUNS/$1" \
    --config "$HERE/$1.json" --resume time_limit_minutes="$TIME_LIMIT" $TRAIN_ARGS ${!own:-}
}

for step in $STEPS; do
  case $step in
    data)
      "$PYTHON" -m MedSynLib.phantom_cases --out "$WORK/phantoms64" --count "$CASES" --size 64 \
        --findings balanced --workers "$WORKERS"
      "$PYTHON" -m MedSynLib.prepare --manifest "$WORK/phantoms64/manifest.csv" --out "$WORK/data32" \
        --structures lobes --size 64 --low-size 32 --workers "$WORKERS"
      # Other seeds than stage 1's, so that stage 2 sees other chests.
      "$PYTHON" -m MedSynLib.phantom_cases --out "$WORK/phantoms128" --count "$STAGE2_CASES" --seed 5000 \
        --size 128 --findings balanced --workers "$WORKERS"
      "$PYTHON" -m MedSynLib.prepare --manifest "$WORK/phantoms128/manifest.csv" --out "$WORK/data128" \
        --structures lobes --size 128 --low-size 32 --workers "$WORKERS"
      ;;
    train)
      # Two single-threaded runs side by side use 2 cores a little better than one after the
      # other (benchmarks/README.md); one stage alone (TRAIN_STAGES=stage1) takes every core.
      pids=()
      for stage in $TRAIN_STAGES; do
        data=data128 && [ "$stage" = stage1 ] && data=data32
        threads=$(nproc) && [ "$TRAIN_STAGES" != "$stage" ] && threads=1
        train "$stage" "$data" "$threads" & pids+=($!)
      done
      for pid in "${pids[@]}"; do wait "$pid"; done
      ;;
    export)
      "$PYTHON" -m MedSynLib.train export --run "$WORK/$RUNS/stage1" --run "$WORK/$RUNS/stage2" --out "$WORK/$MODEL"
      ;;
    evaluate)
      "$PYTHON" -m MedSynLib.evaluation.control --model "$WORK/$MODEL" --out "$WORK/control" --samples "$SAMPLES" \
        --anatomy-samples "$ANATOMY_SAMPLES" --workers "$WORKERS"
      # Guidance x stage-1 steps for the effusion and cardiomegaly prompts (sweep_prompts.txt).
      "$PYTHON" -m MedSynLib.evaluation.control --model "$WORK/$MODEL" --out "$WORK/control_sweep" \
        --prompts "$HERE/sweep_prompts.txt" --samples "$SWEEP_SAMPLES" --guidance 1,2,4 --steps 8,16 --workers "$WORKERS"
      ;;
    install)
      cp "$WORK/$MODEL/model_index.json" "$HERE/../../MedSynLib/pretrained/default/"
      for part in stage1 stage2 text_encoder; do
        mkdir -p "$HERE/../../MedSynLib/pretrained/default/$part"
        cp "$WORK/$MODEL/$part"/* "$HERE/../../MedSynLib/pretrained/default/$part/"
      done
      (cd "$HERE/../../MedSynLib/pretrained/default" && sha256sum model_index.json ./*/*.json ./*/*.safetensors)
      ;;
    *)
      echo "unknown step $step (data, train, export, evaluate, install)" >&2
      exit 2
      ;;
  esac
done
