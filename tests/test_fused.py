"""The fused one-pass statistics kernel (mpicorr.fused, Triton) against the torch reference path of
counting.LayerCounts, and the exact threshold comparison. On a machine without a GPU the same kernel source runs
in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1); with CUDA it runs on the GPU."""

from __future__ import annotations

import contextlib
import types

import numpy as np
import pytest
import torch

from mpicorr import counting, fused, triangle

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="triton not installed")
DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"
HALF_POWERS = 2.0 ** (np.arange(-21, 14) / 2.0)  # every act_hist edge, and one past each end


def edge_values(dtype: torch.dtype, thresholds: tuple[float, ...]) -> torch.Tensor:
    """Values at and next to every histogram edge and threshold (in `dtype`), both signs, zeros and -0.0."""
    inf = torch.tensor(float("inf"), dtype=dtype)
    points = torch.tensor([*HALF_POWERS, *thresholds, 1e-30, 2.0**-10], dtype=torch.float64).to(dtype)
    near = torch.cat([points, torch.nextafter(points, inf), torch.nextafter(points, -inf)])
    return torch.cat([near, -near, torch.tensor([0.0, -0.0, 64.0, 1000.0], dtype=dtype)])


def pair(width: int, thresholds: tuple[float, ...], dtype=torch.int32):
    """A torch-path and a fused-path LayerCounts over the same device panels."""
    made = [counting.LayerCounts(0, width, thresholds, dtype, DEVICE, "gemm", torch.float32, stats=s)
            for s in ("torch", "fused")]
    return made


def assert_same(a: counting.LayerCounts, b: counting.LayerCounts) -> None:
    for name in ("fire_count", "active_hist", "act_sum", "act_sumsq", "act_hist", "flag"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert all(np.array_equal(x, y) for x, y in zip(a.packed(), b.packed()))
    assert a.tokens == b.tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width,tokens", [(1, 3), (77, 300), (130, 129)])
def test_fused_statistics_equal_the_torch_reference(dtype, width, tokens):
    thresholds = (0.25, 0.2995, 1.0)
    gen = torch.Generator().manual_seed(width + tokens)
    x = torch.randn(tokens, width, generator=gen) * torch.logspace(-4, 2.5, width)
    edges = edge_values(dtype, thresholds).float()
    x.view(-1)[: min(len(edges), x.numel())] = edges[: x.numel()]
    x = x.to(dtype).to(DEVICE)
    ref, new = pair(width, thresholds)
    for part in (x[: tokens // 3], x[tokens // 3 :]):  # two batches, one may be empty of tokens
        if len(part):
            ref.add(part)
            new.add(part)
    assert_same(ref, new)


def test_all_zero_and_all_firing_batches():
    ref, new = pair(45, (0.5,))
    for x in (torch.zeros(200, 45), torch.full((70, 45), -3.0), torch.full((10, 45), 0.5)):
        ref.add(x.to(DEVICE))
        new.add(x.to(DEVICE))
    assert_same(ref, new)
    assert new.fire_count.tolist() == [[80] * 45] and new.active_hist[0, 45] == 80


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_of_no_tokens_counts_nothing(dtype):
    """An MoE expert that no token was routed to gets a [0, width] batch: every path adds nothing, and the Triton
    path launches no kernel (Triton refuses a grid of 0 programs)."""
    ref, new = pair(70, (0.25, 0.5))
    paths = [ref, new]
    if counting.kernels.AVAILABLE:
        paths.append(counting.LayerCounts(0, 70, (0.25, 0.5), torch.int32, "cpu", "auto", stats="auto"))
    x = torch.randn(40, 70).to(dtype)
    for lc in paths:
        lc.add(x[:0].to(DEVICE))
        lc.add(x.to(DEVICE))
        lc.add(x[:0].to(DEVICE))
        lc.check()
    assert new.fused == "triton" and paths[-1].fused in ("numba", "triton")
    for lc in paths[1:]:
        assert_same(ref, lc)
    assert ref.tokens == 40 and int(ref.fire_count.sum()) > 0


def limit_counter(layer: int, width: int, stats: str) -> counting.LayerCounts:
    """A LayerCounts on the path `stats` names: torch, fused (Triton, in the interpreter on a CPU) or numba
    (the CPU's compiled loop; skipped without numba)."""
    if stats == "numba":
        if not counting.kernels.AVAILABLE:
            pytest.skip("numba not installed")
        lc = counting.LayerCounts(layer, width, (0.5,), torch.int32, "cpu", "auto", stats="fused")
        assert lc.fused == "numba"
        return lc
    return counting.LayerCounts(layer, width, (0.5,), torch.int32, DEVICE, "gemm", torch.float32, stats=stats)


@pytest.mark.parametrize("stats", ["torch", "fused", "numba"])
@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf"), -float("inf"), 2.0**20, -2.0**20])
def test_non_finite_input_raises_the_same_error(stats, bad):
    lc = limit_counter(6, 70, stats)
    x = torch.randn(40, 70)
    lc.add(x.to(lc.act_sum.device))
    lc.check()
    x[17, 66] = bad
    lc.add(x.to(lc.act_sum.device))
    with pytest.raises(counting.UserError, match="layer 6: non-finite activations"):
        lc.check()


@pytest.mark.parametrize("stats", ["torch", "fused", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_just_below_the_limit_are_not_flagged(stats, dtype):
    """The largest magnitudes below 2**20 of each dtype, both signs, count without an error (the fused kernel
    checks the limit on the float32 bits)."""
    below = float(torch.nextafter(torch.tensor(2.0**20, dtype=dtype), torch.tensor(0.0, dtype=dtype)))
    lc = limit_counter(0, 4, stats)
    lc.add(torch.tensor([[below, -below, 0.0, -0.0]], dtype=dtype).to(lc.act_sum.device))
    lc.check()
    assert lc.fire_count.tolist() == [[1, 1, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_thresholds_compare_as_real_numbers(dtype):
    """|x| >= T for the real numbers x and T, at the values next to T in x's dtype, for both paths: 0.2995 is
    0.298828125 in bfloat16, which must not fire; a tiny threshold does not make zeros fire."""
    for threshold in (0.2995, 0.5, 1e-30 if dtype != torch.float32 else 1e-44):
        x = edge_values(dtype, (threshold,)).reshape(1, -1)
        want = x.double().abs() >= threshold
        assert torch.equal(counting.fired(x, threshold), want)
        ref, new = pair(x.shape[1], (threshold,))
        ref.add(x.to(DEVICE))
        new.add(x.to(DEVICE))
        assert torch.equal(ref.fire_count.cpu()[0], want[0].long()), threshold
        assert torch.equal(new.fire_count.cpu()[0], want[0].long()), threshold
    assert counting.exact_threshold(0.2995, torch.bfloat16) == 0.30078125
    assert counting.exact_threshold(1e-320, torch.float32) > 0


@pytest.mark.parametrize("kind", ["fp8", "int8", "bf16", "fp32"])
def test_operand_holds_the_products_ones_transposed_and_padded(kind):
    """The fused kernel writes F' in each product's storage type: the bits of that type's 1.0 (or 1), zeros in
    the padding, so the GEMM reads it directly."""
    width, tokens = 70, 45
    x = torch.randn(tokens, width).to(DEVICE)
    storage, one, view = triangle.OPERANDS[kind]
    op = torch.full((2, triangle.round_up(width, 32), triangle.round_up(tokens, 32)), 7, dtype=storage,
                    device=DEVICE)  # garbage: every cell must be written
    lc = counting.LayerCounts(0, width, (0.5, 1.0), torch.int32, DEVICE, "gemm", torch.float32, stats="torch")
    fused.stats(x, lc.limits(x.dtype), op, one, lc.fire_count, torch.zeros(2, tokens, dtype=torch.int32,
                device=DEVICE), lc.act_sum, lc.act_sumsq, torch.empty(fused.tile_count(tokens), 17, width,
                dtype=torch.int32, device=DEVICE), lc.flag)
    for i, t in enumerate((0.5, 1.0)):
        want = torch.zeros(op.shape[1:], dtype=torch.float32, device=DEVICE)
        want[:width, :tokens] = (x.abs() >= t).T.float()
        assert torch.equal(op[i].cpu().view(view).float(), want.cpu())


def test_pack_rows_and_add_into_kernels():
    """The device-side helpers of DeviceCounts: a panel's lower triangle into the packed layout, and adding a
    float32 product into int16 panels."""
    width, r0 = 83, 32
    acc = torch.randint(0, 30000, (40, 80), dtype=torch.int32).float().to(DEVICE)  # rows 32..71, cols 0..79
    packed = torch.full((triangle.packed_size(width),), -1, dtype=torch.int32, device=DEVICE)
    fused.pack_rows(acc, r0, width, packed)
    want = acc.cpu()[:, :72][triangle.lower_mask(r0, 72, "cpu")].int()
    assert torch.equal(packed.cpu()[triangle.offset(32) : triangle.offset(72)], want)
    assert (packed.cpu()[: triangle.offset(32)] == -1).all() and (packed.cpu()[triangle.offset(72) :] == -1).all()
    panel = torch.randint(-100, 100, (37, 61), dtype=torch.int16, device=DEVICE)
    part = torch.randint(0, 5000, (37, 61), device=DEVICE).float()
    want = panel.cpu() + part.cpu().to(torch.int16)
    fused.add_into(panel, part)
    assert torch.equal(panel.cpu(), want)


class LaunchSpy:
    """Stands in for a Triton kernel: records, at each launch, its tensors' devices and the device made current
    by the innermost fused.on_device around it (None outside any), then launches the real kernel."""

    def __init__(self, name: str, kernel, inside: list, launched: list):
        self.name, self.kernel, self.inside, self.launched = name, kernel, inside, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            self.launched.append((self.name, self.inside[-1] if self.inside else None, devices))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_every_triton_launch_runs_on_its_tensors_device(monkeypatch):
    """--gpus-per-rank: a layer's counts can live on cuda:1 while cuda:0 is current, and Triton launches on the
    current device. Every launch of the three kernels (the statistics through LayerCounts, the DeviceCounts
    helpers directly: on a CPU they use torch instead) happens inside fused.on_device of its own tensors, which
    is torch.cuda.device(that GPU) for a CUDA tensor and a no-op for a CPU one."""
    inside, launched = [], []
    real = fused.on_device

    @contextlib.contextmanager
    def recording(tensor):
        inside.append(tensor.device)
        try:
            with real(tensor):
                yield
        finally:
            inside.pop()

    monkeypatch.setattr(fused, "on_device", recording)
    for name in ("_stats", "_pack_rows", "_add_into"):
        monkeypatch.setattr(fused, name, LaunchSpy(name, getattr(fused, name), inside, launched))
    lc = counting.LayerCounts(0, 70, (0.5,), torch.int32, DEVICE, "gemm", torch.int16, stats="fused")
    lc.add(torch.randn(50, 70).to(DEVICE))
    fused.pack_rows(torch.ones(8, 64, device=DEVICE), 32, 40, torch.zeros(triangle.packed_size(40), device=DEVICE))
    fused.add_into(torch.zeros(5, 7, dtype=torch.int16, device=DEVICE), torch.ones(5, 7, device=DEVICE))
    assert {name for name, _, _ in launched} == {"_stats", "_pack_rows", "_add_into"}
    for name, current, devices in launched:
        assert devices == {current}, name
    cuda = real(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(cuda, torch.cuda.device) and cuda.idx == 1
    assert isinstance(real(torch.zeros(1)), contextlib.nullcontext)


def test_each_rank_makes_its_first_gpu_current(monkeypatch):
    """run() makes a rank's first GPU current (models.make_current), so rank 1 of --device auto (cuda:1) does
    not leave what defaults to the current device on cuda:0; the CPU changes nothing."""
    from mpicorr import models
    made = []
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    models.make_current("cpu")
    models.make_current("cuda:1")
    assert made == [torch.device("cuda", 1)]


# A threshold that is a subnormal of each dtype once rounded up (counting.exact_threshold).
SUBNORMAL_THRESHOLD = {torch.float32: 1e-44, torch.bfloat16: 1e-40, torch.float16: 1e-7}


def special_values(dtype: torch.dtype, thresholds: tuple[float, ...]) -> torch.Tensor:
    """edge_values, and in `dtype`: its subnormals (the smallest, a few multiples, the largest, the smallest
    normal), each threshold exactly as the comparison sees it (exact_threshold) and its neighbours, both signs."""
    zero, inf = torch.tensor(0.0, dtype=dtype), torch.tensor(float("inf"), dtype=dtype)
    smallest, normal = torch.nextafter(zero, inf), torch.tensor(torch.finfo(dtype).tiny, dtype=dtype)
    subnormal = torch.stack([smallest, 2 * smallest, 3 * smallest, 7 * smallest, torch.nextafter(normal, zero),
                             normal, normal / 2])
    exact = torch.tensor([counting.exact_threshold(t, dtype) for t in thresholds], dtype=dtype)
    near = torch.cat([subnormal, exact, torch.nextafter(exact, inf), torch.nextafter(exact, zero)])
    return torch.cat([edge_values(dtype, thresholds), near, -near])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_subnormals_signed_zeros_thresholds_and_edges_give_one_set_of_integers(dtype):
    """The Triton kernel (in the interpreter on a CPU), the torch reference and the CPU's compiled loop
    (kernels.fused_stats) count the same integers for subnormal values and a subnormal threshold, -0.0 and
    0.0, values exactly at +-T and next to it, and every act_hist edge and its neighbours, in float32, bfloat16
    and float16; every special value also lands in more than one neuron and both batches."""
    if not counting.kernels.AVAILABLE:
        pytest.skip("numba not installed")
    thresholds = (0.25, 0.2995, 1.0, SUBNORMAL_THRESHOLD[dtype])
    values = special_values(dtype, thresholds)
    assert ((values != 0) & (values.float().abs() < torch.finfo(dtype).tiny)).sum() >= 10
    assert torch.signbit(values[values == 0]).any() and not torch.signbit(values[values == 0]).all()
    width, n = 37, len(values)  # n is not a multiple of 37: the second copy lands in other neurons
    x = (torch.randn(2 * -(-n // width) + 3, width, generator=torch.Generator().manual_seed(5)) * 0.5).to(dtype)
    x.view(-1)[:n] = values
    x.view(-1)[-n:] = values.flip(0)
    ref, new = pair(width, thresholds)
    cpu = counting.LayerCounts(0, width, thresholds, torch.int32, "cpu", "auto", stats="auto")
    assert new.fused == "triton" and cpu.fused == "numba" and ref.fused is None
    for part in (x[:7], x[7:]):
        for lc in (ref, new, cpu):
            lc.add(part.to(DEVICE) if lc is not cpu else part)
    for lc in (new, cpu):
        lc.check()
        assert_same(ref, lc)
    smallest = torch.nextafter(torch.tensor(0.0, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    assert int(ref.fire_count[3].sum()) == int((x.double().abs() >= SUBNORMAL_THRESHOLD[dtype]).sum()) > 0
    assert int((x.abs() == smallest).sum()) > 0 and counting.exact_threshold(SUBNORMAL_THRESHOLD[dtype], dtype) < \
        torch.finfo(dtype).tiny


@pytest.mark.parametrize("kernel", ["auto", "popcount", "sparse", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_statistics_equal_the_torch_reference(kernel, dtype):
    """The CPU's one-pass loop (kernels.fused_stats), with every CPU pair kernel, against the torch path."""
    if not counting.kernels.AVAILABLE:
        pytest.skip("numba not installed")
    thresholds = (0.25, 0.2995, 1.0)
    x = torch.randn(257, 131) * torch.logspace(-4, 2.5, 131)
    edges = edge_values(dtype, thresholds).float()
    x.view(-1)[: len(edges)] = edges
    x = x.to(dtype)
    ref, new = (counting.LayerCounts(0, 131, thresholds, torch.int32, "cpu", kernel, stats=s) for s in ("torch", "auto"))
    assert new.fused == "numba" and ref.fused is None
    for part in (x[:100], x[100:]):
        ref.add(part)
        new.add(part)
    assert_same(ref, new)
    x[5, 7] = float("nan")
    new.add(x)
    with pytest.raises(counting.UserError, match="layer 0: non-finite"):
        new.check()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_cpu_statistics_on_narrow_layers_with_one_or_two_threads(threads, dtype):
    """kernels.fused_stats on layers narrower than its 4 blocks per thread (1, 2, 7 and 9 neurons: blocks of one
    neuron or a few), on 1 and 2 numba threads, with seven thresholds (0 among them), subnormals, every
    act_hist edge and x * 2**24 exactly halfway between integers (rounded to even), against the torch path;
    then each bad value in each position raises the flag, and the largest legal magnitudes do not."""
    if not counting.kernels.AVAILABLE:
        pytest.skip("numba not installed")
    import numba

    before, thresholds = numba.get_num_threads(), (0.0, 2.0**-10, 0.25, 0.2995, 0.5, 1.0, 3.0)
    halves = torch.tensor([(2 * k + 1) * 2.0**-25 for k in (0, 1, 2, 3, 100, 101, 1 << 20)], dtype=torch.float64)
    values = torch.cat([special_values(dtype, thresholds), halves.to(dtype), -halves.to(dtype)])
    below = torch.nextafter(torch.tensor(2.0**20, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for width in (1, 2, 7, 9):
            x = (torch.randn(-(-len(values) // width) + 2, width, generator=torch.Generator().manual_seed(width))).to(dtype)
            x.view(-1)[: len(values)] = values
            ref, new = (counting.LayerCounts(0, width, thresholds, torch.int32, "cpu", "auto", stats=s)
                        for s in ("torch", "fused"))
            assert new.fused == "numba"
            for part in (x[:5], x[5:]):
                ref.add(part)
                new.add(part)
            new.check()
            assert_same(ref, new)
            for position in range(2 * width):
                for bad, flagged in ((float("nan"), 1), (-float("inf"), 1), (-(2.0**20), 1), (float(below), 0)):
                    y = x[:2].clone()
                    y.view(-1)[position] = bad
                    lc = counting.LayerCounts(0, width, (0.5,), torch.int32, "cpu", "auto", stats="fused")
                    lc.add(y)
                    assert int(lc.flag[0]) == flagged, (width, position, bad)
    finally:
        numba.set_num_threads(before)
