"""Crash-safe file writing (a temporary name in the same folder, fsync, rename), and the analysis files' reader."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


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


def read_layer_groups(path: str, fmt: str, writer: str, build: Callable[[int, Any], T]) -> tuple[dict, dict[int, T]]:
    """(root attributes, {layer: build(layer, group)}) of an HDF5 file with a `format` attribute and one group
    per layer under `layers/` (the analysis files); a missing or foreign file is a UserError naming `writer`."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            attrs = dict(h5.attrs)
            if attrs.get("format") != fmt:
                raise UserError(f"{path}: not a file written by {writer}")
            return attrs, {int(n): build(int(n), g) for n, g in sorted(h5["layers"].items(), key=lambda kv: int(kv[0]))}
    except (OSError, KeyError) as exc:
        raise UserError(f"{path}: cannot read ({exc}); run {writer} first") from None
