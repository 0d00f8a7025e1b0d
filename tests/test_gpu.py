"""GPU checks (skipped without CUDA): the gemm kernel on the device against a plain CPU product, the same
counts from CUDA and CPU for the same activations, and a model split over two GPUs (--gpus-per-rank 2)
against the same model on one."""

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
    """40000 all-one tokens: past what a bfloat16 sum (256) or an int16 panel (32767) could hold, with odd
    panels and a part that forces a flush."""
    counts = triangle.DeviceCounts(45, torch.int32, "cuda:0", panel, elements=7 * 45 + 3)
    ones = torch.ones(30_000, 45, dtype=torch.bool, device="cuda:0")
    counts.add(ones)
    counts.add(ones[:10_000])
    assert counts.packed().tolist() == [40_000] * triangle.packed_size(45)


def test_cuda_uses_tensor_core_products_and_float32_panels_where_they_fit():
    """On torch >= 2.8 the products run in bfloat16; a small layer on an empty GPU gets float32 panels, a huge
    one int16."""
    assert triangle.cuda_products() in ("addmm", "mm")
    assert triangle.device_panel(triangle.panel_cells(1000), "cuda") == torch.float32
    assert triangle.device_panel(10**12, "cuda:0") == torch.int16  # 4 TB of float32 panels


def test_cuda_and_cpu_count_the_same_activations():
    x = torch.randn(3, 200, 77) * 0.7
    on = {d: counting.LayerCounts(0, 77, (0.25, 0.5), torch.int32, d) for d in ("cpu", "cuda:0")}
    on["cpu"].add(x)
    on["cuda:0"].add(x.cuda())
    assert np.array_equal(on["cpu"].stats(), on["cuda:0"].stats())
    assert all(np.array_equal(a, b) for a, b in zip(on["cpu"].packed(), on["cuda:0"].packed()))


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
