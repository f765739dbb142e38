#!/usr/bin/env bash
# N processes on this machine through the deepspeed launcher (one per GPU, or N CPU ranks).
#   bash launch/local.sh N RECIPE [key=value ...]
#   bash launch/local.sh 2 launch/recipes/quickstart.yaml parallel.sp_size=2
# MASTER_PORT (default 29500) picks the rendezvous port when two runs share the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/local.sh N RECIPE [key=value ...]   (N = number of processes)" >&2
  exit 2
fi
nproc=$1 recipe=$2
shift 2
[ -f "$recipe" ] || { echo "launch/local.sh: recipe $recipe not found" >&2; exit 2; }
python=python
[ -x .venv/bin/python ] && python="$PWD/.venv/bin/python"
exec "$python" -m deepspeed.launcher.runner --num_accelerators "$nproc" --master_port "${MASTER_PORT:-29500}" \
  --module hrvit train "$recipe" "$@"
