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


def test_compare_checks_the_counts_of_the_tokens_the_pair_loop_counted(monkeypatch, capsys):
    """benchmarks/compare.py: when the pair loop is timed on fewer tokens (high densities), the counts of
    those tokens are still compared (before, the check was skipped exactly there)."""
    import importlib.util
    import os
    import shutil
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "compare.py")
    spec = importlib.util.spec_from_file_location("compare", here)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    fired = bench.synthetic(128, 64, 0.3, "uniform")
    right = compare.subset_checksum(fired, 16)
    compare.check_counts("x", fired, right, 16, our_check=0)
    with pytest.raises(SystemExit, match="checksums differ at x on 16 tokens"):
        compare.check_counts("x", fired, right + 1, 16, our_check=0)
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the pair loop")
    monkeypatch.setattr(compare, "PAIR_BUDGET", 20 * 128 * 129 / 2 * 0.3 * 0.3)  # some tokens of 64
    real = compare.time_pairloop
    timed = []
    monkeypatch.setattr(compare, "time_pairloop", lambda *a: timed.append(real(*a)) or timed[-1])
    compare.main(["--neurons", "128", "--tokens", "64", "--densities", "0.3", "--profiles", "uniform",
                  "--repeats", "1"])
    assert 16 <= timed[0][2] < 64 and "| uniform | 0.3 |" in capsys.readouterr().out
