#!/usr/bin/env bash
# The quick start, end to end: set up .venv, write synthetic slides, train on 2 ranks with
# DeepSpeed ZeRO-2, evaluate full-resolution Dice on held-out slides, draw the prediction.
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
if [ ! -f data/synth2d/manifest.csv ]; then
  hrvit synth slides --out data/synth2d --n 12 --size 1024 --seed 0
fi
rm -rf runs/quickstart
deepspeed --num_accelerators "${HRVIT_RANKS:-2}" --master_port "${MASTER_PORT:-29511}" \
  --module hrvit train launch/recipes/quickstart.yaml "$@"
echo "quick start done: runs/quickstart/summary.json, picture runs/quickstart/prediction.png"
