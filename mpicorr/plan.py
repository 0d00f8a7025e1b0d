"""Work plan: hostfile weights per rank, and a run of whole batches per rank.

Hostfile lines (``#`` starts a comment)::

    gpu01 slots=4 weight=2     # Open MPI syntax; weight applies to each slot (default 1)
    gpu02 slots=2 # weight=3   # the same, in a comment: mpirun itself rejects 'weight=' in a hostfile
    gpu03 48                   # the original servers.txt form: host weight (one slot)
    localhost                  # no slots=: any number of ranks on that host, weight 1
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}
# The slots of a line without slots=: any number of ranks may run on that host (mpirun gives such a line one
# slot per core); `plan -n N` places every remaining rank there.
ANY_SLOTS = 1 << 12
MAX_RANKS = 1 << 16  # slots= and plan -n above this are typos (and would take gigabytes to plan)
MAX_WEIGHT = 1e12  # weights are relative: this bound keeps the sum of every rank's weight finite


@dataclass(frozen=True)
class HostLine:
    """One hostfile line: a host with `slots` ranks, each of weight `weight`."""

    host: str
    slots: int
    weight: float


Batch = tuple[int, int]  # chunks [start, stop) forwarded together


@dataclass(frozen=True)
class Assignment:
    """What one rank does: a run of consecutive batches of the work list (one range on a fresh run)."""

    rank: int
    host: str
    weight: float
    batches: tuple[Batch, ...]

    @property
    def chunks(self) -> int:
        """Number of chunks."""
        return sum(b - a for a, b in self.batches)

    @property
    def ranges(self) -> list[Batch]:
        """The batches merged into maximal contiguous chunk ranges."""
        return merge_ranges(self.batches)


def parse_hostfile(text: str, path: str = "hostfile") -> list[HostLine]:
    """Parse Open MPI (`host slots=N [weight=W]`) and servers.txt (`host W`) lines."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        body, _, comment = raw.partition("#")
        words = body.split()
        if not words:
            continue
        where = f"{path}:{number}"
        host, opts = words[0], words[1:]
        hidden = re.search(r"\bweight=(\S+)", comment)
        if hidden and not any(o.startswith("weight=") for o in opts):
            opts.append(hidden.group(0))
        if len(opts) == 1 and "=" not in opts[0]:
            lines.append(HostLine(host, 1, _positive(opts[0], "weight", where)))
            continue
        slots, weight = ANY_SLOTS, 1.0
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "slots":
                slots = int(_positive(value, "slots", where, whole=True))
            elif key == "weight":
                weight = _positive(value, "weight", where)
            elif key not in ("max_slots", "max-slots"):
                raise UserError(f"{where}: unknown field '{opt}'; write 'host slots=N weight=W' or 'host W'")
        lines.append(HostLine(host, slots, weight))
    if not lines:
        raise UserError(f"{path}: no host lines; add lines like 'gpu01 slots=4' or remove the file")
    return lines


def _positive(value: str, what: str, where: str, whole: bool = False) -> float:
    pattern = r"[0-9]+" if whole else r"[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?"
    most = MAX_RANKS if whole else MAX_WEIGHT  # slots: a typo; weights: their sum must stay finite
    if not re.fullmatch(pattern, value) or not 0 < float(value) <= most:
        kind = "a whole number" if whole else "a number"
        raise UserError(f"{where}: {what} '{value}' must be {kind} > 0 and at most {most:g}")
    return float(value)


def short(host: str) -> str:
    """Short host name, as hostfiles and processor names are compared."""
    return host if _is_ip(host) else host.split(".", 1)[0].lower()


def _is_ip(host: str) -> bool:
    return bool(re.fullmatch(r"[0-9.]+", host)) or ":" in host


def rank_weights(lines: list[HostLine], hosts: list[str], path: str = "hostfile") -> list[float]:
    """Weight of every rank: ranks on one host take its slots in rank order.

    `hosts[r]` is rank r's processor name; `localhost` lines stand for rank 0's host (where mpirun runs).
    """
    slots: dict[str, list[float]] = {}
    for line in lines:
        name = short(hosts[0]) if line.host.lower() in LOCAL_NAMES else short(line.host)
        slots.setdefault(name, []).extend([line.weight] * line.slots)
    taken: dict[str, int] = {}
    weights = []
    for rank, host in enumerate(hosts):
        name = short(host)
        if name not in slots:
            raise UserError(f"{path}: no line for host '{host}' (rank {rank}); add '{name} slots=1'")
        i = taken.get(name, 0)
        if i >= len(slots[name]):
            raise UserError(f"{path}: host '{name}' has {len(slots[name])} slot(s) but more ranks run there; "
                            f"raise its slots=")
        taken[name] = i + 1
        weights.append(slots[name][i])
    return weights


def by_slot(lines: list[HostLine], ranks: int, path: str = "hostfile") -> list[tuple[HostLine, int]]:
    """Open MPI's default placement: ranks fill each host's slots in hostfile order.

    Returns, per rank, its hostfile line and its local index on that host (its GPU with --device auto).
    """
    total = sum(line.slots for line in lines)
    if ranks > total:
        raise UserError(f"{path}: {ranks} ranks need {ranks} slots but the hostfile has {total}")
    hosts: dict[str, list[HostLine]] = {}  # one host may have several lines: mpirun adds up their slots
    for line in lines:
        hosts.setdefault("localhost" if line.host.lower() in LOCAL_NAMES else short(line.host), []).append(line)
    placed: list[tuple[HostLine, int]] = []
    for same in hosts.values():
        local = 0
        for line in same:
            for _ in range(min(line.slots, ranks - len(placed))):
                placed.append((line, local))
                local += 1
    return placed


def split(units: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) unit ranges proportional to weights (largest remainder; ties to lower rank)."""
    total = sum(weights)
    quotas = [units * w / total for w in weights]
    counts = [int(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda r: (-(quotas[r] - counts[r]), r))
    for r in order[: units - sum(counts)]:
        counts[r] += 1
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def batches(chunk_start: int, chunks: int, batch_size: int) -> list[Batch]:
    """Chunks [chunk_start, chunk_start + chunks) cut into forward-pass batches (the last may be short).

    The batches are fixed by the chunk range alone, so every chunk is forwarded in the same batch whatever
    the number of ranks or resumes, and activations (hence counts) are bit-for-bit the same.
    """
    end = chunk_start + chunks
    return [(b, min(b + batch_size, end)) for b in range(chunk_start, end, batch_size)]


def part(start: int, count: int, batch: int, k: int, n: int) -> tuple[int, int]:
    """(start, count) of the k-th of n shares of chunks [start, start + count), cut at batch boundaries,
    so each share is forwarded in the same batches as a run over the whole range."""
    total = -(-count // batch)
    if n > total:
        raise UserError(f"--part {k}/{n}: the {count} chunks make only {total} batches; use at most {total} parts")
    lo, hi = total * k // n, total * (k + 1) // n
    first = start + lo * batch
    return first, min(start + count, start + hi * batch) - first


def merge_ranges(ranges: list[Batch] | tuple[Batch, ...]) -> list[Batch]:
    """Sorted, non-empty, maximal [start, stop) ranges covering the same chunks."""
    merged: list[Batch] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def make_plan(work: list[Batch], hosts: list[str], weights: list[float]) -> list[Assignment]:
    """Split the batches over the ranks: consecutive runs of whole batches, sized by weight."""
    return [Assignment(rank, hosts[rank], weights[rank], tuple(work[u0:u1]))
            for rank, (u0, u1) in enumerate(split(len(work), weights))]


def unfinished(work: list[Batch], finished: list[Batch]) -> list[Batch]:
    """The batches of `work` that no range of `finished` covers.

    Raises ValueError if a finished range covers part of a batch (it came from a different batching).
    """
    done = merge_ranges(finished)
    left = []
    for a, b in work:
        overlap = sum(max(0, min(b, d1) - max(a, d0)) for d0, d1 in done)
        if 0 < overlap < b - a:
            raise ValueError(f"chunks [{a}, {b}) are only partly finished")
        if overlap == 0:
            left.append((a, b))
    return left


def format_ranges(ranges: list[Batch]) -> str:
    """'[0, 8)' or '[0, 8) [16, 24)'; '-' for none."""
    return " ".join(f"[{a}, {b})" for a, b in ranges) or "-"


def format_plan(plan: list[Assignment], devices: list[str], dynamic: bool = False) -> str:
    """The table rank 0 prints before any work (no shares under the dynamic schedule)."""
    rows = [("rank", "host", "device")] if dynamic else [("rank", "host", "device", "weight", "chunks", "count")]
    for a, dev in zip(plan, devices):
        full = (str(a.rank), a.host, dev, f"{a.weight:g}", format_ranges(a.ranges), str(a.chunks))
        rows.append(full[:3] if dynamic else full)
    return format_table(rows)


def describe_dynamic(batches: list[Batch], batch_size: int) -> str:
    """--schedule dynamic in words (the run's opening lines and `plan`): the batches in the order rank 0 hands
    them out, one at a time to whichever rank asks, so no rank has a share known in advance."""
    shown = [format_ranges([b]) for b in batches]
    if len(shown) > 6:
        shown = [*shown[:3], "...", *shown[-2:]]
    chunks = sum(b - a for a, b in batches)
    return (f"dynamic schedule: {len(batches)} batches of up to {batch_size} chunk(s), {chunks} chunks, handed out "
            f"in this order as ranks ask: {' '.join(shown)}; a rank asks for the next when it is free (rank 0 counts "
            f"too), so which rank counts which batch depends on their speeds, and hostfile weights are not used")


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of strings as left-aligned columns two spaces apart (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
