"""`mpicorr bench`: synthetic profiles, the JSON record, and that its exactness check can fail."""

import json
import os

import numpy as np
import pytest
import torch

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


def test_bench_refuses_a_device_torch_does_not_name():
    """--device gpu: one line naming the choices (it was torch's RuntimeError listing its device types)."""
    result = run_main(["bench", "--neurons", "64", "--tokens", "64", "--device", "gpu"])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "mpicorr: error: --device 'gpu': choose cpu, cuda or cuda:N\n"


def test_data_benchmark_help_gives_its_whole_first_paragraph():
    """benchmarks/data.py --help: its description is the docstring's first paragraph, as in the other scripts
    (it was the first line only, cut mid-sentence at 'data.scan, shared')."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "data.py"), "--help"],
                            capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "static share of the batches), under mpirun." in " ".join(result.stdout.split())


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


def load_benchmark(name: str):
    """A script of benchmarks/ as a module."""
    import importlib.util
    import os
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, here)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_stops_the_clock_after_the_background_flushes(monkeypatch):
    """benchmarks/gpu.py times int16 panels with their flushes, which the Flusher adds into the host triangle on
    its own thread: `timed` must return only once every flush its calls started is added. On a CPU: DeviceCounts'
    CPU path (the same Flusher thread), each host add slowed to 0.2 s, the device's synchronize a no-op."""
    import time

    import torch

    from mpicorr import triangle
    gpu = load_benchmark("gpu")
    monkeypatch.setattr(gpu.torch.cuda, "synchronize", lambda *_: None)
    submitted, added = [], []
    real_add, real_submit = triangle.host_add, triangle.Flusher.submit

    def slow_add(out, part):
        time.sleep(0.2)
        real_add(out, part)
        added.append(1)

    monkeypatch.setattr(triangle, "host_add", slow_add)
    monkeypatch.setattr(triangle.Flusher, "submit", lambda self, *a: submitted.append(1) or real_submit(self, *a))
    counts = triangle.DeviceCounts(45, torch.int32, "cpu", torch.int16, limit=64)
    op = torch.zeros(counts.padded, 96)
    op[:45] = 1
    gpu.timed(lambda: counts.add_transposed(op), 3, counts.wait)
    assert len(submitted) >= 4 and len(added) == len(submitted)
    assert counts.packed().tolist() == [4 * 96] * triangle.packed_size(45)


def test_writes_profile_names_the_zstd_level_and_workers_it_timed(monkeypatch, capsys, tmp_path):
    """benchmarks/writes.py --profile: every zstd figure names the level it ran at and its workers; the files'
    level (matrixfile.ZSTD_LEVEL) is stated, --levels adds the others, and the level is left as it was. (Its
    keys once said 'zstd_all_cpus' and 'zstd_level1_all_cpus' for the same level-1 run.)"""
    import os
    import sys

    from mpicorr import matrixfile
    writes = load_benchmark("writes")
    files_level, cpus = matrixfile.ZSTD_LEVEL, len(os.sched_getaffinity(0))
    monkeypatch.setattr(sys, "argv", ["writes.py", "--layers", "1", "--neurons", "64", "--tokens", "500",
                                      "--profile", "--levels", f"{files_level},3", "--out", str(tmp_path / "w")])
    writes.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    profile, written = lines[0], lines[1:]
    assert profile["files_zstd_level"] == files_level == 1
    assert [k for k in profile["profile_one_layer_s"] if k.startswith("zstd")] == [
        f"zstd_level1_{cpus}_workers", f"zstd_level3_{cpus}_workers", "zstd_level1_1_worker"]
    assert [w["zstd_level"] for w in written] == [1, 3] and matrixfile.ZSTD_LEVEL == files_level
    monkeypatch.setattr(sys, "argv", ["writes.py", "--help"])
    with pytest.raises(SystemExit):
        writes.main()
    assert "the files' level, 1)" in " ".join(capsys.readouterr().out.split())


def test_overhead_repeats_bare_forward_and_run_in_turn(monkeypatch, llama, sample_path, tmp_path):
    """benchmarks/overhead.py --repeat 3: three (bare forward, run) pairs in turn on one model object, each
    run a real `mpicorr run`; the line gives the median pair's figures and every ratio."""
    from mpicorr import models
    overhead = load_benchmark("overhead")
    args = overhead.parser().parse_args(["--model", llama, "--data", sample_path, "--ctx", "16", "--chunks", "3",
                                         "--repeat", "3", "--work", str(tmp_path)])
    model = models.load_model(llama, torch.float32, ["cpu"])
    monkeypatch.setattr(models, "load_model", models.load_model)  # timed_run replaces these: restored afterwards
    monkeypatch.setattr(models, "check_weights", models.check_weights)
    bare, runs = [], []
    real_bare, real_run = overhead.bare_forward, overhead.timed_run
    monkeypatch.setattr(overhead, "bare_forward", lambda *a: bare.append(len(a[1])) or real_bare(*a))
    monkeypatch.setattr(overhead, "timed_run", lambda *a: runs.append(a[2]) or real_run(*a))
    got = overhead.measure(model, args)
    assert bare == [1, 3, 3, 3] and runs == [1, 3, 3, 3]  # warm-ups, then the pairs
    assert len(got["ratios"]) == 3 and got["ratio"] == sorted(got["ratios"])[1]
    assert got["chunks"] == 3 and got["counting_s"] is not None and got["run_after_load_s"] > 0
    assert os.path.exists(os.path.join(tmp_path, "out", "summary.h5"))


def test_gpu_model_benchmark_runs_on_a_folder_without_weights(sample_path, tmp_path):
    """benchmarks/gpu.py model (what benchmarks/gpu_all.sh runs for the 1.5x figure) builds Mistral-7B's shapes in
    memory and writes no weights; the run's weight-file check, added after its last GPU run, refused that folder
    ('no weights'), which only a GPU session would have found. Here on the CPU (--device cpu is the script's
    check mode): one Mistral-shaped layer, two chunks of 32 tokens, the JSON line with its ratio."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "model", "--data",
                             sample_path, "--chunks", "2", "--ctx", "32", "--layers", "1", "--batch-size", "1",
                             "--vocab", "500", "--device", "cpu", "--work", str(tmp_path)],
                            capture_output=True, text=True, env=cli_env(), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    line = json.loads([ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1])
    assert line["chunks"] == 2 and line["ratio"] > 0 and line["counting_s"] > 0 and line["device"] == "cpu"
