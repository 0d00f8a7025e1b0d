"""The zstd matrix file format: round trip, a hand-built byte vector, the 64-bit variant, damage."""

import struct

import numpy as np
import pytest
import zstandard

from mpicorr import matrixfile, triangle
from mpicorr.errors import UserError


def test_round_trip(tmp_path):
    width = 37
    packed = np.random.default_rng(0).integers(0, 2**32, triangle.packed_size(width), dtype=np.uint64)
    path = str(tmp_path / "m.zstd")
    matrixfile.write_matrix(path, 5, width, 123456, packed)
    header, back = matrixfile.read_matrix(path)
    assert header == matrixfile.Header(matrixfile.MAGIC32, 123456, 5, width)
    assert back.dtype == np.dtype("<u4") and np.array_equal(back, packed)


def test_hand_built_bytes_decode_as_specified(tmp_path):
    # width 3: C = [[5], [2, 4], [1, 0, 3]], 7 trials, block 2
    payload = struct.pack("<6I", 5, 2, 4, 1, 0, 3)
    raw = struct.pack("<5I", 0xCA7DCA7D, 0, 7, 2, 3) + zstandard.ZstdCompressor().compress(payload)
    path = tmp_path / "correlations_block_2.zstd"
    path.write_bytes(raw)
    header, packed = matrixfile.read_matrix(str(path))
    assert (header.trials, header.block, header.width) == (7, 2, 3)
    assert packed.tolist() == [5, 2, 4, 1, 0, 3]
    assert triangle.unpack(packed, 3).tolist() == [[5, 2, 1], [2, 4, 0], [1, 0, 3]]


def test_written_bytes_follow_the_layout(tmp_path):
    path = tmp_path / "x.zstd"
    matrixfile.write_matrix(str(path), 9, 2, (1 << 32) - 1, np.array([3, 1, 2], dtype=np.int32))
    raw = path.read_bytes()
    assert struct.unpack_from("<5I", raw) == (0xCA7DCA7D, 0, 0xFFFFFFFF, 9, 2)
    assert zstandard.ZstdDecompressor().decompress(raw[20:]) == struct.pack("<3I", 3, 1, 2)


def test_64_bit_variant_when_trials_reach_2_pow_32(tmp_path):
    path = str(tmp_path / "w.zstd")
    big = np.array([1 << 32, 7, (1 << 32) + 5], dtype=np.int64)
    matrixfile.write_matrix(path, 0, 2, (1 << 32) + 9, big)
    header, back = matrixfile.read_matrix(path)
    assert header.magic == matrixfile.MAGIC64 and header.trials == (1 << 32) + 9
    assert back.dtype == np.dtype("<u8") and back.tolist() == big.tolist()


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:10], "truncated"),
    (lambda b: b"\0\0\0\0" + b[4:], "wrong magic"),
    (lambda b: b[:-3], "zstd"),
    (lambda b: b + b"junk", "zstd"),
    (lambda b: b[:20] + b"not zstd at all", "zstd"),
    (lambda b: b[:16] + struct.pack("<I", 5) + b[20:], "needs"),
])
def test_damaged_files_raise_user_errors(tmp_path, damage, message):
    good = tmp_path / "good.zstd"
    matrixfile.write_matrix(str(good), 1, 4, 10, np.arange(10))
    bad = tmp_path / "bad.zstd"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(UserError, match=message):
        matrixfile.read_matrix(str(bad))


def test_a_file_too_short_for_its_width_is_truncated_before_any_allocation(tmp_path):
    """38 bytes claiming width 2**20 (2.2 TB of counts; its frame header states that size): at zstd's
    highest ratio (128 KiB per 4-byte block) such counts need at least 67 MB, so the file is truncated, which
    is said before the memory it would need."""
    width = 1 << 20
    expected = triangle.packed_size(width) * 4
    frame = bytes.fromhex("28b52ffd") + bytes([0xC0, 0x50]) + struct.pack("<Q", expected) + b"\x05\x00\x00\x00"
    path = tmp_path / "t.zstd"
    path.write_bytes(struct.pack("<5I", 0xCA7DCA7D, 0, 9, 0, width) + frame)
    assert path.stat().st_size == 38
    with pytest.raises(UserError, match=r"truncated \(38 bytes; width 1048576 needs at least 67108954 even at") as info:
        matrixfile.read_matrix(str(path))
    assert "memory" not in str(info.value)


@pytest.mark.parametrize("cut", [1, 100])
def test_frame_walk_refuses_a_cut_frame_before_allocating(tmp_path, cut):
    """A frame cut inside its blocks (but long enough to be plausible) is a truncated zstd frame."""
    packed = np.random.default_rng(1).integers(0, 9, triangle.packed_size(300), dtype=np.uint64)
    good = tmp_path / "good.zstd"
    matrixfile.write_matrix(str(good), 0, 300, 9, packed)
    bad = tmp_path / "bad.zstd"
    bad.write_bytes(good.read_bytes()[:-cut])
    with pytest.raises(UserError, match="truncated zstd frame"):
        matrixfile.read_matrix(str(bad))


def test_other_count_types_are_written_a_piece_at_a_time(tmp_path):
    """int64 counts (a run of 2**31 tokens or more keeps them) written as uint32: the same bytes as the same
    counts in int32, without a full uint32 copy of the layer (the writer once made one per layer in flight)."""
    import tracemalloc

    width = 3000
    counts = np.random.default_rng(0).integers(0, 1000, triangle.packed_size(width), dtype=np.int64)
    matrixfile.write_matrix(str(tmp_path / "a.zstd"), 1, width, 2**31 + 5, counts.astype(np.int32))
    tracemalloc.start()
    matrixfile.write_matrix(str(tmp_path / "b.zstd"), 1, width, 2**31 + 5, counts)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (tmp_path / "a.zstd").read_bytes() == (tmp_path / "b.zstd").read_bytes()
    assert peak < counts.size * 4 / 4, peak  # a uint32 copy would be counts.size * 4 (18 MB); pieces: 1 MiB
