"""The matrix file format of the original tool: `correlations_block_<L>.zstd` (one reader, one writer).

Header, five little-endian uint32:  magic, trials >> 32, trials & 0xFFFFFFFF, block, width N.
Then one zstd frame holding the N(N+1)/2 packed lower-triangle counts, row-major, little-endian:
uint32 under magic 0xCA7DCA7D (the original), uint64 under magic 0xCA7DCA64 (mpicorr's variant, used
only when trials >= 2**32, where a uint32 count could wrap).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass

import numpy as np
import zstandard

from . import layout
from .errors import UserError
from .files import atomic_write

MAGIC32 = 0xCA7DCA7D
MAGIC64 = 0xCA7DCA64
HEADER = struct.Struct("<5I")
# zstd level 1: on a 16-core host a 14336-wide layer compressed in 0.31 s against 0.49 s at level 3, the frame
# about 1 % larger (benchmarks/writes.py --profile).
ZSTD_LEVEL = 1
MAX_WIDTH = 1 << 20
UNSIZED_PIECE = 8192
WRITE_PIECE = 1 << 24  # input bytes per compression step (zstd's workers take jobs of a few MB)  # input bytes per step when a frame does not state its decompressed size


@dataclass(frozen=True)
class Header:
    """What the five header words say."""

    magic: int
    trials: int
    block: int
    width: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u4") if self.magic == MAGIC32 else np.dtype("<u8")


def matrix_name(block: int, expert: int | None = None) -> str:
    """File name of a block's matrix, or of one expert's of an MoE block."""
    return f"correlations_block_{block}.zstd" if expert is None else f"correlations_block_{block}_expert_{expert}.zstd"


def payload(trials: int, packed: np.ndarray) -> np.ndarray:
    """The counts as the file stores them, little-endian uint32 (uint64 from 2**32 trials on); a view of
    `packed` when it already has that width (counts are never negative, so int32 bytes are uint32 bytes)."""
    want = np.dtype("<u8" if trials >= (1 << 32) else "<u4")
    arr = np.asarray(packed)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == want.itemsize and arr.dtype.byteorder in "=<|" \
            and arr.flags.c_contiguous:
        return arr.view(want)
    return np.ascontiguousarray(arr, dtype=want)


class _Sink:
    """A file that hashes what is written to it."""

    def __init__(self, fh):
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)


def _compress(data: np.ndarray, sink, threads: int) -> None:
    """One zstd frame of `data` (with its size and a checksum) written to `sink`, in pieces. zstd's
    multi-threaded mode, with at least one worker, gives the same bytes for any number of workers, so files
    do not depend on the machine (its single-threaded mode gives other bytes)."""
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=max(1, threads), write_checksum=True,
                                    write_content_size=True)
    view = memoryview(data).cast("B")
    with cctx.stream_writer(sink, size=len(view), closefd=False) as writer:
        for start in range(0, len(view), WRITE_PIECE):
            writer.write(view[start : start + WRITE_PIECE])


def header_bytes(block: int, width: int, trials: int) -> bytes:
    """The 20-byte header (the count width follows from `trials`)."""
    return HEADER.pack(MAGIC64 if trials >= (1 << 32) else MAGIC32, trials >> 32, trials & 0xFFFFFFFF, block, width)


def _check_shape(packed: np.ndarray, width: int) -> None:
    if np.shape(packed) != (layout.packed_size(width),):
        raise ValueError(f"packed counts have shape {np.shape(packed)}, expected ({layout.packed_size(width)},)")


def encode(block: int, width: int, trials: int, packed: np.ndarray) -> tuple[bytes, bytes]:
    """(header, zstd frame) for the packed counts: the bytes write_matrix writes."""
    _check_shape(packed, width)
    frame = io.BytesIO()
    _compress(payload(trials, packed), frame, 1)
    return header_bytes(block, width, trials), frame.getvalue()


def write_matrix(path: str, block: int, width: int, trials: int, packed: np.ndarray, threads: int = 1) -> str:
    """Write one matrix file atomically (temporary name, fsync, rename), compressing on `threads` threads
    (the bytes do not depend on it) with no copy of int32 counts; return its SHA-256 (hex)."""
    _check_shape(packed, width)
    with atomic_write(path) as fh:
        sink = _Sink(fh)
        sink.write(header_bytes(block, width, trials))
        _compress(payload(trials, packed), sink, threads)
    return sink.sha.hexdigest()


def parse_header(data: bytes, path: str) -> Header:
    """Decode and check the 20-byte header."""
    if len(data) < HEADER.size:
        raise UserError(f"{path}: truncated ({len(data)} bytes, the header alone is {HEADER.size})")
    magic, hi, lo, block, width = HEADER.unpack_from(data)
    if magic not in (MAGIC32, MAGIC64):
        raise UserError(f"{path}: wrong magic 0x{magic:08X}; not a correlations matrix file")
    if not 0 < width <= MAX_WIDTH:
        raise UserError(f"{path}: width {width} is out of range (1..{MAX_WIDTH}); the file is damaged")
    return Header(magic, (hi << 32) | lo, block, width)


def read_matrix(path: str, sha256: str | None = None) -> tuple[Header, np.ndarray]:
    """Read a matrix file: (header, packed counts as uint32 or uint64). Checks sizes and trailing bytes,
    and the file's SHA-256 when `sha256` (as recorded in summary.h5) is given."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path}: SHA-256 differs from the one in its run's summary.h5; the file was changed "
                        f"or damaged after the run")
    header = parse_header(data, path)
    expected = layout.packed_size(header.width) * header.dtype.itemsize
    frame = data[HEADER.size :]
    try:
        size = zstandard.frame_content_size(frame)
        if size not in (-1, expected):
            raise UserError(f"{path}: frame holds {size} bytes but width {header.width} needs {expected}")
        if size == expected:
            raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected, allow_extra_data=False)
        else:
            raw = _decompress_unsized(frame, expected, path)
    except zstandard.ZstdError as exc:
        raise UserError(f"{path}: bad zstd data ({exc})") from None
    except MemoryError:
        raise UserError(f"{path}: width {header.width} needs {expected / 2**30:.1f} GiB of memory to read") from None
    if len(raw) != expected:
        raise UserError(f"{path}: holds {len(raw)} bytes of counts but width {header.width} needs {expected}")
    return header, np.frombuffer(raw, dtype=header.dtype)


def _decompress_unsized(frame: bytes, expected: int, path: str) -> bytes:
    """Decompress a frame whose header gives no content size, never holding more than `expected` bytes.

    The input goes in small pieces: a zstd block expands to at most 128 KiB and takes at least 3 bytes,
    so one piece cannot produce more than about 350 MiB however the file was crafted.
    """
    dobj = zstandard.ZstdDecompressor().decompressobj()
    parts, total, i = [], 0, 0
    for i in range(0, len(frame), UNSIZED_PIECE):
        part = dobj.decompress(frame[i : i + UNSIZED_PIECE])
        total += len(part)
        if total > expected:
            raise UserError(f"{path}: holds more than the {expected} bytes of counts its width needs")
        parts.append(part)
        if dobj.eof:
            break
    if not dobj.eof:
        raise UserError(f"{path}: truncated zstd frame")
    if dobj.unused_data or i + UNSIZED_PIECE < len(frame):
        raise UserError(f"{path}: trailing bytes after the zstd frame")
    return b"".join(parts)


def exists_any(folder: str) -> list[str]:
    """Matrix files already in `folder`."""
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.startswith("correlations_block_") and f.endswith(".zstd"))
