"""`mpicorr bench`: synthetic profiles, the JSON record, and that its exactness check can fail."""

import json

import numpy as np
import pytest

from conftest import run_main
from mpicorr import bench


@pytest.mark.parametrize("kernel", ["auto", "gemm", "popcount", "sparse"])
@pytest.mark.parametrize("profile", ["uniform", "powerlaw"])
def test_bench_prints_one_checked_json_line(kernel, profile):
    result = run_main(["bench", "--neurons", "301", "--tokens", "700", "--density", "0.05", "--profile", profile,
                       "--kernel", kernel, "--layers", "2"])
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["exact"] is True and record["layers"] == 2 and record["neurons"] == 301
    assert record["kernel"] in ("gemm", "popcount", "sparse", "popcount+sparse")
    assert kernel == "auto" or record["kernel"] == kernel
    assert record["tokens_per_s"] > 0 and record["peak_rss_bytes"] > 0
    assert abs(record["density"] - 0.05) < 0.01


def test_powerlaw_profile_is_skewed_with_the_requested_mean():
    fired = bench.synthetic(2000, 4000, 0.03, "powerlaw")
    freq = np.sort(fired.mean(0))[::-1]
    assert abs(fired.mean() - 0.03) < 0.002
    assert freq[:20].mean() > 10 * np.median(freq)


def test_check_catches_a_wrong_count():
    fired = bench.synthetic(50, 100, 0.3, "uniform")
    f = fired.astype(np.int64)
    packed = (f.T @ f)[np.tril_indices(50)]
    bench.check(packed, fired, 1)
    packed[-1] += 1  # C[49, 49]: row 49 is always sampled
    with pytest.raises(RuntimeError, match="row 49"):
        bench.check(packed, fired, 1)
