"""Offline analysis of a run folder: reads only the files, one layer at a time.

Used by the scripts in analysis/. Works on folders of the original tool too (matrix files, no summary.h5).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from . import matrixfile, summary, triangle
from .errors import UserError

MATRIX_RE = re.compile(r"correlations_block_(\d+)\.zstd$")


@dataclass(frozen=True)
class LayerFiring:
    """Firing counts of one layer."""

    layer: int
    trials: int
    fire_count: np.ndarray


def matrix_paths(run_dir: str) -> dict[int, str]:
    """{block: path} of the matrix files in a run folder, in numeric block order."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: not a folder; give a run folder written by mpicorr or the original tool")
    found = {int(m.group(1)): os.path.join(run_dir, f) for f in os.listdir(run_dir) if (m := MATRIX_RE.match(f))}
    if not found:
        raise UserError(f"{run_dir}: no correlations_block_<L>.zstd files")
    return dict(sorted(found.items()))


def firing(run_dir: str) -> list[LayerFiring]:
    """Per-layer firing counts: from summary.h5 when present, else from the matrix diagonals."""
    if summary.exists(run_dir):
        _, layers = summary.read_summary(os.path.join(run_dir, summary.SUMMARY))
        return [LayerFiring(l, int(e["attrs"]["tokens"]), e["fire_count"]) for l, e in layers.items()]
    out = []
    for layer, path in matrix_paths(run_dir).items():
        header, packed = matrixfile.read_matrix(path)
        out.append(LayerFiring(layer, header.trials, triangle.diagonal(packed, header.width)))
    return out


def powerlaw_exponent(fire_count: np.ndarray) -> float:
    """α of count ∝ rank^-α, a least-squares line through the log-log rank-frequency plot (nonzero counts)."""
    counts = np.sort(fire_count[fire_count > 0].astype(np.float64))[::-1]
    if len(counts) < 2:
        return float("nan")
    ranks = np.arange(1, len(counts) + 1, dtype=np.float64)
    slope = np.polyfit(np.log(ranks), np.log(counts), 1)[0]
    return float(-slope)


def coverage_curve(fire_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of neurons, share of all firings they make), most frequent neurons first."""
    counts = np.sort(fire_count.astype(np.float64))[::-1]
    total = counts.sum()
    x = np.arange(1, len(counts) + 1) / len(counts)
    y = np.cumsum(counts) / total if total else np.zeros_like(x)
    return x, y


def measure(rows: np.ndarray, diag_rows: np.ndarray, diag_cols: np.ndarray, trials: int, kind: str) -> np.ndarray:
    """A co-firing measure from count rows C[i, :]: count, freq (C/T), cond (P(j|i) = C/C_ii) or lift."""
    c = rows.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "count":
            out = c
        elif kind == "freq":
            out = c / max(trials, 1)
        elif kind == "cond":
            out = c / diag_rows[:, None]
        elif kind == "lift":
            out = c * trials / (diag_rows[:, None] * diag_cols[None, :])
        else:
            raise UserError(f"--measure {kind}: choose count, freq, cond or lift")
    return np.nan_to_num(out, nan=0.0, posinf=0.0)


def heatmap(packed: np.ndarray, width: int, trials: int, order: np.ndarray, pixels: int,
            kind: str = "lift") -> np.ndarray:
    """[p, p] image (p = min(width, pixels)) of a measure, neurons in `order`, averaged over square blocks."""
    p = min(width, pixels)
    edges = np.linspace(0, width, p + 1).astype(np.int64)
    diag = triangle.diagonal(packed, width).astype(np.float64)[order]
    image = np.zeros((p, p))
    for b in range(p):
        rows = triangle.rows_at(packed, order[edges[b] : edges[b + 1]], order)
        block = measure(rows, diag[edges[b] : edges[b + 1]], diag, trials, kind)
        image[b] = np.add.reduceat(block.sum(0), edges[:-1]) / np.diff(edges) / block.shape[0]
    return image
