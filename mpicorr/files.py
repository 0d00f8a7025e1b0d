"""Crash-safe file writing (a temporary name in the same folder, fsync, rename), the disk space it has, and the
analysis files' reader."""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def temporary(pattern: str) -> str:
    """The regular expression of atomic_path's temporary names for final names matching `pattern`."""
    return rf"\.(?:{pattern})\.tmp\d+"


def free_bytes(path: str) -> int:
    """Bytes a user may still write on the filesystem of `path` (or of its nearest existing parent folder)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def human(size: float) -> str:
    """A byte count for messages: 512 B, 3.4 MiB, 12.0 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed to `path`. The temporary is
    removed on any error; a full disk or quota, or a folder that is not writable (here or while the block
    wrote), is a UserError naming `path`."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in NOT_WRITABLE and exc.filename in (tmp, path):
            raise UserError(f"{path}: cannot write ({exc.strerror}); make its folder writable or write "
                            f"elsewhere") from None
        if exc.errno not in DISK_FULL:
            raise
        if os.path.exists(tmp):
            os.remove(tmp)  # first, so that the free space reported counts it
        raise UserError(f"{path}: cannot write ({exc.strerror}; {human(free_bytes(path))} free there); free "
                        f"space or write to another disk") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_write(path: str) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears at `path` only once complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh


def read_layer_groups(path: str, fmt: str, writer: str, build: Callable[[int, Any], T]) -> tuple[dict, dict[int, T]]:
    """(root attributes, {layer: build(layer, group)}) of an HDF5 file with a `format` attribute and one group
    per layer under `layers/` (the analysis files); a missing or foreign file is a UserError naming `writer`."""
    import h5py

    if not os.path.isfile(path):  # h5py's own message for this is three lines of HDF5 internals
        raise UserError(f"{path}: no such file; run {writer} first")
    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
            if attrs.get("format") != fmt:
                raise UserError(f"{path}: not a file written by {writer}")
            return attrs, {int(n): build(int(n), g) for n, g in sorted(h5["layers"].items(), key=lambda kv: int(kv[0]))}
    except (OSError, KeyError) as exc:
        raise UserError(f"{path}: cannot read ({exc}); run {writer} first") from None
