#!/usr/bin/env bash
# Create ./.venv and install hrvit into it with the test extras. Safe to run again:
# it reinstalls only when pyproject.toml is newer than the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "hrvit setup: creating .venv with $($python --version 2>&1)"
  "$python" -m venv .venv
fi
stamp=.venv/.hrvit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "hrvit setup: installing hrvit and its dependencies (torch, deepspeed, timm, openslide, nibabel, ...)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev,mpi]"
  touch "$stamp"
fi
