"""How many CPU threads each rank uses: its share of its host, whatever mpirun's defaults did.

Two defaults of a plain `mpirun` leave CPUs idle. Open MPI binds each rank to one core when it starts two ranks
or fewer (`mpirun -n 1` on a 16-core machine counts on one core). And torch's OpenMP runtime, seeing
OMPI_COMM_WORLD_LOCAL_SIZE in the environment, starts one thread per rank even when the rank may use every
core (`mpirun --bind-to none`). So each rank sets torch's and numba's threads to its share: the cores it may run
on, at most the host's cores divided by the ranks on the host, unless the user chose with OMP_NUM_THREADS or
NUMBA_NUM_THREADS. Under mpirun, a rank bound to fewer cores than that share is reported once, with the option
that frees them (under srun the CPUs are the job's allocation). A third: with OMP_PROC_BIND or GOMP_CPU_AFFINITY
set (common in HPC environments), importing torch pins the main thread to one CPU; restore() undoes that first.
"""

from __future__ import annotations

import os


def _affinity() -> frozenset[int] | None:
    return frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


# The CPUs this process started with, read when mpicorr is imported (its __init__ imports this module first),
# before torch: with OMP_PROC_BIND or GOMP_CPU_AFFINITY set, loading torch's OpenMP runtime pins the main thread
# to one CPU, and every thread started from it afterwards (the writers, zstd's workers) would share that CPU.
STARTED = _affinity()


def restore() -> None:
    """Give the main thread back the CPUs the process started with where OpenMP has pinned it to fewer since
    (OMP_PROC_BIND, GOMP_CPU_AFFINITY); OpenMP's own worker threads keep their places. Never more than it
    started with: mpirun's or srun's binding stays."""
    now = _affinity()
    if STARTED and now is not None and now < STARTED:
        os.sched_setaffinity(0, STARTED)


def share(allowed: int, host: int, ranks_here: int) -> int:
    """Threads for one rank that may run on `allowed` cores of a host of `host` cores shared by `ranks_here`
    ranks."""
    return max(1, min(allowed, host // max(ranks_here, 1)))


def cores(cpus) -> int:
    """Physical cores among these logical CPUs (hyperthreads of one core count once: a thread per core is what
    the matrix products and the counting kernels run best with); the CPU count where Linux does not say."""
    siblings = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as fh:
                siblings.add(fh.read().strip())
        except OSError:
            return len(list(cpus))
    return len(siblings)


def found() -> tuple[int, int]:
    """(cores this process may run on, cores of its host: its container's or job's CPU set where there is one)."""
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return cores(mine), cores(cgroup_cpus() or range(os.cpu_count() or 1))


def cpu_set() -> list[int]:
    """The logical CPUs this process may run on (its binding), sorted."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def cgroup_cpus() -> list[int] | None:
    """The CPUs of this process's cgroup CPU set (a container's --cpuset-cpus, a job's allocation), which
    mpirun's binding narrows; None where there is none to read (then the host's CPUs count)."""
    try:
        with open("/proc/self/cgroup") as fh:
            lines = [line.rstrip("\n").split(":", 2) for line in fh]
    except OSError:
        return None
    for _, controllers, path in lines:
        file = _cpuset_file(controllers, path.rstrip("/"))
        try:
            with open(file) as fh:
                return cpu_list(fh.read()) or None
        except (OSError, TypeError, ValueError):
            continue
    return None


def _cpuset_file(controllers: str, path: str) -> str | None:
    """Where a /proc/self/cgroup line's CPU set is: cgroup v2 (no controller named) or v1's cpuset hierarchy."""
    if controllers == "":
        return f"/sys/fs/cgroup{path}/cpuset.cpus.effective"
    if "cpuset" in controllers.split(","):
        return f"/sys/fs/cgroup/cpuset{path}/cpuset.effective_cpus"
    return None


def cpu_list(text: str) -> list[int]:
    """The CPUs of a Linux CPU list such as '0-3,8,10-11'."""
    out: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            out.extend(range(int(first), int(last or first) + 1))
    return out


def apply(threads: int) -> None:
    """Use `threads` threads in torch and numba, except where the user set OMP_NUM_THREADS / NUMBA_NUM_THREADS.
    numba first: where its OpenMP layer runs in torch's OpenMP runtime (one libgomp.so.1 in the process), setting
    its threads also sets torch's, which is then set to what torch should have. Then the main thread gets back
    the CPUs an OpenMP runtime loaded meanwhile pinned it away from (restore)."""
    import torch

    torch_threads = torch.get_num_threads() if "OMP_NUM_THREADS" in os.environ else threads
    from . import kernels
    if kernels.AVAILABLE:
        import numba
        if "NUMBA_NUM_THREADS" not in os.environ:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        numba.get_num_threads()  # starts numba's threads now (else at the first kernel), for restore() below
    torch.set_num_threads(torch_threads)
    # numba's pip build loads an OpenMP runtime of its own (libgomp.so.1.0.0 beside torch's libgomp.so.1) as it
    # starts its threads, and with OMP_PROC_BIND that pins the main thread to one CPU again.
    restore()


def started_by_mpirun() -> bool:
    """Whether Open MPI's mpirun (or mpiexec) started this process: its binding is then mpirun's default unless the
    user chose one, whereas srun's CPUs are the job's allocation (--cpus-per-task), not to be second-guessed."""
    return os.environ.get("OMPI_TOOL_NAME") in ("mpirun", "mpiexec") or "OMPI_MCA_orte_hnp_uri" in os.environ


def binding_note(hosts: list[str], every: list[tuple[int, int]]) -> str | None:
    """A warning line when some rank is bound to fewer cores than its share of its host. `every`: every rank's
    found(), in rank order, as `hosts` names their hosts."""
    for rank, (host, (mine, host_cores)) in enumerate(zip(hosts, every)):
        ranks_here = hosts.count(host)
        if mine < host_cores // ranks_here:
            return (f"mpicorr: warning: rank {rank} on {host} may use {mine} of the host's {host_cores} cores "
                    f"({ranks_here} rank(s) there; mpirun binds each rank to one core when it starts two or "
                    f"fewer): counting on the CPU, reading the data and writing the outputs use only those; "
                    f"start mpirun with --bind-to none to give each rank {host_cores // ranks_here}")
    return None
