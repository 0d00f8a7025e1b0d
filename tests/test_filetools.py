"""info / verify / sum on matrix files."""

import numpy as np
import pytest

from conftest import run_cli
from mpicorr import filetools, matrixfile, triangle
from mpicorr.errors import UserError


def symmetric_counts(rng, width, trials):
    fired = rng.random((trials, width)) < 0.3
    full = fired.T.astype(np.int64) @ fired
    return full[np.tril_indices(width)]


def test_sum_adds_counts_and_trials(tmp_path):
    rng = np.random.default_rng(3)
    a, b = symmetric_counts(rng, 9, 40), symmetric_counts(rng, 9, 25)
    matrixfile.write_matrix(str(tmp_path / "a.zstd"), 4, 9, 40, a)
    matrixfile.write_matrix(str(tmp_path / "b.zstd"), 4, 9, 25, b)
    filetools.sum_files(str(tmp_path / "s.zstd"), [str(tmp_path / "a.zstd"), str(tmp_path / "b.zstd")])
    header, total = matrixfile.read_matrix(str(tmp_path / "s.zstd"))
    assert (header.block, header.width, header.trials) == (4, 9, 65)
    assert np.array_equal(total, a + b)
    filetools.verify(str(tmp_path / "s.zstd"))
    with pytest.raises(UserError, match="exists"):
        filetools.sum_files(str(tmp_path / "s.zstd"), [str(tmp_path / "a.zstd")])


def test_sum_refuses_mixed_blocks(tmp_path):
    matrixfile.write_matrix(str(tmp_path / "a.zstd"), 0, 2, 1, np.zeros(3))
    matrixfile.write_matrix(str(tmp_path / "b.zstd"), 1, 2, 1, np.zeros(3))
    with pytest.raises(UserError, match="does not match"):
        filetools.sum_files(str(tmp_path / "s.zstd"), [str(tmp_path / "a.zstd"), str(tmp_path / "b.zstd")])
    assert not (tmp_path / "s.zstd").exists()


@pytest.mark.parametrize("packed,trials,message", [
    ([2, 3, 4], 5, r"C\[0, 1\] = 3 exceeds"),   # pair count above neuron 0's firing count
    ([6, 0, 1], 5, "fired 6 times in 5 trials"),
])
def test_verify_catches_impossible_counts(tmp_path, packed, trials, message):
    path = str(tmp_path / "bad.zstd")
    matrixfile.write_matrix(path, 0, 2, trials, np.array(packed))
    with pytest.raises(UserError, match=message):
        filetools.verify(path)


def test_cli_info_and_verify(tmp_path):
    good = str(tmp_path / "correlations_block_3.zstd")
    matrixfile.write_matrix(good, 3, 2, 7, np.array([1, 1, 2]))
    result = run_cli(["info", good])
    assert result.returncode == 0 and "block 3, width 2, trials 7, uint32 counts" in result.stdout
    (tmp_path / "junk.zstd").write_bytes(b"\x7d\xca\x7d\xca" + b"\0" * 30)
    result = run_cli(["verify", good, str(tmp_path / "junk.zstd")])
    assert result.returncode == 2 and f"{good}: ok" in result.stdout
    assert result.stderr.count("mpicorr: error:") == 1 and "junk.zstd" in result.stderr
