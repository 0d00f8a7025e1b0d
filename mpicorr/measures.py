"""Co-firing measures computed from the counts C (C[i, j] = tokens on which i and j both fire, C[i, i] = tokens
on which i fires, T = tokens), streamed over blocks of rows so that no full matrix is needed.

Every measure is a function of (C[i, j], C[i, i], C[j, j], T); a pair whose measure is undefined (a neuron that
never fires, a neuron that always fires for phi) gives NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import layout
from .errors import UserError

MEASURES = ("count", "freq", "cond", "lift", "pmi", "phi", "jaccard")
RANKABLE = ("count", "cond", "lift", "pmi", "phi", "jaccard")
BLOCK_ELEMENTS = 1 << 22  # lower-triangle cells per row block (32 MB of int64)
# Histogram bins of each measure over pairs (cond over both directions).
BINS = {
    "cond": np.linspace(0.0, 1.0, 101),
    "pmi": np.linspace(-8.0, 8.0, 129),
    "phi": np.linspace(-1.0, 1.0, 101),
    "jaccard": np.linspace(0.0, 1.0, 101),
}


def pair_measure(c: np.ndarray, ci: np.ndarray, cj: np.ndarray, trials: int, kind: str) -> np.ndarray:
    """The measure `kind` of pairs with co-count c and single counts ci, cj (broadcast), as float64."""
    c, ci, cj = (np.asarray(a, dtype=np.float64) for a in (c, ci, cj))
    t = float(trials)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "count":
            return c + 0 * ci * cj
        if kind == "freq":
            return c / t if t else np.full(np.broadcast(c, ci, cj).shape, np.nan)
        if kind == "cond":  # P(j | i)
            return np.where(ci > 0, c / ci, np.nan)
        if kind in ("lift", "pmi"):
            lift = np.where((ci > 0) & (cj > 0), c * t / (ci * cj), np.nan)
            return lift if kind == "lift" else np.log2(lift)
        if kind == "phi":
            den = np.sqrt(ci * cj * (t - ci) * (t - cj))
            return np.where(den > 0, (t * c - ci * cj) / den, np.nan)
        if kind == "jaccard":
            union = ci + cj - c
            return np.where(union > 0, c / union, np.nan)
    raise UserError(f"--measure {kind}: choose one of {', '.join(MEASURES)}")


def lower_blocks(packed: np.ndarray, width: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(r0, r1, C[r0:r1, :r1] as int64, mask of the pairs j < i) over row blocks of the lower triangle."""
    r0 = 0
    while r0 < width:
        r1 = r0 + 1
        while r1 < width and (r1 - r0 + 1) * (r1 + 1) <= BLOCK_ELEMENTS:
            r1 += 1
        block = layout.rows(packed, r0, r1, r1).astype(np.int64)
        below = np.arange(r1)[None, :] < np.arange(r0, r1)[:, None]
        yield r0, r1, block, below
        r0 = r1


@dataclass(frozen=True)
class Pairs:
    """The strongest pairs (i > j) of a layer, strongest first."""

    i: np.ndarray
    j: np.ndarray
    count: np.ndarray
    value: np.ndarray


def rank_value(c, ci, cj, trials: int, kind: str) -> np.ndarray:
    """The value pairs are ranked by: the measure, or for cond the larger of P(j | i) and P(i | j)."""
    if kind == "cond":
        return np.fmax(pair_measure(c, ci, cj, trials, "cond"), pair_measure(c, cj, ci, trials, "cond"))
    if kind not in RANKABLE:
        raise UserError(f"--rank-by {kind}: choose one of {', '.join(RANKABLE)}")
    return pair_measure(c, ci, cj, trials, kind)


def top_pairs(packed: np.ndarray, width: int, trials: int, kind: str, k: int, min_support: int = 1) -> Pairs:
    """The k pairs i > j with C[i, j] >= min_support and the largest `kind` (ties: larger count, lower i, j)."""
    diag = layout.diagonal(packed, width).astype(np.int64)
    best = Pairs(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.int64, np.float64)))
    for r0, r1, block, below in lower_blocks(packed, width):
        ii, jj = np.nonzero(below & (block >= max(min_support, 1)))
        c = block[ii, jj]
        ii = ii + r0
        v = rank_value(c, diag[ii], diag[jj], trials, kind)
        keep = ~np.isnan(v)
        best = _best(Pairs(np.concatenate([best.i, ii[keep]]), np.concatenate([best.j, jj[keep]]),
                           np.concatenate([best.count, c[keep]]), np.concatenate([best.value, v[keep]])), k)
    return best


def _best(p: Pairs, k: int) -> Pairs:
    """The k best of p, sorted: value, then count descending, then i, j ascending (deterministic)."""
    if len(p.value) > k > 0:
        # Cheap preselection; >= keeps every pair tied with the k-th so the sort below decides ties.
        keep = p.value >= np.partition(p.value, len(p.value) - k)[len(p.value) - k]
        p = Pairs(p.i[keep], p.j[keep], p.count[keep], p.value[keep])
    order = np.lexsort((p.j, p.i, -p.count, -p.value))[:k]
    return Pairs(p.i[order], p.j[order], p.count[order], p.value[order])


def histograms(packed: np.ndarray, width: int, trials: int, min_support: int = 1) -> dict[str, np.ndarray]:
    """Counts of pairs i > j with C[i, j] >= min_support in BINS of each measure (cond: both directions).

    Values outside the bins are clipped into the first or last bin so that every pair is counted once."""
    diag = layout.diagonal(packed, width).astype(np.int64)
    hist = {kind: np.zeros(len(edges) - 1, dtype=np.int64) for kind, edges in BINS.items()}
    for r0, r1, block, below in lower_blocks(packed, width):
        ii, jj = np.nonzero(below & (block >= max(min_support, 1)))
        c, ci, cj = block[ii, jj], diag[ii + r0], diag[jj]
        for kind, edges in BINS.items():
            v = pair_measure(c, ci, cj, trials, kind)
            if kind == "cond":
                v = np.concatenate([v, pair_measure(c, cj, ci, trials, kind)])
            v = np.clip(v[~np.isnan(v)], edges[0], edges[-1])
            # bins + range (not the edge array) takes numpy's fast path for equal-width bins.
            hist[kind] += np.histogram(v, bins=len(edges) - 1, range=(edges[0], edges[-1]))[0]
    return hist


def pair_rows(layer: int, pairs: Pairs, diag: np.ndarray, trials: int) -> list[dict]:
    """CSV rows of the pairs with every measure."""
    rows = []
    for i, j, c in zip(pairs.i.tolist(), pairs.j.tolist(), pairs.count.tolist()):
        ci, cj = int(diag[i]), int(diag[j])
        row = {"layer": layer, "i": i, "j": j, "count": c, "p_i": ci / trials, "p_j": cj / trials,
               "p_j_given_i": c / ci, "p_i_given_j": c / cj}
        for kind in ("lift", "pmi", "phi", "jaccard"):
            row[kind] = float(pair_measure(c, ci, cj, trials, kind))
        rows.append(row)
    return rows
