"""Each rank's CPU threads (mpicorr.cpus): its share of its host's cores, torch's MPI-induced single thread
undone, the user's OMP_NUM_THREADS / NUMBA_NUM_THREADS kept, and a rank bound narrower than its share reported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mpicorr import cpus
from conftest import MPIRUN, ROOT, cli_env


def test_share_is_the_allowed_cores_at_most_the_hosts_split_evenly():
    assert cpus.share(16, 16, 1) == 16
    assert cpus.share(16, 16, 2) == 8       # unbound ranks: an even split
    assert cpus.share(1, 16, 2) == 1        # bound to a core: that core
    assert cpus.share(4, 2, 3) == 1         # more ranks than cores: one each
    assert cpus.share(1, 1, 0) == 1


def test_binding_note_names_the_rank_host_and_option():
    assert cpus.binding_note(["a", "a"], [(8, 16), (8, 16)]) is None
    assert cpus.binding_note(["a", "b"], [(16, 16), (4, 4)]) is None
    note = cpus.binding_note(["a", "b", "b"], [(16, 16), (1, 16), (1, 16)])
    assert note.startswith("mpicorr: warning: rank 1 on b may use 1 of the host's 16 cores (2 rank(s) there")
    assert note.endswith("start mpirun with --bind-to none to give each rank 8") and "\n" not in note


def test_only_mpiruns_binding_is_reported(monkeypatch):
    """srun's CPUs are the job's allocation: no advice to unbind them; Open MPI 5's and 4's mpirun are seen."""
    for name in ("OMPI_TOOL_NAME", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(name, raising=False)
    assert not cpus.started_by_mpirun()
    monkeypatch.setenv("OMPI_TOOL_NAME", "mpirun")
    assert cpus.started_by_mpirun()
    monkeypatch.delenv("OMPI_TOOL_NAME")
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "12345.0;tcp://10.0.0.1:4000")
    assert cpus.started_by_mpirun()


def test_cpu_lists_and_the_cgroup_set_parse():
    assert cpus.cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11] and cpus.cpu_list("5") == [5]
    assert cpus.cpu_list("") == []
    found = cpus.cgroup_cpus()  # this machine's, if it has a CPU set; never more CPUs than the host has
    assert found is None or 1 <= len(found) <= (os.cpu_count() or 1)


def test_cores_counts_hyperthreads_once():
    mine = os.sched_getaffinity(0)
    assert 1 <= cpus.cores(mine) <= len(mine)
    assert cpus.found()[0] <= cpus.found()[1] <= (os.cpu_count() or 1)


THREADS = "import torch, numba; from mpicorr import cpus; cpus.apply(2); print(torch.get_num_threads(), numba.get_num_threads())"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("user, want", [({}, "2 2"), ({"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}, "1 1"),
                                        ({"OMP_NUM_THREADS": "1"}, "1 2"), ({"NUMBA_NUM_THREADS": "1"}, "2 1")])
def test_apply_undoes_torchs_one_thread_under_mpi_but_keeps_the_users_choice(user, want):
    """torch's OpenMP runtime starts one thread when OMPI_COMM_WORLD_LOCAL_SIZE is set (as under any mpirun);
    apply(2) gives torch and numba two, unless the user set OMP_NUM_THREADS / NUMBA_NUM_THREADS (each alone too:
    numba's threads are set in torch's OpenMP runtime, which once gave torch numba's count)."""
    env = {**cli_env(), "OMPI_COMM_WORLD_LOCAL_SIZE": "1", **user}
    for key in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        if key not in user:
            env.pop(key, None)
    before = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                            capture_output=True, text=True, check=True).stdout.strip()
    got = subprocess.run([sys.executable, "-c", THREADS], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert before == "1" and got == want


@pytest.mark.skipif(MPIRUN is None or len(os.sched_getaffinity(0)) < 2, reason="needs mpirun and two CPUs")
def test_a_run_bound_to_one_core_says_so_once(llama, sample_path, tmp_path):
    """mpirun -n 1 binds its rank to one core: the run says so in one warning line and names --bind-to none;
    with --bind-to none it does not, also with OMP_PROC_BIND set (torch's OpenMP runtime pinned the main thread
    to one CPU, and the run warned and used one), and the counts are the same."""
    bound, free = tmp_path / "bound", tmp_path / "free"
    common = [sys.executable, "-m", "mpicorr", "run", "--model", llama, "--data", sample_path, "--ctx", "16",
              "--chunks", "4", "--hostfile", "none"]
    one = subprocess.run([MPIRUN, "--bind-to", "core", "-n", "1", *common, "--out", str(bound)], env=cli_env(),
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    two = subprocess.run([MPIRUN, "--bind-to", "none", "-n", "1", *common, "--out", str(free)],
                         env={**cli_env(), "OMP_PROC_BIND": "true"},
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    warned = [line for line in one.stdout.splitlines() if line.startswith("mpicorr: warning:")]
    assert len(warned) == 1 and "--bind-to none" in warned[0] and "mpicorr: warning" not in two.stdout
    for name in ("correlations_block_0.zstd", "correlations_block_1.zstd"):
        assert (bound / name).read_bytes() == (free / name).read_bytes()


PINNED = """import os, threading
import mpicorr, torch
from mpicorr import cpus
pinned = len(os.sched_getaffinity(0))
cpus.restore()
seen = []
thread = threading.Thread(target=lambda: seen.append(len(os.sched_getaffinity(0))))
thread.start(); thread.join()
print(pinned, len(os.sched_getaffinity(0)), seen[0])"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("variable", [{"OMP_PROC_BIND": "true"}, {"GOMP_CPU_AFFINITY": "0-63"}])
def test_restore_unpins_the_main_thread_that_openmp_pinned(variable):
    """With OMP_PROC_BIND or GOMP_CPU_AFFINITY set, importing torch pins the main thread to one CPU (so the run
    took itself to be bound to one core, and its writer threads shared it); restore() gives it back every CPU
    the process started with, and threads started afterwards have them too."""
    env = {**cli_env(), **variable}
    got = subprocess.run([sys.executable, "-c", PINNED], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    every = str(len(os.sched_getaffinity(0)))
    assert got == ["1", every, every]


PLACED = """import os, sys
from mpicorr import run
from mpicorr.__main__ import main

def seen(tag):
    import numba, torch
    print(tag, len(os.sched_getaffinity(0)), torch.get_num_threads(), numba.get_num_threads(), flush=True)

def place(cfg, comm, real=run.place):
    placed = real(cfg, comm)
    seen(f"placed {placed.write_cpus}")
    return placed

def reduce_and_write(*args, real=run.reduce_and_write):
    seen("writing")
    return real(*args)

run.place, run.reduce_and_write = place, reduce_and_write
sys.exit(main(sys.argv[1:]))"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("variable", [{"OMP_PROC_BIND": "true"}, {"GOMP_CPU_AFFINITY": "0-63"},
                                      {"OMP_PROC_BIND": "true", "NUMBA_NUM_THREADS": "2"}])
def test_a_run_with_openmp_binding_counts_and_writes_on_every_cpu(llama, sample_path, tmp_path, variable):
    """restore() ran in place(), but numba, imported after torch had pinned the main thread, sized its pool to
    the one CPU (numba 1 thread), and starting numba's threads loads numba's own OpenMP runtime, which pinned
    the main thread again: the run counted and wrote (writer threads, zstd's workers) on one CPU. The main
    thread has every CPU, and numba and torch their share, from place() to the writing."""
    result = subprocess.run([sys.executable, "-c", PLACED, "run", "--model", llama, "--data", sample_path, "--ctx",
                             "16", "--chunks", "2", "--hostfile", "none", "--out", str(tmp_path / "o")],
                            env={k: v for k, v in {**cli_env(), **variable}.items() if k != "OMP_NUM_THREADS"},
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = {ln.split()[0]: ln.split()[1:] for ln in result.stdout.splitlines() if ln.startswith(("placed", "writing"))}
    every, threads = str(len(os.sched_getaffinity(0))), str(cpus.share(*cpus.found(), 1))
    numba_threads = variable.get("NUMBA_NUM_THREADS", threads)  # the user's choice is kept
    assert seen["placed"] == [every, every, threads, numba_threads], result.stdout  # write CPUs, CPUs, torch, numba
    assert seen["writing"] == [every, threads, numba_threads], result.stdout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("script", ["overhead", "gpu", "compare"])
def test_benchmarks_record_the_cpus_before_torch_pins_them(script):
    """benchmarks/overhead.py and gpu.py run `mpicorr run` in their process, compare.py the kernels; each imported
    torch before mpicorr, so with OMP_PROC_BIND set cpus.STARTED was the one CPU torch's OpenMP pinned the main
    thread to, restore() gave nothing back, and the benchmark counted on one thread where a run used every CPU."""
    code = (f"import sys; sys.path.insert(0, 'benchmarks'); import {script}; from mpicorr import cpus; "
            f"print(len(cpus.STARTED))")
    got = subprocess.run([sys.executable, "-c", code], env={**cli_env(), "OMP_PROC_BIND": "true"}, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert got == [str(len(os.sched_getaffinity(0)))]
