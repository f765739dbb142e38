#!/usr/bin/env bash
# Set up .venv if needed and run the whole test suite. Extra arguments go to pytest.
# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh || exit 1
# Same PATH as launch/quickstart.sh: DeepSpeed rebuilds its CPU op whenever the ninja on PATH changes.
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "launch/test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit $rc
