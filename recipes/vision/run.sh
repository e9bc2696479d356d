#!/usr/bin/env bash
# Rebuild the shipped vision model end to end; wall time of each stage -> runs/vision/timings.json.
# Needs the text default (glm4/assets/default) and `pip install easy-vqa`. One torch thread: on 2 cores shared
# with other jobs it ran ~5x faster than two (OpenMP threads waiting on busy cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-data/vision}
RUNS=${RUNS:-runs/vision}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TIMINGS="$RUNS/timings.json"
. recipes/stages.sh

stage prepare_data python recipes/vision/prepare_data.py --data-dir "$DATA"
stage make_base python recipes/vision/make_base.py --out "$RUNS/base"
stage sft1 glm4 finetune --config recipes/vision/sft.yaml --no-progress
stage sft2 glm4 finetune --config recipes/vision/sft2.yaml --no-progress
stage sft3 glm4 finetune --config recipes/vision/sft3.yaml --no-progress
stage ship python recipes/vision/ship.py weights --checkpoint "$RUNS/sft3"
stage eval python recipes/vision/evaluate.py --model glm4/assets/vision --data-dir "$DATA" --out "$RUNS/eval.json"
python recipes/vision/ship.py card --runs "$RUNS"
