"""Progress lines with rate and ETA, printed at most every few seconds (rank 0 only)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def fmt_seconds(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Reports `done` of `total` chunks; the ETA extrapolates this rank's rate (ranks are balanced)."""

    def __init__(self, total: int, tokens_per_chunk: int, every: float = 10.0, stream: TextIO | None = None):
        self.total, self.tokens_per_chunk, self.every = total, tokens_per_chunk, every
        self.stream = stream or sys.stdout
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, chunks: int) -> None:
        """Record `chunks` more finished chunks; print when due or when finished."""
        self.done += chunks
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            print(self.line(now - self.start), file=self.stream, flush=True)

    def line(self, elapsed: float) -> str:
        """One progress line."""
        rate = self.done * self.tokens_per_chunk / max(elapsed, 1e-9)
        eta = (self.total - self.done) * elapsed / max(self.done, 1)
        pct = 100.0 * self.done / max(self.total, 1)
        return (f"mpicorr: rank 0 chunk {self.done}/{self.total} ({pct:.0f}%), {rate:,.0f} tokens/s, "
                f"elapsed {fmt_seconds(elapsed)}, ETA {fmt_seconds(eta)}")
