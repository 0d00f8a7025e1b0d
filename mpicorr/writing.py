"""The write phase: each unit's counts (a layer, an MoE expert, a router) summed over the ranks onto the rank
that owns it, compressed there, and written into --out by rank 0.

The ranks that compress are rank 0 and every rank with CPUs of its own (one per host when ranks are unbound;
compressing_ranks), and they own the units in turn. The owner receives a unit's reduce and, on its writer
threads, compresses the matrix file (zstd) and builds the summary group while the next units are reduced; rank
0 takes the finished units in unit order, those of other ranks as messages, and writes every file (--out is on
its disk). Several hosts' cores thus compress at once, and the reduces go to different roots instead of all to
rank 0. zstd's multi-threaded mode makes the same frame on any number of workers, so the files do not depend on
which rank compressed them nor on how many ranks there are. With one owner, rank 0 writes as it goes.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Iterator

import numpy as np

from . import matrixfile, summary
from .counting import split_stats
from .dist import Comm

WRITE_THREADS = 8  # units one rank compresses at once (each holds its counts while it works)


def compressing_ranks(hosts: list[str], cpu_sets: list[list[int]]) -> list[int]:
    """The ranks that compress units, in turn: rank 0, and each further rank none of whose CPUs a rank chosen
    before it on its host may use. Unbound ranks of one host share its cores: only the first compresses, on all
    of them, as fast as several would. Ranks bound to cores of their own (srun --cpus-per-task, mpirun
    --bind-to core) all compress, each on its own cores. `hosts`, `cpu_sets`: every rank's, in rank order."""
    chosen, taken = [], {}
    for rank, (host, cpus) in enumerate(zip(hosts, cpu_sets)):
        used = taken.setdefault(host, set())
        if used.isdisjoint(cpus):
            chosen.append(rank)
            used.update(cpus)
    return chosen


def owner(index: int, ranks: list[int]) -> int:
    """The rank that receives unit `index`'s reduce and compresses it."""
    return ranks[index % len(ranks)]


def matrix_path(folder: str, unit) -> str:
    return os.path.join(folder, matrixfile.matrix_name(unit.layer, unit.expert))


def unit_group(unit, width: int, stats: dict, pairs: np.ndarray, trials: int,
               sha: str | None) -> tuple[str, dict, dict]:
    """A unit's summary group: (path, datasets compressed ahead, attributes)."""
    if unit.router:
        data, attrs = summary.router_datasets(stats, pairs, width, trials)
    else:
        data, attrs = summary.layer_datasets(stats, pairs, width, trials)
        attrs = {**attrs, "matrix_sha256": sha}
    return summary.group_path(unit), summary.compress_all(data), attrs


def trials_of(stats: dict) -> int:
    """A unit's trials: the tokens it counted (an expert: those routed to it), which the active-neuron
    histogram sums to."""
    return int(stats["active_hist"].sum())


def unit_outputs(folder: str, unit, width: int, stats: dict, pairs: np.ndarray,
                 threads: int = 1) -> tuple[str, dict, dict]:
    """Rank 0's own unit: write its matrix file (not for routers), compressing on `threads` threads; return its
    summary group."""
    trials = trials_of(stats)
    sha = None if unit.router else matrixfile.write_matrix(matrix_path(folder, unit), unit.layer, width, trials,
                                                            pairs, threads)
    return unit_group(unit, width, stats, pairs, trials, sha)


def unit_encoded(unit, width: int, stats: dict, pairs: np.ndarray,
                 threads: int = 1) -> tuple[memoryview | None, tuple[str, dict, dict]]:
    """Another rank's unit: (its matrix file's bytes, None for a router; its summary group), for rank 0."""
    trials = trials_of(stats)
    data, sha = (None, None) if unit.router else \
        matrixfile.encode_file(unit.layer, width, trials, pairs, threads)
    return data, unit_group(unit, width, stats, pairs, trials, sha)


def write_received(folder: str, unit, data: np.ndarray | None, group: tuple) -> tuple[str, dict, dict]:
    """Rank 0: write the matrix file another rank encoded; return its summary group."""
    if data is not None:
        matrixfile.write_encoded(matrix_path(folder, unit), data)
    return group


class UnitWriter:
    """One rank's writer threads: up to `threads` units at once, each unit's zstd compression on a share of
    `cpus` (compression, hashing, deflating the summary datasets and the compiled top-partner search release the
    GIL). A unit waits for a free thread before it starts (each holds its counts or its frame until done), so a
    rank whose writers fall behind holds `threads` units and the one it reduces, not every unit handed to it. On
    rank 0, finished groups are stored into the summary files in unit order (h5py is not thread-safe) with at
    most `threads` units waiting."""

    def __init__(self, threads: int | None = None, cpus: int | None = None):
        cpus = cpus or len(os.sched_getaffinity(0))
        self.threads = threads or max(1, min(WRITE_THREADS, cpus))
        self.zstd_threads = max(1, cpus // self.threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mpicorr-write")
        self.pending: deque = deque()
        self.started: deque = deque()  # futures of start() that may not be done, oldest first

    def start(self, fn, *args) -> Future:
        """Run fn(*args) on a writer thread once fewer than `threads` earlier calls are unfinished (waiting for
        the oldest: the pool runs them in order), so that no call waits in the pool's queue holding its
        arguments (a unit's counts). An error of the call waited for is raised here."""
        while self.started and (self.started[0].done() or len(self.started) >= self.threads):
            self.started.popleft().result()
        future = self.pool.submit(fn, *args)
        self.started.append(future)
        return future

    def store(self, h5, future: Future) -> None:
        """Queue a unit's group for `h5` (a future of (path, datasets, attributes)); store finished ones while
        too many wait."""
        self.pending.append((h5, future))
        while len(self.pending) > self.threads:
            self._store()

    def submit(self, h5, folder: str, unit, width: int, stats: dict, pairs: np.ndarray) -> None:
        """Rank 0's own unit: write it on a writer thread and queue its group."""
        self.store(h5, self.start(unit_outputs, folder, unit, width, stats, pairs, self.zstd_threads))

    def _store(self) -> None:
        h5, future = self.pending.popleft()
        summary.write_group(h5, *future.result())

    def __enter__(self) -> "UnitWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        try:
            while kind is None and self.pending:
                self._store()
        finally:
            self.pool.shutdown(cancel_futures=True)


@contextmanager
def summary_writers(folders: list[str], root: bool) -> Iterator[list]:
    """summary.h5 writers, one per (existing) output folder, on rank 0; an empty list elsewhere."""
    with ExitStack() as stack:
        yield [stack.enter_context(summary.summary_writer(os.path.join(f, summary.SUMMARY))) for f in folders] \
            if root else []


def reduce_and_write_units(comm: Comm, units: list, folders: list[str], files: list, writer: UnitWriter,
                           ranks: list[int] | None = None) -> None:
    """Reduce every unit (counting.LayerCounts: its stats, then its pairs per threshold folder) onto its owner
    among `ranks` (compressing_ranks; default: rank 0 alone), compress it there and write it on rank 0 (`files`:
    rank 0's summary.h5 writers, one per folder). Each rank frees its own counts of a unit once they are sent. A
    unit is taken to rank 0 `lag` units after its reduce: its owner has that long to compress it, with enough of
    its units in flight to keep its writer threads busy (a unit takes one per folder), and holds at most as many
    compressed files waiting as the most writer threads of any owner, plus len(folders); UnitWriter.start bounds
    the counts held."""
    ranks = ranks or [0]
    lag = 0 if ranks == [0] else len(ranks) * max(1, agreed_threads(comm, writer, ranks) // len(folders))
    owned: dict[int, list[Future]] = {}
    for k, lc in enumerate(units):
        futures = reduce_unit(comm, lc, folders, owner(k, ranks), writer)
        if futures:
            owned[k] = futures
        if k >= lag:
            deliver(comm, units[k - lag].unit, folders, owner(k - lag, ranks), owned.pop(k - lag, []), files, writer)
    for j in range(max(0, len(units) - lag), len(units)):
        deliver(comm, units[j].unit, folders, owner(j, ranks), owned.pop(j, []), files, writer)


def agreed_threads(comm: Comm, writer: UnitWriter, ranks: list[int]) -> int:
    """The most writer threads of any rank of `ranks`, the same on every rank: ranks with different numbers of
    CPUs (hosts of different sizes) must still take each unit to rank 0 at the same point, or an owner sending a
    unit that rank 0 does not yet receive waits, and rank 0 with it in the next reduce."""
    every = comm.allgather(writer.threads)
    return max(every[r] for r in ranks)


def reduce_unit(comm: Comm, lc, folders: list[str], root: int, writer: UnitWriter) -> list[Future]:
    """Reduce one unit onto `root`; there, start its outputs (one per folder) on the writer threads."""
    stats = comm.reduce_sum(lc.stats(), root)
    stats = split_stats(stats, lc.width, len(folders)) if comm.rank == root else None
    futures = []
    for i, folder in enumerate(folders):
        pairs = comm.reduce_sum(lc.pairs[i].take(), root)
        lc.pairs[i] = None  # free this rank's counts before the next unit's
        if comm.rank == root:
            args = (lc.unit, lc.width, stats[i], pairs, writer.zstd_threads)
            futures.append(writer.start(unit_outputs, folder, *args) if root == 0 else
                           writer.start(unit_encoded, *args))
    return futures


def deliver(comm: Comm, unit, folders: list[str], root: int, futures: list[Future], files: list,
            writer: UnitWriter) -> None:
    """Take one unit's outputs to rank 0, which queues their groups for the summary files: its own directly,
    another owner's bytes as a message, written there on a writer thread."""
    if root == 0:
        for h5, future in zip(files, futures):
            writer.store(h5, future)
    elif comm.rank == root:
        for future in futures:
            data, group = future.result()
            comm.send_bytes(group, data, 0)
    elif comm.rank == 0:
        for h5, folder in zip(files, folders):
            group, data = comm.recv_bytes(root)
            writer.store(h5, writer.start(write_received, folder, unit, data, group))
