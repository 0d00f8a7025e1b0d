"""GPU checks (skipped without CUDA): the gemm kernel and every exact product kind on the device against a
plain CPU product, the same counts from CUDA and CPU for the same activations, the fused kernel, the torch path
and narrow panels end to end, and a model split over two GPUs (--gpus-per-rank 2) against the same model on
one."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mpicorr import counting, summary, tiny, triangle
from conftest import run_cli
from test_pipeline import ok, outputs, same_summaries

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.parametrize("width,tokens,p", [(1, 5, 0.5), (33, 700, 0.0), (33, 700, 1.0), (1001, 1500, 0.07)])
def test_gemm_on_cuda_is_exact(width, tokens, p):
    fired = np.random.default_rng(width).random((tokens, width)) < p
    counts = triangle.pair_counter(width, torch.int32, "cuda:0", "auto")
    for part in np.array_split(fired, 3):
        counts.add(torch.from_numpy(part).cuda())
    exact = fired.astype(np.float64)  # float64 products of 0/1: exact below 2**53
    assert np.array_equal(counts.packed(), (exact.T @ exact)[np.tril_indices(width)].astype(np.int64))


@pytest.mark.parametrize("panel", [torch.float32, torch.int16])
def test_device_counts_on_cuda_pass_bfloat16_and_int16_ranges(panel):
    """70000 all-one tokens: past what a bfloat16 sum (256) or an int16 panel (65535 as uint16) could hold,
    with odd panels and a part that forces a flush."""
    counts = triangle.DeviceCounts(45, torch.int32, "cuda:0", panel, elements=7 * 45 + 3)
    ones = torch.ones(50_000, 45, dtype=torch.bool, device="cuda:0")
    counts.add(ones)
    counts.add(ones[:20_000])
    assert counts.packed().tolist() == [70_000] * triangle.packed_size(45)


@pytest.mark.parametrize("panel", [torch.float32, torch.int16])
def test_every_exact_product_kind_counts_exactly(panel):
    """fp8, int8, bf16 (whichever this GPU runs exactly) into wide or narrow panels, flushed every 1000 tokens."""
    kinds = triangle.exact_products(torch.device("cuda:0"))
    assert triangle.product_kind("cuda:0") in kinds and "bf16" in kinds
    if torch.cuda.get_device_capability() >= (8, 9):
        assert "fp8" in kinds  # Hopper and Ada: the fastest exact product
    fired = np.random.default_rng(3).random((2500, 301)) < 0.3
    exact = fired.astype(np.float64)
    for kind in kinds:
        counts = triangle.DeviceCounts(301, torch.int32, "cuda:0", panel, elements=4000, limit=1000, product=kind)
        for part in np.array_split(fired, 3):
            counts.add(torch.from_numpy(part).cuda())
        assert np.array_equal(counts.packed(), (exact.T @ exact)[np.tril_indices(301)].astype(np.int64)), kind


def test_cuda_chooses_a_measured_product_and_float32_panels_where_they_fit():
    """The product is one that was checked exact; a small layer on an empty GPU gets float32 panels, a huge one
    int16."""
    assert triangle.product_kind("cuda") in triangle.exact_products(torch.device("cuda:0"))
    assert triangle.device_panel(triangle.panel_cells(1000), "cuda") == torch.float32
    assert triangle.device_panel(10**12, "cuda:0") == torch.int16  # 4 TB of float32 panels


def run_in_process(args: list[str]) -> None:
    from conftest import run_main
    result = run_main(args)
    assert result.returncode == 0, result.stderr


def test_fused_statistics_and_narrow_panels_write_the_bytes_of_the_torch_path(llama, tmp_path, monkeypatch):
    """End to end on the GPU: the fused kernel with float32 panels, the torch path, and int16 panels flushed
    every 100 tokens by the background thread give the same files (same activations: one process, one GPU)."""
    common = ["run", "--model", llama, "--data", tiny.sample_path(), "--ctx", "64", "--chunks", "24",
              "--batch-size", "4", "--device", "cuda:0", "--threshold", "0.25,0.5"]
    run_in_process([*common, "--out", str(tmp_path / "fused")])
    with monkeypatch.context() as patch:
        patch.setattr(counting.LayerCounts, "_fused", lambda *_: None)
        run_in_process([*common, "--out", str(tmp_path / "torch")])
    with monkeypatch.context() as patch:
        patch.setattr(triangle, "device_panel", lambda *_: torch.int16)
        patch.setitem(triangle.DeviceCounts.LIMITS, torch.int16, 100)
        run_in_process([*common, "--out", str(tmp_path / "narrow")])
    for sub in ("threshold-0.25", "threshold-0.5"):
        want = outputs(str(tmp_path / "torch" / sub))
        assert want and outputs(str(tmp_path / "fused" / sub)) == want
        assert outputs(str(tmp_path / "narrow" / sub)) == want
        same_summaries(str(tmp_path / "fused" / sub), str(tmp_path / "torch" / sub))
        same_summaries(str(tmp_path / "narrow" / sub), str(tmp_path / "torch" / sub))


def test_threshold_below_the_smallest_float32_is_exact_on_the_gpu():
    """A float32 subnormal threshold: zeros do not fire, the smallest subnormal does (no flush to zero)."""
    tiny_value = torch.tensor([0.0, 1e-45, -1e-45, 3e-45, 0.0], dtype=torch.float32)
    lc = counting.LayerCounts(0, 5, (1e-45,), torch.int32, "cuda:0")
    assert lc.fused == "triton"
    lc.add(tiny_value[None].cuda())
    assert lc.fire_count.tolist() == [[0, 1, 1, 1, 0]]


def test_cuda_and_cpu_count_the_same_activations():
    x = torch.randn(3, 200, 77) * 0.7
    on = {d: counting.LayerCounts(0, 77, (0.25, 0.5), torch.int32, d) for d in ("cpu", "cuda:0")}
    on["cpu"].add(x)
    on["cuda:0"].add(x.cuda())
    assert np.array_equal(on["cpu"].stats(), on["cuda:0"].stats())
    assert all(np.array_equal(a, b) for a, b in zip(on["cpu"].packed(), on["cuda:0"].packed()))


@pytest.mark.skipif(CUDA and torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("panel", [torch.float32, torch.int16])
def test_counts_on_the_second_gpu_while_the_first_is_current(panel, monkeypatch):
    """--gpus-per-rank: a layer's counts on cuda:1 while cuda:0 is the current device. The Triton launches, the
    product's timing and (int16 panels, flushed every 96 tokens) the Flusher's event and copy all run on cuda:1
    (fused.on_device); the counts equal the CPU's and cuda:0 stays current."""
    monkeypatch.setitem(triangle.DeviceCounts.LIMITS, torch.int16, 100)
    torch.cuda.set_device(0)
    x = torch.randn(3, 200, 77) * 0.7
    cpu = counting.LayerCounts(0, 77, (0.25, 0.5), torch.int32, "cpu")
    gpu = counting.LayerCounts(0, 77, (0.25, 0.5), torch.int32, "cuda:1", "gemm", panel)
    assert gpu.fused == "triton" and (gpu.pairs[0].panel == torch.int16) == (panel == torch.int16)
    for part in x:
        cpu.add(part)
        gpu.add(part.to("cuda:1"))
    counting.check_all([gpu])
    assert np.array_equal(cpu.stats(), gpu.stats())
    assert all(np.array_equal(a, b) for a, b in zip(cpu.packed(), gpu.packed()))
    assert torch.cuda.current_device() == 0


@pytest.mark.skipif(CUDA and torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_model_split_over_two_gpus_counts_as_on_one(family, tmp_path):
    model = tiny.build(family, str(tmp_path / family), layers=4)
    common = ["run", "--model", model, "--data", tiny.sample_path(), "--ctx", "64", "--chunks", "20",
              "--dtype", "float32", "--device", "cuda:0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    ok(run_cli([*common, "--out", one]))
    result = ok(run_cli([*common, "--out", two, "--gpus-per-rank", "2"]))
    assert "cuda:0,1" in result.stdout
    assert outputs(one) == outputs(two) and outputs(one)
    same_summaries(two, one)
    assert summary.read_summary(os.path.join(two, "summary.h5"))[0]["tokens"] == 20 * 64


def test_dump_on_cuda_masks_are_the_counts_firing(tmp_path):
    """--dump on a GPU (bfloat16 by --dtype auto, counts on the device): every token dumped, the masks'
    popcounts are the counts' fire_count and each mask is |value| >= T on the dumped values; the trainer
    runs on CUDA."""
    from mpicorr import predictor
    from mpicorr.predictor_data import LayerData, read_index

    model, out, dump = tiny.build("llama", str(tmp_path / "llama")), str(tmp_path / "out"), str(tmp_path / "dump")
    ok(run_cli(["run", "--model", model, "--data", tiny.sample_path(), "--ctx", "64", "--chunks", "20",
                "--batch-size", "4", "--device", "cuda:0", "--threshold", "0.25,0.5", "--out", out, "--dump", dump,
                "--dump-rate", "1", "--dump-values"]))
    assert read_index(dump)["dtype"] == "bfloat16" and read_index(dump)["tokens"] == 20 * 64
    for t in (0.25, 0.5):
        _, layers = summary.read_summary(os.path.join(out, f"threshold-{t!r}", "summary.h5"))
        for layer, entry in layers.items():
            data = LayerData(dump, layer, t, values=True)
            _, fired, values = data.take(np.arange(len(data)))
            assert np.array_equal(fired.numpy().sum(0), entry["fire_count"]), (layer, t)
            assert torch.equal(fired, values.abs() >= t)
    data = LayerData(dump, 1)
    scores = predictor.evaluate(predictor.train(data, 8, epochs=2, device="cuda"), data, np.arange(100),
                                device="cuda")
    assert 0 < scores.density < 1 and 0 <= scores.skipped99 <= 1
