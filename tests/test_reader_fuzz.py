"""Property-based tests of the matrix reader: random and mutated files are read correctly or refused with
the project's own error, and reading never allocates much more than the header's width justifies."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from mpicorr import matrixfile, triangle
from mpicorr.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def valid_file(width: int, trials: int, seed: int, sized: bool) -> bytes:
    """A well-formed matrix file (the frame with or without its decompressed size)."""
    packed = np.random.default_rng(seed).integers(0, trials + 1, triangle.packed_size(width), dtype=np.uint64)
    header, frame = matrixfile.encode(3, width, trials, packed)
    if not sized:
        frame = zstandard.ZstdCompressor(write_content_size=False).compress(
            np.ascontiguousarray(packed, dtype="<u8" if trials >= 2**32 else "<u4").tobytes())
    return header + frame


def read_bounded(tmp_path, blob: bytes):
    """read_matrix on `blob`; returns (result or None, peak traced bytes). Anything but UserError fails."""
    path = tmp_path / "m.zstd"
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        result = matrixfile.read_matrix(str(path))
    except UserError:
        result = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, peak


def justified(blob: bytes) -> int:
    """What reading may allocate (traced by Python): the file's bytes once, one copy of the counts its
    header's width needs, and 64 KiB of slack; zstd's own window (C memory) is bounded by MAX_WINDOW and
    measured in test_reading_holds_one_copy_of_the_counts."""
    magic, _, _, _, width = struct.unpack_from("<5I", blob) if len(blob) >= 20 else (0, 0, 0, 0, 0)
    if not 0 < width <= matrixfile.MAX_WIDTH or magic not in (matrixfile.MAGIC32, matrixfile.MAGIC64):
        width = 0
    itemsize = 4 if magic == matrixfile.MAGIC32 else 8
    return len(blob) + itemsize * triangle.packed_size(width) + (1 << 16)


def check_result(result, blob: bytes) -> None:
    if result is None:
        return
    header, packed = result
    assert header.magic in (matrixfile.MAGIC32, matrixfile.MAGIC64)
    assert packed.shape == (triangle.packed_size(header.width),)
    assert packed.dtype == header.dtype


@SETTINGS
@given(blob=st.binary(max_size=300))
def test_random_bytes(tmp_path, blob):
    result, peak = read_bounded(tmp_path, blob)
    check_result(result, blob)
    assert peak <= justified(blob)


@SETTINGS
@given(blob=st.binary(min_size=0, max_size=200))
def test_random_frames_after_a_valid_header(tmp_path, blob):
    for magic in (matrixfile.MAGIC32, matrixfile.MAGIC64):
        full = struct.pack("<5I", magic, 0, 9, 1, 6) + blob
        result, peak = read_bounded(tmp_path, full)
        check_result(result, full)
        assert peak <= justified(full)


@st.composite
def mutated(draw):
    width = draw(st.integers(1, 40))
    trials = draw(st.sampled_from([0, 1, 1000, 2**32 + 5]))
    blob = bytearray(valid_file(width, trials, draw(st.integers(0, 9)), draw(st.booleans())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "append", "header_word", "splice"]))
        if kind == "flip" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del blob[draw(st.integers(0, len(blob))):]
        elif kind == "append":
            blob += draw(st.binary(min_size=1, max_size=40))
        elif kind == "header_word" and len(blob) >= 20:
            word = draw(st.integers(0, 4))
            value = draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**20, 2**20 + 1, 2**32 - 1])))
            blob[4 * word : 4 * word + 4] = struct.pack("<I", value)
        elif kind == "splice" and len(blob) > 21:
            i = draw(st.integers(20, len(blob) - 1))
            blob[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(blob)


@SETTINGS
@given(blob=mutated())
def test_mutated_files(tmp_path, blob):
    result, peak = read_bounded(tmp_path, blob)
    check_result(result, blob)
    assert peak <= justified(blob)


@SETTINGS
@given(width=st.integers(1, 60), trials=st.sampled_from([0, 7, 2**32]), seed=st.integers(0, 3), sized=st.booleans())
def test_valid_files_round_trip(tmp_path, width, trials, seed, sized):
    blob = valid_file(width, trials, seed, sized)
    result, _ = read_bounded(tmp_path, blob)
    assert result is not None
    packed = np.random.default_rng(seed).integers(0, trials + 1, triangle.packed_size(width), dtype=np.uint64)
    assert np.array_equal(result[1], packed)


@SETTINGS
@given(width=st.integers(1, 60), sized=st.booleans(), extra=st.binary(min_size=1, max_size=30),
       cut=st.integers(1, 30))
def test_trailing_or_missing_bytes_are_refused(tmp_path, width, sized, extra, cut):
    blob = valid_file(width, 5, 0, sized)
    for damaged in (blob + extra, blob[: max(0, len(blob) - cut)]):
        result, _ = read_bounded(tmp_path, damaged)
        assert result is None


# Peak resident memory of a fresh process reading one file: VmHWM after the read less VmRSS before it (the
# high-water mark reset first; ru_maxrss would carry the parent's peak over fork and exec).
PEAK = """
import sys
from mpicorr import matrixfile
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
before = status("VmRSS:")
header, packed = matrixfile.read_matrix(sys.argv[1])
print(status("VmHWM:") - before, packed.nbytes, int(packed.sum()))
"""


@pytest.mark.parametrize("sized", [False, True])
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_reading_holds_one_copy_of_the_counts(tmp_path, sized):
    """A highly compressed file of width 6000 (72 MB of uint32 counts in a 250 KB frame), with and without
    the frame's content size: the reading process's peak resident memory (so zstd's C buffers count too)
    grows by about one copy of the counts (the reader once held every decompressed piece and their join)."""
    width = 6000
    counts = np.zeros(triangle.packed_size(width), dtype="<u4")
    counts[::97] = np.random.default_rng(0).integers(0, 7, len(counts[::97]))
    frame = zstandard.ZstdCompressor(level=3, write_content_size=sized).compress(counts.tobytes())
    path = tmp_path / "m.zstd"
    path.write_bytes(struct.pack("<5I", matrixfile.MAGIC32, 0, 9, 0, width) + frame)
    result = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    grown, nbytes, total = map(int, result.stdout.split())
    assert nbytes == counts.nbytes and total == int(counts.sum())
    assert grown <= 1.1 * nbytes + (8 << 20), (grown, nbytes)
