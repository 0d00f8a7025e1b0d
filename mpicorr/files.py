"""Crash-safe file writing: write under a temporary name in the same folder, fsync, then rename."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import BinaryIO, Iterator


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed to `path`."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_write(path: str) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears at `path` only once complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh
