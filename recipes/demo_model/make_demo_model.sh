#!/usr/bin/env bash
# The shipped demonstration model (MedSynLib/models/default), made from nothing in one command:
#
#   recipes/demo_model/make_demo_model.sh [WORK_DIR]                      # every step, into out/demo
#   STEPS="train export" recipes/demo_model/make_demo_model.sh WORK_DIR   # some steps
#
# Steps: data (phantoms -> prepare, two datasets: 64^3 for stage 1, 128^3 for stage 2),
# train (both stages; at once on a GPU, one after the other on a CPU), export (model folder),
# evaluate (text control over the built-in prompts), install (copy into the package),
# finetune (stage 1 of the installed model with a pooled-text path, on the effusion half of
# data64; writes WORK/model_finetuned: a GPU job, see README "The demonstration model").
# TRAIN_ARGS adds key=value settings to both stages, e.g. TRAIN_ARGS="time_limit_minutes=6".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-out/demo}
STEPS=${STEPS:-"data train export evaluate"}
CASES=${CASES:-220}
STAGE2_CASES=${STAGE2_CASES:-6}
WORKERS=${WORKERS:-$(nproc)}
PYTHON=${PYTHON:-python}
TRAIN_ARGS=${TRAIN_ARGS:-}

train() {  # stage dataset
  # shellcheck disable=SC2086
  "$PYTHON" -m MedSynLib.train "$1" --data "$WORK/$2" --out "$WORK/runs/$1" --config "$HERE/$1.json" --resume $TRAIN_ARGS
}

for step in $STEPS; do
  case $step in
    data)
      "$PYTHON" -m MedSynLib.phantom_cases --out "$WORK/phantoms" --count "$CASES" --size 128 --workers "$WORKERS"
      head -n $((STAGE2_CASES + 1)) "$WORK/phantoms/manifest.csv" > "$WORK/phantoms/manifest_stage2.csv"
      "$PYTHON" -m MedSynLib.prepare --manifest "$WORK/phantoms/manifest.csv" --out "$WORK/data64" \
        --structures lobes --size 64 --low-size 64 --workers "$WORKERS"
      "$PYTHON" -m MedSynLib.prepare --manifest "$WORK/phantoms/manifest_stage2.csv" --out "$WORK/data128" \
        --structures lobes --size 128 --low-size 64 --workers "$WORKERS"
      ;;
    train)
      if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        train stage1 data64 & first=$!
        train stage2 data128 & second=$!
        wait $first && wait $second
      else
        train stage1 data64
        train stage2 data128
      fi
      ;;
    export)
      "$PYTHON" -m MedSynLib.train export --run "$WORK/runs/stage1" --run "$WORK/runs/stage2" --out "$WORK/model"
      ;;
    evaluate)
      "$PYTHON" -m MedSynLib.evaluation.control --model "$WORK/model" --out "$WORK/control" --samples 16 \
        --workers "$WORKERS"
      "$PYTHON" -m MedSynLib.evaluation.control --model "$WORK/model" --out "$WORK/control_sweep" --samples 16 \
        --guidance 1,2,4 --steps 5,10,20 --workers "$WORKERS"
      ;;
    finetune)
      "$PYTHON" "$HERE/effusion_subset.py" "$WORK/data64" "$WORK/data64_effusion"
      # shellcheck disable=SC2086
      "$PYTHON" -m MedSynLib.train stage1 --data "$WORK/data64_effusion" --out "$WORK/runs/stage1_finetune" \
        --config "$HERE/stage1_finetune.json" --resume $TRAIN_ARGS
      "$PYTHON" -m MedSynLib.train export --run "$WORK/runs/stage1_finetune" --base "$HERE/../../MedSynLib/models/default" \
        --out "$WORK/model_finetuned"
      ;;
    install)
      cp "$WORK"/model/model_index.json "$HERE/../../MedSynLib/models/default/"
      for part in stage1 stage2 text_encoder; do
        mkdir -p "$HERE/../../MedSynLib/models/default/$part"
        cp "$WORK/model/$part"/* "$HERE/../../MedSynLib/models/default/$part/"
      done
      (cd "$HERE/../../MedSynLib/models/default" && sha256sum model_index.json ./*/*.json ./*/*.safetensors)
      ;;
    *)
      echo "unknown step $step (data, train, export, evaluate, install, finetune)" >&2
      exit 2
      ;;
  esac
done
