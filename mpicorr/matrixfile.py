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
from typing import Iterator

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
WRITE_PIECE = 1 << 24  # input bytes per compression step (zstd's workers take jobs of a few MB)
CONVERT_PIECE = 1 << 18  # counts converted per step when the array's type is not the file's (1 MiB as uint32)
READ_PIECE = 1 << 20   # file bytes per decompression step
ZSTD_BLOCK = zstandard.BLOCKSIZE_MAX  # the most one zstd block decompresses to (128 KiB)
FRAME_HEADER_MAX = 18  # bytes of the longest zstd frame header
# The largest zstd window a reader accepts (zstd's own default limit, made explicit): the most memory a
# frame can make the decompressor hold beside the counts.
MAX_WINDOW = 1 << 27


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


def count_dtype(trials: int) -> np.dtype:
    """The file's count type: little-endian uint32, uint64 from 2**32 trials on."""
    return np.dtype("<u8" if trials >= (1 << 32) else "<u4")


def _viewable(arr: np.ndarray, want: np.dtype) -> bool:
    """Whether `arr`'s bytes already are `want`'s (counts are never negative, so int32 bytes are uint32 bytes)."""
    return arr.dtype.kind in "iu" and arr.dtype.itemsize == want.itemsize and arr.dtype.byteorder in "=<|" \
        and arr.flags.c_contiguous


def payload(trials: int, packed: np.ndarray) -> np.ndarray:
    """The counts as the file stores them, little-endian uint32 (uint64 from 2**32 trials on); a view of
    `packed` when it already has that width."""
    want, arr = count_dtype(trials), np.asarray(packed)
    return arr.view(want) if _viewable(arr, want) else np.ascontiguousarray(arr, dtype=want)


def _pieces(data: np.ndarray, want: np.dtype) -> Iterator[memoryview]:
    """`data`'s counts as `want` bytes, in pieces: views where it has that layout already, else converted
    CONVERT_PIECE entries at a time (int64 counts written as uint32 need no full copy of the layer)."""
    arr = np.asarray(data).reshape(-1)
    if _viewable(arr, want):
        view = memoryview(arr.view(want)).cast("B")
        yield from (view[start : start + WRITE_PIECE] for start in range(0, len(view), WRITE_PIECE))
        return
    for start in range(0, len(arr), CONVERT_PIECE):
        yield memoryview(np.ascontiguousarray(arr[start : start + CONVERT_PIECE], dtype=want)).cast("B")


class _Sink:
    """A file that hashes what is written to it."""

    def __init__(self, fh):
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)


def _compress(data: np.ndarray, sink, threads: int, want: np.dtype | None = None) -> None:
    """One zstd frame of `data` as `want` counts (default: its own type), with its size and a checksum,
    written to `sink` in pieces. zstd's multi-threaded mode, with at least one worker, gives the same bytes
    for any number of workers and any piece sizes, so files do not depend on the machine (its
    single-threaded mode gives other bytes)."""
    want = np.dtype(want if want is not None else np.asarray(data).dtype)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=max(1, threads), write_checksum=True,
                                    write_content_size=True)
    with cctx.stream_writer(sink, size=np.size(data) * want.itemsize, closefd=False) as writer:
        for piece in _pieces(data, want):
            writer.write(piece)


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
    _compress(packed, frame, 1, count_dtype(trials))
    return header_bytes(block, width, trials), frame.getvalue()


def _encode_into(fh, block: int, width: int, trials: int, packed: np.ndarray, threads: int) -> str:
    """Write a matrix file's bytes (header, then the frame compressed on `threads` threads) to `fh`; their
    SHA-256 (hex)."""
    _check_shape(packed, width)
    sink = _Sink(fh)
    sink.write(header_bytes(block, width, trials))
    _compress(packed, sink, threads, count_dtype(trials))
    return sink.sha.hexdigest()


def write_matrix(path: str, block: int, width: int, trials: int, packed: np.ndarray, threads: int = 1) -> str:
    """Write one matrix file atomically (temporary name, fsync, rename), compressing on `threads` threads
    (the bytes do not depend on it) with no copy of int32 counts (and of other counts, converted a piece at a
    time); return its SHA-256 (hex)."""
    _check_shape(packed, width)  # before the temporary file is made
    with atomic_write(path) as fh:
        return _encode_into(fh, block, width, trials, packed, threads)


def encode_file(block: int, width: int, trials: int, packed: np.ndarray, threads: int = 1) -> tuple[memoryview, str]:
    """The bytes write_matrix writes (header and frame), in memory, and their SHA-256 (hex): for a rank that
    compresses a layer which rank 0 then writes with write_encoded."""
    buffer = io.BytesIO()
    sha = _encode_into(buffer, block, width, trials, packed, threads)
    return buffer.getbuffer(), sha


def write_encoded(path: str, data) -> None:
    """Write a matrix file's bytes made by encode_file, atomically (temporary name, fsync, rename)."""
    with atomic_write(path) as fh:
        fh.write(data)


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


def read_header(path: str) -> Header:
    """The header of a matrix file (20 bytes read)."""
    try:
        with open(path, "rb") as fh:
            return parse_header(fh.read(HEADER.size), path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def min_frame_size(nbytes: int) -> int:
    """The fewest bytes a zstd frame that decompresses to `nbytes` can take: at least a 6-byte frame header,
    and every block yields at most 128 KiB for at least 4 bytes (an RLE block: 3 of header, 1 of content)."""
    return 6 + 4 * -(-nbytes // ZSTD_BLOCK)


def read_matrix(path: str, sha256: str | None = None) -> tuple[Header, np.ndarray]:
    """Read a matrix file: (header, packed counts as uint32 or uint64). Checks sizes and trailing bytes,
    and the file's SHA-256 when `sha256` (as recorded in summary.h5) is given, hashed while reading.

    Memory: one array of the counts, decompressed into place, plus zstd's window (at most MAX_WINDOW);
    a file too short or too long for its header's width is refused before anything is allocated."""
    try:
        with open(path, "rb") as fh:
            return _read(fh, path, sha256)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def check_structure(path: str) -> Header:
    """The header of a matrix file whose frame has the size, blocks and end its width needs (read_matrix's
    checks before decompressing, from the block headers alone: a file cut short, by hand or by a full disk,
    is found without reading its counts)."""
    try:
        with open(path, "rb") as fh:
            return _check_structure(fh, path)[0]
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _check_structure(fh, path: str) -> tuple[Header, bytes, int]:
    """(header, its bytes, file size) of an open matrix file, after the plausibility and frame checks."""
    size = os.fstat(fh.fileno()).st_size
    head = fh.read(HEADER.size)
    header = parse_header(head, path)
    expected = layout.packed_size(header.width) * header.dtype.itemsize
    if size - HEADER.size < min_frame_size(expected):
        raise UserError(f"{path}: truncated ({size} bytes; width {header.width} needs at least "
                        f"{HEADER.size + min_frame_size(expected)} even at zstd's highest compression)")
    _check_frame(fh.fileno(), size, expected, header.width, path)
    return header, head, size


def _read(fh, path: str, sha256: str | None) -> tuple[Header, np.ndarray]:
    """read_matrix on an open file: header, plausibility and frame checks, then one decompression."""
    header, head, size = _check_structure(fh, path)
    expected = layout.packed_size(header.width) * header.dtype.itemsize
    try:
        packed = np.empty(layout.packed_size(header.width), dtype=header.dtype)
    except MemoryError:
        raise UserError(f"{path}: width {header.width} needs {expected / 2**30:.1f} GiB of memory to read") from None
    sha = hashlib.sha256(head) if sha256 is not None else None
    _decompress_into(_Source(fh, size - HEADER.size, sha), memoryview(packed).cast("B"), path)
    if sha is not None and sha.hexdigest() != sha256:
        raise UserError(f"{path}: SHA-256 differs from the one in its run's summary.h5; the file was changed "
                        f"or damaged after the run")
    return header, packed


class _Source:
    """The rest of the file (`left` bytes) read in pieces for the decompressor, hashing what passes (no
    second read for the SHA-256); a piece never asks for more than is left (a read allocates what it asks)."""

    def __init__(self, fh, left: int, sha):
        self.fh, self.left, self.sha = fh, left, sha

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        if self.sha is not None:
            self.sha.update(data)
        return data


def _check_frame(fd: int, size: int, expected: int, width: int, path: str) -> None:
    """Refuse, before allocating, a frame that states another size than `expected`, runs past the file's
    end, is followed by other bytes, or cannot hold the `expected` bytes of counts."""
    try:
        head = os.pread(fd, FRAME_HEADER_MAX, HEADER.size)
        params = zstandard.get_frame_parameters(head)
        start = HEADER.size + zstandard.frame_header_size(head)
    except zstandard.ZstdError as exc:
        raise UserError(f"{path}: bad zstd data ({exc})") from None
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, expected):
        raise UserError(f"{path}: frame holds {params.content_size} bytes but width {width} needs {expected}")
    end, most = _walk_blocks(fd, start, size, path)
    end += 4 if params.has_checksum else 0
    if end > size:
        raise UserError(f"{path}: truncated zstd frame ({size} bytes, the frame needs {end})")
    if end < size:
        raise UserError(f"{path}: trailing bytes after the zstd frame ({size - end} bytes)")
    if most < expected:
        raise UserError(f"{path}: holds at most {most} bytes of counts but width {width} needs {expected}")


def _walk_blocks(fd: int, pos: int, size: int, path: str) -> tuple[int, int]:
    """(offset after the last block, the most bytes the blocks can decompress to), from the 3-byte block
    headers alone (read with pread: a few bytes per up to 128 KiB of counts)."""
    most, last = 0, False
    while not last:
        block = os.pread(fd, 3, pos)
        if len(block) < 3:
            raise UserError(f"{path}: truncated zstd frame (it ends at byte {size} inside its blocks)")
        word = int.from_bytes(block, "little")
        last, kind, length = word & 1, word >> 1 & 3, word >> 3
        if kind == 3:
            raise UserError(f"{path}: bad zstd data (reserved block type at byte {pos})")
        pos += 3 + (1 if kind == 1 else length)  # raw: length bytes; RLE: one byte repeated; compressed
        most += ZSTD_BLOCK if kind == 2 else length
    return pos, most


def _decompress_into(source: _Source, out: memoryview, path: str) -> None:
    """Decompress the frame straight into `out`, which it must fill exactly (the checksum is checked at the
    frame's end)."""
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    try:
        with dctx.stream_reader(source, read_size=READ_PIECE, read_across_frames=False, closefd=False) as reader:
            filled = 0
            while filled < len(out) and (n := reader.readinto(out[filled:])):
                filled += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise UserError(f"{path}: bad zstd data ({exc})") from None
    if filled < len(out):
        raise UserError(f"{path}: holds {filled} bytes of counts but its width needs {len(out)}")
    if extra:
        raise UserError(f"{path}: holds more than the {len(out)} bytes of counts its width needs")


def exists_any(folder: str) -> list[str]:
    """Matrix files already in `folder`."""
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.startswith("correlations_block_") and f.endswith(".zstd"))
