"""What a set of counts covers, and the units its sums are kept in: shared by the counting (which needs
torch) and the files and file tools (which must start without it), so numpy only.

Real-valued sums are kept in fixed point (each per-token value rounded to a multiple of 2**-bits, the
integers added), so that merging ranks, runs or files is plain integer addition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACT_SUM_BITS = 24     # act_sum: each x rounded to a multiple of 2**-24
ACT_SUMSQ_BITS = 16   # act_sumsq: each x*x rounded to a multiple of 2**-16
NLL_BITS = 24         # log-likelihood: each token's value rounded to a multiple of 2**-24
# Per-neuron histogram of activation values: magnitude classes at half powers of two from 2**-10 to 2**6
# (0.25, 0.5, 1, 2 ... are edges, so the share any such threshold keeps is exact), mirrored for x < 0.
HIST_LOW, HIST_HIGH = -20, 12           # edges 2**(j/2) for j in [HIST_LOW, HIST_HIGH]
HIST_MAGNITUDES = HIST_HIGH - HIST_LOW + 2  # |x| below the first edge, one class per step, >= the last edge
HIST_BINS = 2 * HIST_MAGNITUDES - 1     # -(>= 64) ... -(first class), near zero, +(first class) ... +(>= 64)


def hist_edges() -> np.ndarray:
    """The magnitude edges 2**(j/2) as float32, the values the bins are cut at."""
    return (2.0 ** (np.arange(HIST_LOW, HIST_HIGH + 1) / 2.0)).astype(np.float32)


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
