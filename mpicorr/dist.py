"""The only module that imports mpi4py: a small communicator wrapper with a serial fallback.

Library code receives `rank`/`size` or a `Comm`; it never reads the environment or MPI state itself.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, TypeVar

import numpy as np

from .errors import UserError

T = TypeVar("T")

try:  # mpi4py is a dependency, but a laptop without an MPI library can still run serially
    from mpi4py import MPI
except ImportError:  # pragma: no cover - exercised only where mpi4py is missing
    MPI = None


class SharedError(UserError):
    """A UserError raised on every rank at once (so only rank 0 reports it and all ranks exit cleanly)."""


class Comm:
    """rank/size plus the few collective operations mpicorr needs. `Comm()` is the serial communicator."""

    def __init__(self, comm: Any = None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.host = MPI.Get_processor_name() if comm is not None else socket.gethostname()
        self.local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank() if comm is not None else 0

    def bcast(self, obj: T) -> T:
        """Rank 0's object on every rank."""
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def allgather(self, obj: T) -> list[T]:
        """Every rank's object, in rank order, on every rank."""
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def reduce_sum(self, array: np.ndarray) -> np.ndarray | None:
        """Element-wise sum of every rank's array on rank 0 (None elsewhere)."""
        array = np.ascontiguousarray(array)
        if self.comm is None:
            return array.copy()
        out = np.empty_like(array) if self.rank == 0 else None
        self.comm.Reduce(array, out, op=MPI.SUM, root=0)
        return out

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

    def abort(self, status: int) -> None:
        """End every rank of the job now."""
        if self.comm is not None and self.size > 1:
            self.comm.Abort(status)
        raise SystemExit(status)


def world() -> Comm:
    """The communicator of the whole job (serial when mpi4py is missing)."""
    return Comm(MPI.COMM_WORLD if MPI is not None else None)


def serial() -> Comm:
    """A one-rank communicator; with mpi4py, COMM_SELF, so the MPI code paths run too."""
    return Comm(MPI.COMM_SELF if MPI is not None else None)
