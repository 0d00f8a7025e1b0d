"""Checkpoints: each rank's partial raw sums and finished chunks, so that a killed run can resume.

One file per rank and run attempt, ``OUT/checkpoints/g<G>-r<R>.ckpt`` (G counts the attempts, R is the
rank), written atomically (temporary name, fsync, rename). Layout::

    b"MPICKPT1"  uint32 little-endian n  n bytes of UTF-8 JSON header
    then per layer: per threshold (identity "threshold", in order) uint64 n, a zstd frame of the packed
                    pair counts (header's "count_dtype");
                    uint64 n, a zstd frame of the int64 statistics (see counting.LayerCounts.stats)

The header holds the run identity (what must match on resume), the finished chunk ranges, this file's
fixed-point log-likelihood sum and prediction count, the counted units (layers, experts, routers), and
`absorbs`: the older checkpoint files whose counts this one already contains. Those are superseded, so no
chunk is ever counted twice even when a run dies between writing a new checkpoint and deleting the old ones.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import zstandard

from . import plan, triangle
from .counting import stats_size
from .errors import UserError
from .files import atomic_write

MAGIC = b"MPICKPT1"
FOLDER = "checkpoints"
LENGTH32 = struct.Struct("<I")
LENGTH64 = struct.Struct("<Q")
ZSTD_LEVEL = 1  # checkpoints are temporary: speed over size
NAME = re.compile(r"g(\d+)-r(\d+)\.ckpt")
# Fields of the run identity that a resume must match, with the option that sets each.
IDENTITY = {"model": "--model", "data_sha256": "--data", "ctx": "--ctx", "chunk_start": "--chunk-start",
            "chunks": "--chunks", "threshold": "--threshold", "batch_size": "--batch-size",
            "dtype": "--dtype", "site": "--site", "site_module": "--site-module", "dump": "--dump",
            "chunking": "--chunking", "text_field": "--text-field"}
RANGE = ("chunk_start", "chunks")  # the chunk range, which --part sets too: named as one range
# What checkpoints written before a key existed meant by its absence (before corpora: concat, a plain file).
IDENTITY_DEFAULTS = {"chunking": "concat", "text_field": None}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's header."""

    path: str
    identity: dict
    finished: list[plan.Batch]
    nll: int
    predictions: int
    layers: list[tuple[str, int]]     # (counting.Unit name, width): block_5, block_5_expert_3, block_5_router
    count_dtype: str                  # numpy dtype of the pair counts, e.g. "<i4"
    absorbs: list[str]

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def folder(out: str) -> str:
    """Where a run's checkpoints live."""
    return os.path.join(out, FOLDER)


def file_name(generation: int, rank: int) -> str:
    """Checkpoint file name of a rank in a run attempt."""
    return f"g{generation}-r{rank}.ckpt"


def write(path: str, ck: Checkpoint, layers: Iterable[tuple[list[np.ndarray], np.ndarray]]) -> None:
    """Write a checkpoint atomically; `layers` yields ([packed pairs per threshold], int64 stats) one layer
    at a time."""
    head = {"identity": ck.identity, "finished": ck.finished, "nll": ck.nll, "predictions": ck.predictions,
            "layers": ck.layers, "count_dtype": ck.count_dtype, "absorbs": ck.absorbs}
    raw = json.dumps(head).encode()
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
    with atomic_write(path) as fh:
        fh.write(MAGIC + LENGTH32.pack(len(raw)) + raw)
        for pairs, stats in layers:
            for array, dtype in [*((p, ck.count_dtype) for p in pairs), (stats, "<i8")]:
                frame = cctx.compress(memoryview(np.ascontiguousarray(array, dtype=dtype)).cast("B"))
                fh.write(LENGTH64.pack(len(frame)) + frame)


def read_header(path: str) -> Checkpoint:
    """The header of a checkpoint file; UserError if it is not one or is damaged."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(MAGIC) + LENGTH32.size)
            if len(magic) < len(MAGIC) + LENGTH32.size or magic[: len(MAGIC)] != MAGIC:
                raise ValueError("not a checkpoint file")
            (n,) = LENGTH32.unpack_from(magic, len(MAGIC))
            if n > os.path.getsize(path):
                raise ValueError("header length exceeds the file")
            head = json.loads(fh.read(n))
        return Checkpoint(path, head["identity"], [tuple(r) for r in head["finished"]], int(head["nll"]),
                          int(head["predictions"]), [tuple(x) for x in head["layers"]], str(head["count_dtype"]),
                          list(head["absorbs"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged(path, exc) from None


def read_layers(ck: Checkpoint) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """([packed pairs per threshold], int64 stats) of each layer of a checkpoint, in order, checked against
    the header."""
    thresholds = len(ck.identity["threshold"])
    dctx = zstandard.ZstdDecompressor()
    try:
        size = os.path.getsize(ck.path)
        with open(ck.path, "rb") as fh:
            (n,) = LENGTH32.unpack_from(fh.read(len(MAGIC) + LENGTH32.size), len(MAGIC))
            fh.seek(n, os.SEEK_CUR)
            for _, width in ck.layers:
                pairs = [_frame(fh, dctx, size, np.dtype(ck.count_dtype), triangle.packed_size(width))
                         for _ in range(thresholds)]
                stats = _frame(fh, dctx, size, np.dtype("<i8"), stats_size(width, thresholds))
                yield pairs, stats
            if fh.tell() != size:
                raise ValueError("trailing bytes")
    except (OSError, ValueError, struct.error, zstandard.ZstdError) as exc:
        raise damaged(ck.path, exc) from None


def _frame(fh, dctx: zstandard.ZstdDecompressor, size: int, dtype: np.dtype, count: int) -> np.ndarray:
    (n,) = LENGTH64.unpack(fh.read(LENGTH64.size))
    if fh.tell() + n > size:
        raise ValueError("truncated")
    raw = dctx.decompress(fh.read(n), max_output_size=count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"a layer holds {len(raw)} bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


def damaged(path: str, exc: Exception) -> UserError:
    """The error for an unreadable checkpoint: deleting it only means its chunks are counted again."""
    return UserError(f"{path}: damaged checkpoint ({exc}); delete it (its chunks are then counted again) "
                     f"or start over with --force")


@dataclass(frozen=True)
class Resume:
    """What a resuming run takes over: the live checkpoints, the batches still to count, the next generation."""

    live: list[Checkpoint]
    todo: list[plan.Batch]
    generation: int


def scan(out: str) -> tuple[list[Checkpoint], int]:
    """(live checkpoints of `out`, sorted by name; next generation). Deletes superseded files."""
    where = folder(out)
    names = sorted(f for f in os.listdir(where) if NAME.fullmatch(f)) if os.path.isdir(where) else []
    found = [read_header(os.path.join(where, f)) for f in names]
    superseded = {name for ck in found for name in ck.absorbs}
    for ck in found:
        if ck.name in superseded:
            os.remove(ck.path)
    generation = 1 + max((int(NAME.fullmatch(f).group(1)) for f in names), default=0)
    return [ck for ck in found if ck.name not in superseded], generation


def resume(out: str, identity: dict, work: list[plan.Batch]) -> Resume:
    """Check the live checkpoints of `out` against this run; the batches of `work` they have not counted."""
    live, generation = scan(out)
    for ck in live:
        for key, option in IDENTITY.items():
            before = ck.identity.get(key, IDENTITY_DEFAULTS.get(key))
            if before != identity[key] and key in RANGE:
                raise range_differs(ck, identity)
            if before != identity[key]:
                before, now = differing(before, identity[key])
                raise UserError(f"--resume: {ck.path} was made with a different {option} "
                                f"({_show(before)} there, {_show(now)} now); "
                                f"rerun with the same options, or start over with --force")
    finished = [r for ck in live for r in ck.finished]
    merged = plan.merge_ranges(finished)
    if sum(b - a for a, b in merged) != sum(b - a for a, b in finished):
        raise UserError(f"--resume: checkpoints in {folder(out)} count some chunks twice; delete the folder "
                        f"and start over with --force")
    try:
        todo = plan.unfinished(work, merged)
    except ValueError as exc:
        raise UserError(f"--resume: checkpoints in {folder(out)} do not match this run's batches ({exc}); "
                        f"start over with --force") from None
    return Resume(live, todo, generation)


def range_differs(ck: Checkpoint, identity: dict) -> UserError:
    """The error for a resume over other chunks: named as a range, since --part sets it as well as --chunk-start
    and --chunks (a user who changed --part would not know the --chunks it names)."""
    def span(ident: dict) -> str:
        return f"[{ident['chunk_start']}, {ident['chunk_start'] + ident['chunks']})"
    return UserError(f"--resume: {ck.path} was made with a different chunk range ({span(ck.identity)} there, "
                     f"{span(identity)} now; --chunk-start, --chunks and --part set it); rerun with the same "
                     f"options, or start over with --force")


def differing(before, now) -> tuple:
    """Two identity values as shown in a message: of dicts (--dump's), only the keys that differ, which the
    60-character cut of _show would otherwise hide behind a long folder name."""
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return before, now
    keys = [k for k in {**before, **now} if before.get(k) != now.get(k)]
    return {k: before.get(k) for k in keys}, {k: now.get(k) for k in keys}


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
