"""The only module that imports mpi4py: a small communicator wrapper with a serial fallback.

Library code receives `rank`/`size` or a `Comm`; it never reads the environment or MPI state itself.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, TypeVar

import numpy as np

from .errors import SharedError, UserError  # noqa: F401 (SharedError: re-exported)

T = TypeVar("T")

try:  # mpi4py is a dependency, but a laptop without an MPI library can still run serially
    from mpi4py import MPI
except ImportError:  # pragma: no cover - exercised only where mpi4py is missing
    MPI = None


class Comm:
    """rank/size plus the few collective operations mpicorr needs. `Comm()` is the serial communicator."""

    def __init__(self, comm: Any = None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.host = MPI.Get_processor_name() if comm is not None else socket.gethostname()
        self.local_rank = local_rank(comm) if comm is not None else 0

    def bcast(self, obj: T) -> T:
        """Rank 0's object on every rank."""
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def allgather(self, obj: T) -> list[T]:
        """Every rank's object, in rank order, on every rank."""
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def reduce_sum(self, array: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Element-wise sum of every rank's array on rank `root` (None elsewhere); on one rank, `array` itself (a
        14336-wide layer's counts are 411 MB: no copy)."""
        array = np.ascontiguousarray(array)
        if self.comm is None or self.size == 1:
            return array
        out = np.empty_like(array) if self.rank == root else None
        self.comm.Reduce(array, out, op=MPI.SUM, root=root)
        return out

    def send_bytes(self, meta: Any, data: memoryview | None, dest: int) -> None:
        """Send a small picklable `meta` and then `data` (bytes of any length, or None) to rank `dest`, which
        calls recv_bytes. The bytes go as buffers, PIECE at a time (no pickling, no 2 GiB message limit)."""
        size = -1 if data is None else len(data)
        self.comm.send((meta, size), dest=dest, tag=BYTES)
        view = memoryview(data).cast("B") if data is not None else memoryview(b"")
        for start in range(0, len(view), PIECE):
            self.comm.Send(view[start : start + PIECE], dest=dest, tag=BYTES)

    def recv_bytes(self, source: int) -> tuple[Any, np.ndarray | None]:
        """(meta, uint8 array of the bytes, or None) sent by rank `source`'s send_bytes."""
        meta, size = self.comm.recv(source=source, tag=BYTES)
        if size < 0:
            return meta, None
        data = np.empty(size, dtype=np.uint8)
        for start in range(0, size, PIECE):
            self.comm.Recv(data[start : start + PIECE], source=source, tag=BYTES)
        return meta, data

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of every rank's array, on every rank (small arrays: the corpus's token counts)."""
        array = np.ascontiguousarray(array)
        if self.comm is None or self.size == 1:
            return array
        out = np.empty_like(array)
        self.comm.Allreduce(array, out, op=MPI.SUM)
        return out

    def split(self, color: int) -> "Comm":
        """The ranks that give the same color, as a new communicator (ranks keep their order)."""
        if self.comm is None:
            return self
        return Comm(self.comm.Split(color, self.rank))

    def bcast_array(self, array: np.ndarray | None, size: int) -> np.ndarray:
        """Rank 0's uint8 array of `size` bytes on every rank (a buffer Bcast, no pickling)."""
        buf = np.ascontiguousarray(array, dtype=np.uint8) if self.rank == 0 else np.empty(size, dtype=np.uint8)
        if self.comm is not None and self.size > 1:
            self.comm.Bcast(buf, root=0)
        return buf

    def checked(self, fn: Callable[[], T], root_only: bool = False) -> T:
        """Run fn on every rank (or on rank 0, broadcasting its result).

        A UserError on any rank becomes a SharedError on all ranks, so the job ends cleanly instead of
        leaving the other ranks waiting in a collective call.
        """
        result, error = None, None
        if not root_only or self.rank == 0:
            try:
                result = fn()
            except UserError as exc:
                error = str(exc)
        errors = [error] if root_only else self.allgather(error)
        if root_only:
            result, errors[0] = self.bcast((result, error))
        for rank, message in enumerate(errors):
            if message is not None:
                raise SharedError(message if rank == 0 or self.size == 1 else f"rank {rank}: {message}")
        return result

    def arrive(self, seconds: float) -> bool:
        """Wait up to `seconds` until every rank has called this (a non-blocking barrier); False on timeout.
        For ranks that each end on their own (SIGTERM): those that are told as well get time to save."""
        if self.comm is None or self.size == 1:
            return True
        request, deadline = self.comm.Ibarrier(), time.monotonic() + seconds
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def abort(self, status: int) -> None:
        """End every rank of the job now."""
        if self.comm is not None and self.size > 1:
            self.comm.Abort(status)
        raise SystemExit(status)


def local_rank(comm: Any) -> int:
    """This rank's index among the ranks of its node; the node communicator is freed at once (a Comm is made
    for every split and staging step: each left behind holds MPI resources until the job ends)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


ASK, REPLY = 7101, 7102  # message tags of the Service
BYTES = 7103  # message tag of send_bytes
PIECE = 1 << 30  # bytes per message of send_bytes (MPI counts are C ints)
POLL_S = 0.002  # the service thread polls (Iprobe + sleep) instead of busy-waiting in a blocking receive


class Service:
    """Rank 0 answers small messages from every rank while it computes too (a background thread).

    `handler(rank, message)` runs on rank 0 under a lock, for rank 0's own calls as well. Between
    `Service(...)` and `close()` the main threads make no other MPI calls; `close()` on rank 0 returns once
    every rank has closed. Needs MPI_THREAD_SERIALIZED or more (Open MPI and MPICH give MULTIPLE).
    """

    def __init__(self, comm: Comm, handler: Callable[[int, Any], Any]):
        self.comm, self.handler, self.lock = comm, handler, threading.Lock()
        self.remote = comm.comm is not None and comm.size > 1
        self.thread = None
        if self.remote and comm.rank == 0:
            self.thread = threading.Thread(target=self._serve, name="mpicorr-service", daemon=True)
            self.thread.start()

    @staticmethod
    def check(comm: Comm) -> None:
        """Refuse an MPI without the thread support the service needs (call on every rank, before it)."""
        if comm.comm is not None and comm.size > 1 and MPI.Query_thread() < MPI.THREAD_SERIALIZED:
            raise UserError("this MPI library gives no thread support (MPI_THREAD_SERIALIZED), which the job's "
                            "live progress and --schedule dynamic need; use an MPI built with threads")

    def ask(self, message: Any) -> Any:
        """Send a message to rank 0 and wait for the handler's answer."""
        if not self.remote or self.comm.rank == 0:
            with self.lock:
                return self.handler(self.comm.rank, message)
        self.comm.comm.send(("ask", message), dest=0, tag=ASK)
        return self.comm.comm.recv(source=0, tag=REPLY)

    def tell(self, message: Any) -> None:
        """Send a message to rank 0's handler without waiting (small messages go out at once)."""
        if not self.remote or self.comm.rank == 0:
            with self.lock:
                self.handler(self.comm.rank, message)
            return
        self.comm.comm.send(("tell", message), dest=0, tag=ASK)

    def close(self) -> None:
        """This rank is done; on rank 0, wait until every rank is."""
        if not self.remote:
            return
        if self.comm.rank != 0:
            self.comm.comm.send(("close", None), dest=0, tag=ASK)
        elif self.thread is not None:
            self.thread.join()

    def _serve(self) -> None:
        status, open_ranks = MPI.Status(), self.comm.size - 1
        while open_ranks:
            if not self.comm.comm.iprobe(source=MPI.ANY_SOURCE, tag=ASK, status=status):
                time.sleep(POLL_S)
                continue
            source = status.Get_source()
            kind, message = self.comm.comm.recv(source=source, tag=ASK)
            if kind == "close":
                open_ranks -= 1
                continue
            with self.lock:
                answer = self.handler(source, message)
            if kind == "ask":
                self.comm.comm.send(answer, dest=source, tag=REPLY)


def world() -> Comm:
    """The communicator of the whole job (serial when mpi4py is missing)."""
    return Comm(MPI.COMM_WORLD if MPI is not None else None)


def serial() -> Comm:
    """A one-rank communicator; with mpi4py, COMM_SELF, so the MPI code paths run too."""
    return Comm(MPI.COMM_SELF if MPI is not None else None)
