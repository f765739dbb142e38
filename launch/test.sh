#!/usr/bin/env bash
# Set up .venv if needed and run the whole test suite. Extra arguments go to pytest.
# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh || exit 1
# Same PATH as launch/quickstart.sh: DeepSpeed rebuilds its CPU op whenever the ninja on PATH changes.
export PATH="$PWD/.venv/bin:$PATH"
# Two workers (pytest-xdist) keep the 2-core machine busy while a test waits on its processes; tests of one
# shared training run stay on one worker (tests/conftest.py). HRVIT_TEST_WORKERS=0 runs everything in one process.
.venv/bin/python -m pytest -q -n "${HRVIT_TEST_WORKERS:-2}" --dist loadgroup "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "launch/test.sh: pytest collected no tests; failing" >&2
  exit 1
fi
exit $rc
