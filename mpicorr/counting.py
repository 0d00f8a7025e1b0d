"""Per-layer raw sums: co-firing pair counts and per-neuron statistics.

Every quantity is an integer, so merging ranks, runs or files is plain addition and the result does not
depend on how the chunks were split. Real-valued sums (act_sum, act_sumsq, log-likelihood) are kept in
fixed point: each per-token value is rounded to a multiple of 2**-bits and the integers are added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import triangle
from .errors import UserError

ACT_SUM_BITS = 24     # act_sum: each x rounded to a multiple of 2**-24
ACT_SUMSQ_BITS = 16   # act_sumsq: each x*x rounded to a multiple of 2**-16
NLL_BITS = 24         # log-likelihood: each token's value rounded to a multiple of 2**-24
# Each rank keeps fixed-point sums below 2**56 so that adding up to 128 ranks cannot overflow int64.
FIXED_LIMIT = 1 << 56
# Larger (or non-finite) activations mean a broken model or dtype; they would also overflow x*x in fixed point.
ACT_LIMIT = float(1 << 20)
# Per-neuron histogram of activation values: magnitude classes at half powers of two from 2**-10 to 2**6
# (0.25, 0.5, 1, 2 ... are edges, so the share any such threshold keeps is exact), mirrored for x < 0.
HIST_LOW, HIST_HIGH = -20, 12           # edges 2**(j/2) for j in [HIST_LOW, HIST_HIGH]
HIST_MAGNITUDES = HIST_HIGH - HIST_LOW + 2  # |x| below the first edge, one class per step, >= the last edge
HIST_BINS = 2 * HIST_MAGNITUDES - 1     # -(>= 64) ... -(first class), near zero, +(first class) ... +(>= 64)
SQRT2_MANTISSA = int(np.float32(np.sqrt(2.0)).view(np.int32)) & 0x7FFFFF


def hist_edges() -> np.ndarray:
    """The magnitude edges 2**(j/2) as float32, the values the bins are cut at."""
    return (2.0 ** (np.arange(HIST_LOW, HIST_HIGH + 1) / 2.0)).astype(np.float32)


def hist_bins(x: torch.Tensor) -> torch.Tensor:
    """Signed histogram bin of each value (same shape, int32): HIST_MAGNITUDES - 1 is |x| < 2**-10.

    From the float32 bits: |x| = 1.f * 2**(E - 127), so floor(2 log2 |x|) = 2 (E - 127) + (1.f >= sqrt 2),
    with sqrt 2 rounded to float32 like the edges (the same bins as searching the edges, 4x faster)."""
    bits = x.float().contiguous().view(torch.int32)
    step = ((bits >> 23) & 0xFF) * 2 + ((bits & 0x7FFFFF) >= SQRT2_MANTISSA).to(torch.int32)
    magnitude = (step - (254 + HIST_LOW - 1)).clamp_(0, HIST_MAGNITUDES - 1)
    return torch.where(bits < 0, (HIST_MAGNITUDES - 1) - magnitude, (HIST_MAGNITUDES - 1) + magnitude)


def fired(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which values fire at `threshold` (a bool tensor of x's shape): the one comparison behind the counts and
    the --dump masks."""
    return x.abs() >= threshold


def count_dtype(total_tokens: int) -> torch.dtype:
    """Narrowest signed width in which no count (each <= total tokens) can overflow, on every rank."""
    return torch.int32 if total_tokens < (1 << 31) else torch.int64


def to_fixed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Round float values to integers in units of 2**-bits (int64)."""
    return torch.round(values.double() * float(1 << bits)).to(torch.int64)


@dataclass(frozen=True)
class Unit:
    """What one set of counts covers: a block's neurons, one expert of an MoE block (over the tokens routed to
    it), or an MoE block's router (its experts as neurons: co-selection counts)."""

    layer: int
    expert: int | None = None
    router: bool = False

    @property
    def name(self) -> str:
        """Stable name, as in checkpoints: block_5, block_5_expert_3, block_5_router."""
        return f"block_{self.layer}" + (f"_expert_{self.expert}" if self.expert is not None else "") + \
            ("_router" if self.router else "")


class LayerCounts:
    """Raw sums for one unit of `width` neurons at one or more thresholds; `add` takes activations of shape
    [..., width]. Pair counts, fire counts and active-neuron histograms are kept per threshold; the activation
    sums and histograms do not depend on it and are kept once."""

    def __init__(self, unit: Unit | int, width: int, thresholds: tuple[float, ...], dtype: torch.dtype,
                 device: str, kernel: str = "auto", panel: torch.dtype | None = None):
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
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Count one batch of activations."""
        x = x.detach().reshape(-1, self.width)
        magnitude = x.abs()
        for i, threshold in enumerate(self.thresholds):
            mask = fired(x, threshold)
            self.pairs[i].add(mask)
            self.fire_count[i] += mask.sum(0)
            self.active_hist[i] += torch.bincount(mask.sum(1), minlength=self.width + 1)
        xf = x.float()
        # x * 2**24 and its rounding are exact in float32, so this equals to_fixed(x, ACT_SUM_BITS), 3x faster
        self.act_sum += torch.round(xf * float(1 << ACT_SUM_BITS)).to(torch.int64).sum(0)
        # bfloat16 and float16 squares have at most 22 significant bits, exact in float32 (as is the scaling and
        # rounding), so they give to_fixed(x.double() ** 2, ACT_SUMSQ_BITS) at half the memory traffic
        square = xf**2 if x.dtype in (torch.bfloat16, torch.float16) else x.double() ** 2
        self.act_sumsq += torch.round(square * float(1 << ACT_SUMSQ_BITS)).to(torch.int64).sum(0)
        self.act_hist += torch.bincount((hist_bins(xf) + self.hist_base).reshape(-1), minlength=len(self.act_hist))
        self.tokens += x.shape[0]
        # One device sync per batch and layer: every check in one flag, the message worked out on failure.
        sane = ((magnitude < ACT_LIMIT).all() & (self.act_sum.abs().max() < FIXED_LIMIT)
                & (self.act_sumsq.max() < FIXED_LIMIT))
        if not bool(sane):
            self._explain(x)

    def _explain(self, x: torch.Tensor) -> None:
        if not bool((x.abs() < ACT_LIMIT).all()):
            raise UserError(f"layer {self.layer}: non-finite activations or |x| >= 2**20; the model or its dtype "
                            f"is broken: try --dtype float32 or bfloat16")
        raise UserError(f"layer {self.layer}: activation sums exceed the fixed-point range; "
                        f"process fewer chunks per run (--chunks) and merge the runs")

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
    """(fixed-point sum of -log p(token | previous tokens of its chunk), number of predictions)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:].to(logp.device)
    nll = -logp.gather(-1, target[..., None])[..., 0]
    return int(to_fixed(nll, NLL_BITS).sum().item()), target.numel()
