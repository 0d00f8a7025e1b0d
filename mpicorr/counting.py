"""Per-layer raw sums: co-firing pair counts and per-neuron statistics.

Every quantity is an integer, so merging ranks, runs or files is plain addition and the result does not
depend on how the chunks were split. Real-valued sums (act_sum, act_sumsq, log-likelihood) are kept in
fixed point: each per-token value is rounded to a multiple of 2**-bits and the integers are added.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import fused, kernels, triangle
from .errors import SharedError, UserError
from .units import (ACT_SUM_BITS, ACT_SUMSQ_BITS, HIST_BINS, HIST_HIGH, HIST_LOW,  # noqa: F401 (re-exported)
                    HIST_MAGNITUDES, NLL_BITS, Unit, hist_edges)

# Each rank keeps its fixed-point sums below 2**56 (checked every batch), so that the sums of up to 128 ranks
# always fit int64; with more ranks (or partial sums absorbed from checkpoints) check_fixed_total checks
# the ranks' sums against int64 before they are added.
FIXED_LIMIT = 1 << 56
INT64_MAX = (1 << 63) - 1
# Larger (or non-finite) activations mean a broken model or dtype; they would also overflow x*x in fixed point.
ACT_LIMIT = float(1 << 20)
SQRT2_MANTISSA = int(np.float32(np.sqrt(2.0)).view(np.int32)) & 0x7FFFFF


def hist_bins(x: torch.Tensor) -> torch.Tensor:
    """Signed histogram bin of each value (same shape, int32): HIST_MAGNITUDES - 1 is |x| < 2**-10.

    From the float32 bits: |x| = 1.f * 2**(E - 127), so floor(2 log2 |x|) = 2 (E - 127) + (1.f >= sqrt 2),
    with sqrt 2 rounded to float32 like the edges (the same bins as searching the edges, 4x faster)."""
    bits = x.float().contiguous().view(torch.int32)
    step = ((bits >> 23) & 0xFF) * 2 + ((bits & 0x7FFFFF) >= SQRT2_MANTISSA).to(torch.int32)
    magnitude = (step - (254 + HIST_LOW - 1)).clamp_(0, HIST_MAGNITUDES - 1)
    return torch.where(bits < 0, (HIST_MAGNITUDES - 1) - magnitude, (HIST_MAGNITUDES - 1) + magnitude)


def count_dtype(total_tokens: int) -> torch.dtype:
    """Narrowest signed width in which no count (each <= total tokens) can overflow, on every rank."""
    return torch.int32 if total_tokens < (1 << 31) else torch.int64


def to_fixed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Round float values to integers in units of 2**-bits (int64)."""
    return torch.round(values.double() * float(1 << bits)).to(torch.int64)


def count_into(total: torch.Tensor, index: torch.Tensor) -> None:
    """total[i] += how often i occurs in index (a bincount that, on a GPU, does not wait for the device)."""
    if total.device.type == "cpu":
        total += torch.bincount(index.reshape(-1), minlength=len(total))
    else:
        total.index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=total.dtype, device=total.device))


def exact_threshold(threshold: float, dtype: torch.dtype) -> float:
    """The smallest value of `dtype` that is >= threshold: for x of that dtype, |x| >= threshold (as real
    numbers) exactly when |x| >= this value, so the comparison can run in x's own type without rounding the
    threshold down (0.2995 is 0.298828125 in bfloat16, which would let that value fire)."""
    value = torch.tensor(threshold, dtype=torch.float64).to(dtype)
    if float(value) < threshold:
        value = torch.nextafter(value, torch.tensor(math.inf, dtype=dtype))
    return float(value)


def fired(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which values fire at `threshold` (a bool tensor of x's shape): |x| >= threshold compared exactly, the
    comparison behind the counts (the fused kernels compare with the same exact_threshold) and the --dump
    masks."""
    return x.abs() >= exact_threshold(threshold, x.dtype)


STATS_PATHS = ("auto", "torch", "fused")


class LayerCounts:
    """Raw sums for one unit of `width` neurons at one or more thresholds; `add` takes activations of shape
    [..., width]. Pair counts, fire counts and active-neuron histograms are kept per threshold; the activation
    sums and histograms do not depend on it and are kept once.

    `stats`: how a batch is read. fused: one pass over x for every statistic, on a GPU one Triton kernel
    (mpicorr.fused) that also writes the products' operand, on a CPU one compiled loop (kernels.fused_stats);
    torch: separate torch operations (portable; the reference the tests hold the fused paths to); auto: fused
    where it applies. All give the same integers. Nothing here waits for the device: bad values raise a flag
    that `check` reads (once per batch for all layers)."""

    def __init__(self, unit: Unit | int, width: int, thresholds: tuple[float, ...], dtype: torch.dtype,
                 device: str, kernel: str = "auto", panel: torch.dtype | None = None, stats: str = "auto"):
        self.unit = unit if isinstance(unit, Unit) else Unit(unit)
        self.layer, self.width, self.thresholds = self.unit.layer, width, tuple(thresholds)
        m = len(self.thresholds)
        self.pairs = [triangle.pair_counter(width, dtype, device, kernel, panel) for _ in range(m)]
        self.fire_count = torch.zeros(m, width, dtype=torch.int64, device=device)
        self.active_hist = torch.zeros(m, width + 1, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(width, dtype=torch.int64, device=device)
        self.act_sumsq = torch.zeros(width, dtype=torch.int64, device=device)
        self.act_hist = torch.zeros(width * HIST_BINS, dtype=torch.int64, device=device)
        self.hist_base = torch.arange(width, dtype=torch.int32, device=device) * HIST_BINS
        self.flag = torch.zeros(2, dtype=torch.int32, device=device)  # [bad values, fixed-point range]
        self.tokens = 0
        self.fused = self._fused(stats, device)
        self._limits: dict[torch.dtype, torch.Tensor] = {}

    def _fused(self, stats: str, device: str) -> str | None:
        """Which fused path applies: 'triton' (device panels, Triton), 'numba' (CPU, compiled) or None."""
        if stats not in STATS_PATHS:
            raise ValueError(f"stats must be one of {STATS_PATHS}")
        cuda = torch.device(device).type == "cuda"
        if fused.AVAILABLE and all(isinstance(p, triangle.DeviceCounts) for p in self.pairs) and \
                (cuda or stats == "fused"):
            return "triton"  # on a CPU only when asked for (the tests run it in Triton's interpreter)
        if kernels.AVAILABLE and not cuda:
            return "numba" if stats != "torch" else None
        if stats == "fused":
            raise ValueError("the fused statistics need Triton (GPU) or numba (CPU)")
        return None

    def add(self, x: torch.Tensor) -> None:
        """Count one batch of activations."""
        x = x.detach().reshape(-1, self.width)
        if self.fused == "triton":
            self._add_fused(x)
        elif self.fused == "numba":
            self._add_compiled(x)
        else:
            self._add_torch(x)
        over = (self.act_sum.abs().amax() >= FIXED_LIMIT) | (self.act_sumsq.amax() >= FIXED_LIMIT)
        self.flag[1] = torch.maximum(self.flag[1], over.to(torch.int32))
        self.tokens += x.shape[0]

    def _add_torch(self, x: torch.Tensor) -> None:
        magnitude = x.abs()
        for i, threshold in enumerate(self.thresholds):
            on = fired(x, threshold)
            self.pairs[i].add(on)
            self.fire_count[i] += on.sum(0)
            count_into(self.active_hist[i], on.sum(1))
        xf = x.float()
        # x * 2**24 and its rounding are exact in float32, so this equals to_fixed(x, ACT_SUM_BITS), 3x faster
        self.act_sum += torch.round(xf * float(1 << ACT_SUM_BITS)).to(torch.int64).sum(0)
        # bfloat16 and float16 squares have at most 22 significant bits, exact in float32 (as is the scaling and
        # rounding), so they give to_fixed(x.double() ** 2, ACT_SUMSQ_BITS) at half the memory traffic
        square = xf**2 if x.dtype in (torch.bfloat16, torch.float16) else x.double() ** 2
        self.act_sumsq += torch.round(square * float(1 << ACT_SUMSQ_BITS)).to(torch.int64).sum(0)
        count_into(self.act_hist, (hist_bins(xf) + self.hist_base).reshape(-1))
        bad = ~(magnitude < ACT_LIMIT).all()
        self.flag[0] = torch.maximum(self.flag[0], bad.to(torch.int32))

    def _add_fused(self, x: torch.Tensor) -> None:
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            x = x.float()
        x = x.to(self.act_sum.device).contiguous()  # a kernel handed another GPU's pointer would read it silently
        tokens, m = x.shape[0], len(self.thresholds)
        operand, one = self.pairs[0].operand(m, tokens)
        active = torch.zeros(m, tokens, dtype=torch.int32, device=x.device)
        words = torch.empty(fused.tile_count(tokens), fused.HIST_WORDS, self.width, dtype=torch.int32,
                            device=x.device)
        fused.stats(x, self.limits(x.dtype), operand, one, self.fire_count, active, self.act_sum,
                    self.act_sumsq, words, self.flag)
        fused.hist_words_add(self.act_hist, words, self.width, HIST_BINS)
        self.active_hist.scatter_add_(1, active.long(), torch.ones_like(active, dtype=torch.int64))
        for pairs, op in zip(self.pairs, operand):
            pairs.add_transposed(op)

    def _add_compiled(self, x: torch.Tensor) -> None:
        limits = self.limits(x.dtype).numpy()
        values = np.ascontiguousarray(x.float().numpy())
        m, (tokens, width) = len(self.thresholds), values.shape
        blocks = np.linspace(0, width, min(width, 4 * kernels.threads()) + 1).astype(np.int64)
        on = np.zeros((m, tokens, width), dtype=np.bool_)
        active = np.zeros((len(blocks) - 1, m, tokens), dtype=np.int64)
        bad = np.zeros(len(blocks) - 1, dtype=np.int32)
        kernels.fused_stats(values, values.view(np.int32), limits, on, self.fire_count.numpy(), active,
                            self.act_sum.numpy(), self.act_sumsq.numpy(), self.act_hist.numpy(), blocks, bad)
        active = active.sum(0)
        for i, pairs in enumerate(self.pairs):
            count_into(self.active_hist[i], torch.from_numpy(active[i]))
            pairs.add(torch.from_numpy(on[i]), active[i])
        self.flag[0] = max(int(self.flag[0]), int(bad.max(initial=0)))

    def limits(self, dtype: torch.dtype) -> torch.Tensor:
        """The thresholds as exact values of `dtype` (see exact_threshold), float32, on the counts' device."""
        if dtype not in self._limits:
            values = [exact_threshold(t, dtype) for t in self.thresholds]
            self._limits[dtype] = torch.tensor(values, dtype=torch.float32, device=self.act_sum.device)
        return self._limits[dtype]

    def check(self) -> None:
        """Raise a UserError if a batch had a bad value or a sum left the fixed-point range (waits for the
        device: call once per batch, or use check_all)."""
        explain(self.layer, self.flag.tolist())

    def _sums(self) -> list[torch.Tensor]:
        return [self.fire_count, self.active_hist, self.act_sum, self.act_sumsq, self.act_hist]

    def packed(self) -> list[np.ndarray]:
        """The packed pair counts, one array per threshold (in threshold order)."""
        return [pairs.packed() for pairs in self.pairs]

    def load(self, pairs: list[np.ndarray], stats: np.ndarray) -> None:
        """Add raw sums saved earlier (a checkpoint's `packed()` and `stats()`)."""
        for counter, packed in zip(self.pairs, pairs, strict=True):
            counter.add_packed(packed)
        flat = torch.from_numpy(np.asarray(stats, dtype=np.int64).copy()).to(self.fire_count.device)
        for total, part in zip(self._sums(), torch.split(flat, [t.numel() for t in self._sums()]), strict=True):
            total.add_(part.reshape(total.shape))

    def stats(self) -> np.ndarray:
        """The per-neuron int64 sums, concatenated, for one reduce: fire_count [m, width], active_hist
        [m, width + 1], act_sum, act_sumsq, act_hist [width, HIST_BINS] (m thresholds, all flattened)."""
        return torch.cat([t.reshape(-1) for t in self._sums()]).cpu().numpy()


class MoeCounts:
    """Counts of one MoE block: one LayerCounts per expert, over the tokens routed to it, and the router's
    co-selection counts (a LayerCounts whose neurons are the experts and whose values are 1.0 when selected, so
    every threshold slot holds the same counts). `add` takes models.Routed."""

    def __init__(self, layer: int, experts: int, width: int, thresholds: tuple[float, ...], dtype: torch.dtype,
                 device: str, kernel: str = "auto", panel: torch.dtype | None = None):
        self.layer = layer
        self.experts = [LayerCounts(Unit(layer, e), width, thresholds, dtype, device, kernel, panel)
                        for e in range(experts)]
        self.router = LayerCounts(Unit(layer, router=True), experts, (0.5,) * len(thresholds), dtype, device,
                                  "auto")

    def add(self, routed) -> None:
        """Count one batch: each expert's activations on its tokens, and which experts each token chose."""
        self.router.add(routed.selected)
        for expert, x in routed.activations:
            self.experts[expert].add(x)

    def units(self) -> list[LayerCounts]:
        return [*self.experts, self.router]


def units(counts: list) -> list[LayerCounts]:
    """Every LayerCounts of a run, in a fixed order: per site, an MoE block's experts then its router."""
    return [u for c in counts for u in (c.units() if isinstance(c, MoeCounts) else [c])]


def explain(layer: int, flag: list[int]) -> None:
    """Raise the UserError that a LayerCounts flag [bad values, fixed-point range] stands for, if any."""
    if flag[0]:
        raise UserError(f"layer {layer}: non-finite activations or |x| >= 2**20; the model or its dtype "
                        f"is broken: try --dtype float32 or bfloat16")
    if flag[1]:
        raise UserError(f"layer {layer}: activation sums exceed the fixed-point range; "
                        f"process fewer chunks per run (--chunks) and merge the runs")


def check_all(counts: list) -> None:
    """LayerCounts.check for every unit of a run, with one wait per device instead of one per unit."""
    by_device: dict[torch.device, list[LayerCounts]] = {}
    for lc in units(counts):
        by_device.setdefault(lc.flag.device, []).append(lc)
    for group in by_device.values():
        for lc, flag in zip(group, torch.stack([lc.flag for lc in group]).tolist()):
            explain(lc.layer, flag)


def stats_size(width: int, thresholds: int = 1) -> int:
    """Length of LayerCounts.stats() for a layer of `width` neurons and `thresholds` thresholds."""
    return thresholds * (2 * width + 1) + 2 * width + width * HIST_BINS


def split_stats(flat: np.ndarray, width: int, thresholds: int = 1) -> list[dict[str, np.ndarray]]:
    """Inverse of LayerCounts.stats(): one dict of per-neuron sums per threshold (the threshold-free sums shared)."""
    n, m = width, thresholds
    fire_count = flat[: m * n].reshape(m, n)
    active_hist = flat[m * n : m * (2 * n + 1)].reshape(m, n + 1)
    rest = flat[m * (2 * n + 1) :]
    shared = {"act_sum": rest[:n], "act_sumsq": rest[n : 2 * n], "act_hist": rest[2 * n : 2 * n + n * HIST_BINS]}
    return [{"fire_count": fire_count[i], "active_hist": active_hist[i], **shared} for i in range(m)]


def chunk_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[int, int]:
    """(fixed-point sum of -log p(token | previous tokens of its chunk), number of predictions). One chunk at a
    time: float32 log-probabilities of a whole batch would take 4 bytes x tokens x vocabulary (1 GB for 16 x 512
    tokens of a 32000-word vocabulary)."""
    target = input_ids[:, 1:].to(logits.device)
    total = torch.zeros((), dtype=torch.int64, device=logits.device)
    for row in range(logits.shape[0]):
        logp = torch.log_softmax(logits[row, :-1].float(), dim=-1)
        total += to_fixed(-logp.gather(-1, target[row, :, None])[:, 0], NLL_BITS).sum()
    return int(total.item()), target.numel()


def fixed_maxima(counts: list) -> list[tuple[int, int]]:
    """This rank's largest |act_sum| and act_sumsq of every unit (exact integers), for check_fixed_total."""
    return [(int(lc.act_sum.abs().amax()), int(lc.act_sumsq.amax())) if lc.width else (0, 0) for lc in units(counts)]


def check_fixed_total(maxima: list[list[tuple[int, int]]], counts: list) -> None:
    """Every rank, with every rank's fixed_maxima (an allgather): raise a SharedError when some unit's
    fixed-point sums could leave int64 once the ranks' sums are added (the sum of the ranks' largest
    magnitudes bounds every element and every partial sum of the reduce), instead of a silent wrap."""
    for lc, column in zip(units(counts), zip(*maxima)):
        if sum(m for m, _ in column) > INT64_MAX or sum(m for _, m in column) > INT64_MAX:
            raise SharedError(f"layer {lc.layer}: the activation sums of the {len(maxima)} ranks would exceed the "
                              f"int64 fixed-point range when added; count fewer chunks per run (--chunks) and "
                              f"merge the runs with `sum`")
