"""The counting kernel and per-layer sums against naive loops."""

import numpy as np
import pytest
import torch

from mpicorr import counting, kernels, layout, summary, triangle


def naive_pairs(fired: np.ndarray) -> np.ndarray:
    """Packed lower triangle by the original's pair loop."""
    width = fired.shape[1]
    packed = np.zeros(triangle.packed_size(width), dtype=np.int64)
    for row in fired:
        active = np.flatnonzero(row)
        for a, i in enumerate(active):
            for j in active[: a + 1]:
                packed[triangle.offset(i) + j] += 1
    return packed


@pytest.mark.parametrize("tokens,width,p", [(1, 1, 1.0), (17, 5, 0.5), (64, 33, 0.2), (50, 130, 0.05),
                                            (9, 12, 0.0), (9, 12, 1.0)])
@pytest.mark.parametrize("exact_tokens", [1 << 24, 7])
def test_panel_counts_match_pair_loop(tokens, width, p, exact_tokens, monkeypatch):
    rng = np.random.default_rng(width)
    fired = rng.random((tokens, width)) < p
    monkeypatch.setattr(triangle, "EXACT_TOKENS", exact_tokens)  # 7: flushes to integers many times
    counts = triangle.PanelCounts(width, torch.int32, "cpu", elements=3 * width + 1)  # uneven panels
    counts.add(torch.from_numpy(fired))
    counts.add(torch.from_numpy(fired[::-1].copy()))  # accumulates
    packed = counts.packed()
    assert packed.dtype == np.int32 and np.array_equal(packed, 2 * naive_pairs(fired))


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("tokens,width,p", [(1, 1, 1.0), (17, 5, 0.5), (64, 33, 0.2), (65, 130, 0.05),
                                            (9, 12, 0.0), (9, 12, 1.0), (600, 70, 1.0), (1100, 9, 0.3)])
@pytest.mark.parametrize("kernel", ["popcount", "sparse", "auto"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_compiled_kernels_match_pair_loop(tokens, width, p, kernel, dtype, monkeypatch):
    """Odd sizes, all-zero and all-one inputs, several buffered calls, tokens not a multiple of 64 or 512,
    and (CACHE_ENTRIES 7) many sparse row blocks."""
    monkeypatch.setattr(kernels, "CACHE_ENTRIES", 7 if dtype == torch.int32 else kernels.CACHE_ENTRIES)
    rng = np.random.default_rng(tokens + width)
    fired = rng.random((tokens, width)) < p
    counts = triangle.BitCounts(width, dtype, kernel, tokens_per_call=100)
    for part in np.array_split(fired, 3):
        counts.add(torch.from_numpy(part.copy()))
    counts.add_packed(naive_pairs(fired[:5]))
    packed = counts.packed()
    assert packed.dtype == (np.int32 if dtype == torch.int32 else np.int64)
    assert np.array_equal(packed, naive_pairs(fired) + naive_pairs(fired[:5]))


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")
def test_auto_picks_sparse_for_rare_firing_and_popcount_for_dense():
    counts = triangle.BitCounts(2000, torch.int32, "auto")
    rare = np.zeros((512, 2000), dtype=bool)
    rare[::7, :3] = True
    counts.add(torch.from_numpy(rare))
    dense = np.random.default_rng(0).random((512, 2000)) < 0.2
    counts.add(torch.from_numpy(dense))
    assert counts.used == {"popcount": 512, "sparse": 512}
    both = np.concatenate([rare, dense]).astype(np.float64)  # float64 products of 0/1: exact below 2**53
    assert np.array_equal(counts.packed(), (both.T @ both)[np.tril_indices(2000)].astype(np.int64))


@pytest.mark.parametrize("tokens,width,p", [(1, 1, 1.0), (17, 5, 0.5), (64, 33, 0.2), (9, 12, 0.0), (9, 12, 1.0)])
@pytest.mark.parametrize("limit", [None, 7, 1])
@pytest.mark.parametrize("panel", [torch.int16, torch.float32])
def test_device_counts_match_pair_loop(tokens, width, p, limit, panel):
    """The GPU accumulator, run on the CPU: int16 or float32 panels flushed to the host every `limit` tokens or
    fewer (None: the panel type's own limit)."""
    fired = np.random.default_rng(width).random((tokens, width)) < p
    counts = triangle.DeviceCounts(width, torch.int32, "cpu", panel, elements=3 * width + 1, limit=limit)
    counts.add(torch.from_numpy(fired))
    counts.add(torch.from_numpy(fired[::-1].copy()))
    packed = counts.packed()
    assert packed.dtype == np.int32 and np.array_equal(packed, 2 * naive_pairs(fired))
    counts.add_packed(packed)
    assert np.array_equal(counts.packed(), 4 * naive_pairs(fired))
    counts.add(torch.from_numpy(fired))
    assert np.array_equal(counts.take(), 5 * naive_pairs(fired))


def test_device_counts_pass_the_int16_range():
    """Counts far beyond 2**15 stay exact: int16 panels wrap, are read back as uint16 and are flushed before a
    count could pass 65535."""
    counts = triangle.DeviceCounts(3, torch.int64, "cpu", torch.int16)
    ones = torch.ones(50_000, 3, dtype=torch.bool)
    counts.add(ones)
    counts.add(ones[:20_000])
    packed = counts.packed()
    assert packed.dtype == np.int64 and packed.tolist() == [70_000] * 6


def test_narrow_panels_flush_at_65504_padded_tokens_with_tensor_core_products():
    """The README's figure: int16 panels hold at most 65535 tokens, rounded down to a multiple of the operand's
    32-token padding (65504) for the GPU's products; a batch counts as its padded tokens, and the flush comes
    before the part that would pass the limit."""
    assert triangle.DeviceCounts(3, torch.int64, "cpu", torch.int16).limit == 65535  # float32 products (CPU)
    counts = triangle.DeviceCounts(3, torch.int64, "cpu", torch.int16, product="bf16")
    assert counts.limit == 65504 == 65535 - 65535 % triangle.PAD
    counts.spans = []  # only the bookkeeping of add_transposed here, no products
    flushes = []
    counts._flush = lambda wait: flushes.append(counts.pending)  # records the tokens held, keeps them
    for _ in range(2048):  # batches of 20 tokens, each padded to 32 columns: the 2048th would pass 65504
        counts.add_transposed(torch.zeros(32, triangle.round_up(20, triangle.PAD), dtype=torch.int16))
    assert flushes == [65504]


def test_host_add_on_several_threads():
    out = np.arange(5_000_003, dtype=np.int64)
    triangle.host_add(out, np.full(len(out), 7, dtype=np.int16))
    assert np.array_equal(out, np.arange(5_000_003) + 7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_squares_are_summed_exactly(dtype):
    """The float32 shortcut for bfloat16/float16 activations gives the float64 fixed-point sums, extremes too."""
    x = (torch.randn(300, 40) * 30).to(dtype)
    x[0, :4] = torch.tensor([2.0**-14, 1000.0, -3.0e-3, 0.0])
    counts = counting.LayerCounts(0, 40, (0.5,), torch.int32, "cpu")
    counts.add(x)
    assert torch.equal(counts.act_sumsq, counting.to_fixed(x.double() ** 2, counting.ACT_SUMSQ_BITS).sum(0))


def test_pair_counter_choice():
    assert isinstance(triangle.pair_counter(8, torch.int32, "cpu", "gemm"), triangle.PanelCounts)
    want = triangle.BitCounts if kernels.AVAILABLE else triangle.PanelCounts
    assert isinstance(triangle.pair_counter(8, torch.int32, "cpu", "auto"), want)
    with pytest.raises(ValueError, match="CPU only"):
        triangle.pair_counter(8, torch.int32, "cuda:0", "popcount")


def test_panels_cover_rows():
    for width in (1, 7, 100, 1001):
        for elements in (1, 50, 10**6):
            spans = triangle.panels(width, elements)
            assert spans[0][0] == 0 and spans[-1][1] == width
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_rows_and_diagonal_read_the_symmetric_matrix():
    width = 11
    full = np.random.default_rng(1).integers(0, 100, (width, width))
    full = np.tril(full) + np.tril(full, -1).T
    packed = full[np.tril_indices(width)]
    assert np.array_equal(triangle.unpack(packed, width), full)
    assert np.array_equal(triangle.rows(packed, 3, 8, width), full[3:8])
    assert np.array_equal(triangle.diagonal(packed, width), np.diag(full))


def test_layer_counts_statistics():
    x = torch.tensor([[0.5, -0.6, 0.1], [0.49, 2.0, -0.5], [0.0, 0.0, 0.0]])
    lc = counting.LayerCounts(0, 3, (0.5,), torch.int32, "cpu")
    lc.add(x[None])
    assert lc.tokens == 3
    assert lc.fire_count.tolist() == [[1, 2, 1]]
    assert lc.active_hist.tolist() == [[1, 0, 2, 0]]
    assert triangle.unpack(lc.packed()[0], 3).tolist() == [[1, 1, 0], [1, 2, 1], [0, 1, 1]]
    (stats,) = counting.split_stats(lc.stats(), 3)
    assert np.allclose(stats["act_sum"] / 2**counting.ACT_SUM_BITS, [0.99, 1.4, -0.4])
    assert np.allclose(stats["act_sumsq"] / 2**counting.ACT_SUMSQ_BITS, [0.25 + 0.49**2, 4.36, 0.26], atol=1e-4)


def test_fixed_point_sums_do_not_depend_on_grouping():
    x = torch.randn(1000, 4, dtype=torch.float64) * 3
    whole = counting.to_fixed(x, 24).sum(0)
    parts = sum(counting.to_fixed(part, 24).sum(0) for part in torch.split(x, [1, 333, 600, 66]))
    assert torch.equal(whole, parts)


def test_non_finite_activations_are_a_clear_error():
    for bad in (float("nan"), float("inf"), 2.0**21):
        lc = counting.LayerCounts(4, 2, (0.5,), torch.int32, "cpu")
        lc.add(torch.tensor([[0.5, 1.0]]))
        lc.check()  # nothing wrong yet
        lc.add(torch.tensor([[bad, 1.0]]))
        with pytest.raises(counting.UserError, match="layer 4: non-finite activations or"):
            lc.check()
        with pytest.raises(counting.UserError, match="layer 4: non-finite activations or"):
            counting.check_all([counting.LayerCounts(3, 2, (0.5,), torch.int32, "cpu"), lc])


def test_count_dtype_cannot_overflow():
    assert counting.count_dtype(2**31 - 1) == torch.int32
    assert counting.count_dtype(2**31) == torch.int64


@pytest.mark.parametrize("top_partners", [summary.top_partners, summary.top_partners_compiled, summary.top_partners_numpy])
def test_top_partners_ties_zeros_and_narrow_layers(top_partners):
    full = np.array([[9, 3, 3, 0], [3, 8, 5, 1], [3, 5, 7, 0], [0, 1, 0, 2]])
    packed = full[np.tril_indices(4)]
    partners, counts = top_partners(packed, 4, k=3)
    assert partners.tolist() == [[1, 2, -1], [2, 0, 3], [1, 0, -1], [1, -1, -1]]
    assert counts.tolist() == [[3, 3, 0], [5, 3, 1], [5, 3, 0], [1, 0, 0]]
    partners, counts = top_partners(packed, 4, k=2)
    assert partners.tolist() == [[1, 2], [2, 0], [1, 0], [1, -1]]
    partners, counts = top_partners(packed, 4)  # fewer neurons than the 16 partner slots
    assert partners.shape == (4, 16) and partners[1, :4].tolist() == [2, 0, 3, -1]
    assert (partners[:, 4:] == -1).all() and (counts[:, 4:] == 0).all()


@pytest.mark.skipif(not kernels.AVAILABLE, reason="numba not installed")
@pytest.mark.parametrize("width,high", [(1, 3), (2, 2), (57, 3), (300, 1000)])
def test_compiled_top_partners_equal_the_numpy_path(width, high, monkeypatch):
    """Many ties (counts in 0..2) and wide ranges, with row blocks of 7 rows in the numpy path."""
    monkeypatch.setattr(layout, "ROW_BLOCK_ELEMENTS", 7 * width)
    packed = np.random.default_rng(width).integers(0, high, triangle.packed_size(width)).astype(np.uint32)
    want = summary.top_partners_numpy(packed, width)
    got = summary.top_partners_compiled(packed, width)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))


def test_several_thresholds_count_as_separate_runs_would():
    x = torch.randn(2, 37, 29) * 0.8
    thresholds = (0.25, 0.5, 1.0)
    both = counting.LayerCounts(1, 29, thresholds, torch.int32, "cpu")
    both.add(x)
    flat = both.stats()
    assert len(flat) == counting.stats_size(29, 3)
    for i, t in enumerate(thresholds):
        one = counting.LayerCounts(1, 29, (t,), torch.int32, "cpu")
        one.add(x)
        assert np.array_equal(both.packed()[i], one.packed()[0])
        (alone,) = counting.split_stats(one.stats(), 29)
        part = counting.split_stats(flat, 29, 3)[i]
        assert alone.keys() == part.keys()
        assert all(np.array_equal(alone[k], part[k]) for k in alone)
    # load() is the inverse of packed()/stats(): a checkpoint added to fresh counts gives them back
    again = counting.LayerCounts(1, 29, thresholds, torch.int32, "cpu")
    again.load(both.packed(), flat)
    assert np.array_equal(again.stats(), flat)
    assert all(np.array_equal(a, b) for a, b in zip(again.packed(), both.packed()))


def test_threshold_values_from_the_command_line_and_toml():
    from mpicorr.config import output_folders, parse_thresholds
    assert parse_thresholds("0.5") == (0.5,)
    assert parse_thresholds(" 1, 0.25 ,0.5") == (0.25, 0.5, 1.0)
    assert parse_thresholds([1, 0.5]) == (0.5, 1.0) and parse_thresholds(2) == (2.0,)
    for bad in ([], [True], "nan", "-0.5", "inf", [0.5, "x"]):
        with pytest.raises(counting.UserError, match="--threshold"):
            parse_thresholds(bad)
    assert output_folders("o", (0.5,)) == ["o"]
    assert output_folders("o", (0.25, 1.0)) == ["o/threshold-0.25", "o/threshold-1.0"]


def test_fixed_point_sums_of_more_than_128_ranks_are_checked_before_the_reduce():
    """Each rank keeps its fixed-point sums below FIXED_LIMIT = 2**56, which covers 128 ranks; with more
    (up to plan.MAX_RANKS are accepted) the reduce's int64 addition would wrap without a word, so the ranks'
    largest sums are checked against int64 first."""
    from mpicorr.counting import FIXED_LIMIT, check_fixed_total, fixed_maxima
    from mpicorr.errors import SharedError

    lc = counting.LayerCounts(3, 4, (0.5,), torch.int32, "cpu")
    lc.act_sum[1], lc.act_sumsq[2] = -(FIXED_LIMIT - 1), FIXED_LIMIT - 1
    mine = fixed_maxima([lc])
    assert mine == [(FIXED_LIMIT - 1, FIXED_LIMIT - 1)]
    check_fixed_total([mine] * 128, [lc])  # 128 * (2**56 - 1) fits
    with pytest.raises(SharedError, match="layer 3: the activation sums of the 129 ranks would exceed the int64"):
        check_fixed_total([mine] * 129, [lc])
    assert np.full(129, FIXED_LIMIT - 1, dtype=np.int64).sum() < 0  # what the reduce would have written
