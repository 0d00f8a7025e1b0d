"""Whole-job progress on rank 0: all ranks' finished chunks, tokens/s and ETA.

Live (a terminal, no MPI launcher): one line with a bar, redrawn in place; otherwise (mpirun, SLURM logs,
pipes) a plain line every few seconds.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR = 24


def fmt_seconds(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class JobProgress:
    """Counts the chunks every rank reports; prints when due and when the last chunk is in."""

    def __init__(self, total: int, tokens_per_chunk: int, ranks: int, every: float = 10.0,
                 stream: TextIO | None = None, live: bool = False):
        self.total, self.tokens_per_chunk = total, tokens_per_chunk
        self.stream = stream or sys.stdout
        self.live = live
        self.every = 0.5 if self.live else every
        self.start = self.last = time.monotonic()
        self.done, self.by_rank = 0, [0] * ranks

    def update(self, rank: int, chunks: int) -> None:
        """Rank `rank` finished `chunks` more chunks."""
        self.done += chunks
        self.by_rank[rank] += chunks
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            text = self.line(now - self.start)
            end = "\n" if not self.live or self.done == self.total else ""
            print(("\r" if self.live else "") + text, end=end, file=self.stream, flush=True)

    def line(self, elapsed: float) -> str:
        """One progress line (with a bar on a terminal)."""
        rate = self.done * self.tokens_per_chunk / max(elapsed, 1e-9)
        eta = (self.total - self.done) * elapsed / max(self.done, 1)
        share = self.done / max(self.total, 1)
        bar = f"[{'#' * int(BAR * share)}{'.' * (BAR - int(BAR * share))}] " if self.live else ""
        return (f"mpicorr: {bar}chunk {self.done}/{self.total} ({100 * share:.0f}%) on {len(self.by_rank)} "
                f"rank(s), {rate:,.0f} tokens/s, elapsed {fmt_seconds(elapsed)}, ETA {fmt_seconds(eta)}")
