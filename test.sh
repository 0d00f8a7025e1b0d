#!/usr/bin/env bash
# Run the whole test suite in the environment ./setup.sh made (pytest options pass through):
#
#     ./test.sh                  # everything, as CI runs it
#     ./test.sh tests/test_plan.py -k hostfile
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
exec python -m pytest -q "$@"
