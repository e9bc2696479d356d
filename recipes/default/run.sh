#!/usr/bin/env bash
# Rebuild the shipped default model end to end; wall time of each stage -> runs/default/timings.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-data/default}
RUNS=${RUNS:-runs/default}
TIMINGS="$RUNS/timings.json"
. recipes/stages.sh

stage prepare_data python recipes/default/prepare_data.py --data-dir "$DATA"
stage build_sft python recipes/default/build_sft.py --data-dir "$DATA"
stage tokenizer python recipes/default/train_tokenizer.py --data-dir "$DATA"
stage pretrain glm4 pretrain --config recipes/default/pretrain.yaml --no-progress
stage eval_base python recipes/default/evaluate.py --model "$RUNS/pretrain" --data-dir "$DATA" --out "$RUNS/eval_base.json" --skip bfcl,translation,samples
stage sft glm4 finetune --config recipes/default/sft.yaml --no-progress
stage ship python recipes/default/ship.py weights --checkpoint "$RUNS/sft"
stage eval python recipes/default/evaluate.py --model glm4/assets/default --data-dir "$DATA" --out "$RUNS/eval.json"
python recipes/default/ship.py card --runs "$RUNS" --data-dir "$DATA"
