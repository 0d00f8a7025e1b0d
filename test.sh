#!/usr/bin/env bash
# Run the whole test suite in the environment ./setup.sh made (pytest options pass through):
#
#     ./test.sh                  # everything, as CI runs it
#     ./test.sh tests/test_plan.py -k hostfile
#
# Two pytest-xdist workers, each taking whole test files (so a file's shared runs are made once): most
# tests wait on short MPI jobs whose start-up leaves a core idle, so two workers finish sooner even on two
# cores. MPICORR_TEST_WORKERS=0 runs in one process (pytest's own output, easier to debug).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    echo "test.sh: no .venv here; run ./setup.sh first" >&2
    exit 2
fi
export PATH="$PWD/.venv/bin:$PATH"  # its python, and mpirun when Open MPI came from PyPI
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
workers=${MPICORR_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
    exec python -m pytest -q --durations=15 "$@"
fi
exec python -m pytest -q -n "$workers" --dist loadfile --durations=15 "$@"
