"""The write phase (mpicorr.writing): units reduced onto owners in turn, compressed there, written by rank 0,
give the files of the same counts reduced and written by rank 0 alone. One test class on COMM_SELF and
COMM_WORLD; the module under mpirun with 3 ranks (owners 1 and 2 send their units to rank 0, and units are taken
to rank 0 while later ones are still reduced); and a whole run whose two ranks are bound to a core each, so
that both compress.

    mpirun -n 3 python -m pytest tests/test_writing.py     # what test_under_mpirun runs
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import tempfile
import weakref

import numpy as np
import pytest
import torch

from conftest import MPIRUN, cli_env, mpirun_pytest, run_main
from mpicorr import dist, matrixfile, summary, tiny, writing
from mpicorr.counting import LayerCounts, split_stats
from mpicorr.units import Unit

THRESHOLDS = (0.5, 1.0)
LAYERS, WIDTH, EXPERTS, TOKENS = 7, 13, 5, 40


def counted(rank: int) -> list[LayerCounts]:
    """This rank's counts of LAYERS layers and one router over random activations (different on each rank)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    units = []
    for layer in range(LAYERS):
        lc = LayerCounts(Unit(layer), WIDTH, THRESHOLDS, torch.int32, "cpu")
        lc.add(torch.randn(TOKENS, WIDTH, generator=gen) * (1 + layer % 3))
        units.append(lc)
    router = LayerCounts(Unit(LAYERS, router=True), EXPERTS, (0.5, 0.5), torch.int32, "cpu")
    router.add((torch.rand(TOKENS, EXPERTS, generator=gen) < 0.4).float())
    return units + [router]


def threshold_folders(c: dist.Comm) -> tuple[str, list[str]]:
    """A new output folder (rank 0's, named on every rank) and its folder per threshold, made on rank 0."""
    out = c.bcast(tempfile.mkdtemp() if c.rank == 0 else None)
    folders = [os.path.join(out, f"t{i}") for i in range(len(THRESHOLDS))]
    if c.rank == 0:
        for folder in folders:
            os.makedirs(folder)
    return out, folders


def write(c: dist.Comm, ranks: list[int], threads: int) -> str | None:
    """Reduce and write this rank's counts through writing.reduce_and_write_units; rank 0's folder."""
    out, folders = threshold_folders(c)
    with writing.summary_writers(folders, c.rank == 0) as files, writing.UnitWriter(threads, cpus=2) as writer:
        writing.reduce_and_write_units(c, counted(c.rank), folders, files, writer, ranks)
    return out if c.rank == 0 else None


def contents(out: str) -> dict[str, object]:
    """Every matrix file's bytes and every summary dataset and attribute, by name."""
    found: dict[str, object] = {}
    for folder in sorted(os.listdir(out)):
        for name in sorted(os.listdir(os.path.join(out, folder))):
            path = os.path.join(out, folder, name)
            if name == summary.SUMMARY:
                found[f"{folder}/layers"] = plain(summary.read_summary(path)[1])
                found[f"{folder}/routers"] = plain(summary.read_moe(path)[1])
            else:
                with open(path, "rb") as fh:
                    found[f"{folder}/{name}"] = fh.read()
    return found


def plain(entries: dict) -> dict:
    """Summary entries with their arrays as lists (comparable with ==)."""
    return {k: {n: v if n == "attrs" else np.asarray(v).tolist() for n, v in e.items()} for k, e in entries.items()}


def expected_sums(size: int) -> list[np.ndarray]:
    """Layer 0's packed counts at the first threshold, summed over `size` ranks' activations, by hand."""
    return sum(counted(r)[0].pairs[0].take().astype(np.int64) for r in range(size))


class Deferred:
    """A writer thread's future whose call runs only when its result is asked for: writers slower than any
    reduce, so that whatever a rank may hold waits, held, as long as the write phase lets it."""

    def __init__(self, fn, args):
        self.call, self.value = (fn, args), None

    def done(self) -> bool:
        return self.call is None

    def result(self):
        if self.call is not None:
            (fn, args), self.call = self.call, None
            self.value = fn(*args)
        return self.value


class DeferredPool:
    def submit(self, fn, *args) -> Deferred:
        return Deferred(fn, args)

    def shutdown(self, **_) -> None:
        pass


def held_peak(c: dist.Comm, ranks: list[int], threads: int) -> int:
    """The most large arrays this rank held at once (reduced counts: int32 pairs, one per threshold and unit;
    on rank 0 also the compressed files received) while the units were reduced and written with writers that
    never finish before they must."""
    live, peak = [0], [0]
    reduce_sum, recv_bytes = c.reduce_sum, c.recv_bytes

    def freed() -> None:
        live[0] -= 1

    def held(array) -> None:
        live[0] += 1
        weakref.finalize(array, freed)
        peak[0] = max(peak[0], live[0])

    def reduced(array, root=0):
        out = reduce_sum(array, root)
        if out is not None and out.dtype == np.int32:
            held(out)
        return out

    def received(source):
        group, data = recv_bytes(source)
        if data is not None:
            held(data)
        return group, data
    c.reduce_sum, c.recv_bytes = reduced, received
    _, folders = threshold_folders(c)
    with writing.summary_writers(folders, c.rank == 0) as files, writing.UnitWriter(threads, cpus=2) as writer:
        writer.pool.shutdown()
        writer.pool = DeferredPool()
        writing.reduce_and_write_units(c, counted(c.rank), folders, files, writer, ranks)
    return peak[0]


class Synchronous:
    """An mpi4py communicator whose buffer sends wait until their receive starts (MPI_Ssend), as a large frame's
    do: a rank that sends a unit before rank 0 takes it then waits, whatever the message size."""

    def __init__(self, comm):
        self.comm = comm

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def Send(self, *args, **kwargs):
        return self.comm.Ssend(*args, **kwargs)


class BaseWriting:
    def comm(self) -> dist.Comm:
        raise NotImplementedError

    @pytest.mark.parametrize("threads", [1, 3])
    def test_spread_writes_what_rank_0_alone_writes(self, threads):
        c = self.comm()
        spread, alone = write(c, list(range(c.size)), threads), write(c, [0], threads)
        if c.rank == 0:
            got, want = contents(spread), contents(alone)
            assert sorted(got) == sorted(want)
            assert len([n for n in got if n.endswith(".zstd")]) == LAYERS * len(THRESHOLDS)
            for name in want:
                assert got[name] == want[name], name
            header, packed = matrixfile.read_matrix(os.path.join(spread, "t0", matrixfile.matrix_name(0)))
            assert header.trials == TOKENS * c.size
            assert np.array_equal(packed, expected_sums(c.size))

    def test_groups_are_stored_in_unit_order(self):
        c = self.comm()
        out = write(c, list(range(c.size)), 1)
        if c.rank == 0:
            import h5py

            with h5py.File(os.path.join(out, "t0", summary.SUMMARY), "r") as h5:
                # HDF5 lists links by name; where a dataset's one chunk lies follows the order of the writes
                layers = h5["layers"]
                order = sorted(layers, key=lambda n: layers[n]["fire_count"].id.get_chunk_info(0).byte_offset)
            assert order == [str(layer) for layer in range(LAYERS)]

    @pytest.mark.parametrize("threads", [1, 3])
    def test_a_rank_holds_the_counts_of_threads_plus_one_units(self, threads):
        # README: writing holds up to 9 more packed layers per rank (8 writer threads, one being reduced), with
        # any number of thresholds (each threshold's counts are a packed layer of their own)
        c = self.comm()
        peaks = [held_peak(c, ranks, threads) for ranks in (list(range(c.size)), [0])]  # both on every rank
        assert max(peaks) <= threads + 1, peaks

    def test_ranks_with_different_writer_threads(self):
        # hosts of different sizes, or ranks bound to different numbers of cores (min(8, CPUs) writer threads
        # each): every rank must still take each unit to rank 0 at the same point, else they wait for each other
        c = self.comm()
        if c.size > 1:
            c.comm = Synchronous(c.comm)
        faulthandler.dump_traceback_later(60, exit=True)  # a deadlock ends this rank, and so the job
        try:
            spread = write(c, list(range(c.size)), (1, 4, 2)[c.rank % 3])
        finally:
            faulthandler.cancel_dump_traceback_later()
        alone = write(c, [0], 2)
        if c.rank == 0:
            assert contents(spread) == contents(alone)


def test_compressing_ranks_are_those_with_cpus_of_their_own():
    # unbound ranks of a host share its cores: the first compresses for them all
    assert writing.compressing_ranks(["a", "a", "b", "b"], [[0, 1], [0, 1], [0, 1], [0, 1]]) == [0, 2]
    # bound to cores of their own (srun --cpus-per-task, mpirun --bind-to core): every rank
    assert writing.compressing_ranks(["a", "a", "a"], [[0, 1], [2, 3], [4, 5]]) == [0, 1, 2]
    # overlapping sets: only ranks whose cores no chosen rank on the host has
    assert writing.compressing_ranks(["a"] * 4, [[0, 1], [1, 2], [2, 3], [4]]) == [0, 2, 3]
    assert writing.compressing_ranks(["a"], [[0]]) == [0]


def test_owners_take_units_in_turn():
    assert [writing.owner(k, [0, 2, 5]) for k in range(7)] == [0, 2, 5, 0, 2, 5, 0]


def test_split_stats_layout_is_what_writing_hands_on():
    lc = counted(0)[0]
    parts = split_stats(lc.stats(), WIDTH, len(THRESHOLDS))
    assert [int(p["active_hist"].sum()) for p in parts] == [TOKENS, TOKENS]


class TestSelf(BaseWriting):
    def comm(self):
        return dist.serial()


class TestWorld(BaseWriting):
    def comm(self):
        return dist.world()


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")
@pytest.mark.skipif("OMPI_COMM_WORLD_SIZE" in os.environ, reason="already under mpirun")
def test_under_mpirun():
    stdout = mpirun_pytest(__file__, 3)
    assert stdout.count("15 passed") == 3, stdout


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")
@pytest.mark.skipif("OMPI_COMM_WORLD_SIZE" in os.environ, reason="already under mpirun")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to bind two ranks to")
def test_run_with_ranks_bound_to_cores_of_their_own(tiny_models, tmp_path):
    """Two ranks bound to one core each both compress (experts, routers, two thresholds): the same files as one
    rank writes."""
    model = tiny_models["qwen2_moe"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["run", "--model", model, "--data", tiny.sample_path(), "--ctx", "32", "--chunks", "6",
            "--batch-size", "2", "--threshold", "0.5,1.0"]
    assert run_main(args + ["--out", one]).returncode == 0
    env = {k: v for k, v in cli_env().items() if "oversubscribe" not in v}  # oversubscribing leaves ranks unbound
    done = subprocess.run([MPIRUN, "--bind-to", "core", "-n", "2", sys.executable, "-m", "mpicorr", *args,
                           "--out", two], capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(compressed on 2 ranks)" in done.stdout, done.stdout
    for folder in ("threshold-0.5", "threshold-1.0"):
        mine = sorted(n for n in os.listdir(os.path.join(two, folder)) if n.endswith(".zstd"))
        assert mine == sorted(n for n in os.listdir(os.path.join(one, folder)) if n.endswith(".zstd"))
        assert len(mine) > 2
        for name in mine:
            with open(os.path.join(one, folder, name), "rb") as a, open(os.path.join(two, folder, name), "rb") as b:
                assert a.read() == b.read(), (folder, name)
        routers = [summary.read_moe(os.path.join(f, folder, summary.SUMMARY))[1] for f in (one, two)]
        assert plain(routers[0]) == plain(routers[1]) and routers[0]
