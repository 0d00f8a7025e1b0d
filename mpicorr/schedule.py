"""Who counts which batch: the static split (plan.py) or a queue rank 0 hands out as ranks ask
(--schedule dynamic), plus rank 0's bookkeeping of every rank's progress and the closing per-rank table.

Counts are sums of exact integers, so which rank counts a batch never changes a result; batches keep their
boundaries, so each chunk is forwarded exactly as in any other run.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass

from .files import atomic_write
from .plan import Batch, format_table
from .progress import JobProgress

RUN_JSON = "run.json"


class WorkQueue:
    """The batches still to hand out, in order."""

    def __init__(self, batches: list[Batch]):
        self.left = deque(batches)

    def take(self) -> Batch | None:
        """The next batch, or None when all are handed out."""
        return self.left.popleft() if self.left else None


class Coordinator:
    """Rank 0's answer to the ranks' messages: ("next",) -> a batch or None; ("done", chunks) -> progress."""

    def __init__(self, queue: WorkQueue | None, progress: JobProgress | None):
        self.queue, self.progress = queue, progress

    def __call__(self, rank: int, message: tuple):
        if message[0] == "next":
            return self.queue.take()
        if message[0] == "done" and self.progress is not None:
            self.progress.update(rank, message[1])
        return None


@dataclass(frozen=True)
class RankReport:
    """What one rank did in this attempt."""

    rank: int
    host: str
    device: str
    chunks: int
    busy_s: float


def rank_rows(reports: list[RankReport], wall_s: float, ctx: int) -> list[dict]:
    """Per-rank numbers: tokens/s while busy (the rank's speed) and busy % of the job's counting time."""
    rows = []
    for r in reports:
        speed = r.chunks * ctx / r.busy_s if r.busy_s > 0 else 0.0
        rows.append({**asdict(r), "tokens": r.chunks * ctx, "tokens_per_s": speed,
                     "busy_percent": 100.0 * r.busy_s / wall_s if wall_s > 0 else 0.0})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The per-rank table printed at the end."""
    table = [("rank", "host", "device", "chunks", "tokens/s", "busy")]
    for r in rows:
        table.append((str(r["rank"]), r["host"], r["device"], str(r["chunks"]), f"{r['tokens_per_s']:,.0f}",
                      f"{r['busy_percent']:.0f}%"))
    return format_table(table)


def write_run_json(path: str, schedule: str, wall_s: float, rows: list[dict]) -> None:
    """run.json: how the counting went, per rank (see the README)."""
    doc = {"format": "mpicorr-run-1", "schedule": schedule, "counting_seconds": wall_s, "ranks": rows}
    with atomic_write(path) as fh:
        fh.write(json.dumps(doc, indent=1).encode())
