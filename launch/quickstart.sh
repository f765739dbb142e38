#!/usr/bin/env bash
# The quick starts, end to end: set up .venv, write synthetic data, train on 2 ranks with DeepSpeed
# ZeRO-2, evaluate on held-out cases and draw a picture.
#   bash launch/quickstart.sh [key=value ...]       segmentation of whole slides (adaptive patching): Dice
#   bash launch/quickstart.sh ips [key=value ...]   recognition by iterative patch selection: accuracy
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = ips ]; then
  shift
  recipe=ips_quickstart data=data/megapixel synth=(megapixel --n 240) port=29512
else
  recipe=quickstart data=data/context2d synth=(slides --family context --n 12) port=29511
fi
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
if [ ! -f "$data/manifest.csv" ]; then
  hrvit synth "${synth[@]}" --out "$data" --size 1024 --seed 0
fi
rm -rf "runs/$recipe"
deepspeed --num_accelerators "${HRVIT_RANKS:-2}" --master_port "${MASTER_PORT:-$port}" \
  --module hrvit train "launch/recipes/$recipe.yaml" "$@"
echo "quick start done: runs/$recipe/summary.json, picture runs/$recipe/prediction.png"
