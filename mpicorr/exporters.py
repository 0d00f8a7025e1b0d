"""Files the neighbouring tools load: PowerInfer activation counts, METIS graphs, neuron permutations."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from . import triangle
from .files import atomic_path, atomic_write



def powerinfer_name(layer: int) -> str:
    """PowerInfer's file name of one layer's firing counts."""
    return f"activation_{layer}.pt"


def write_powerinfer(folder: str, fire_counts: dict[int, np.ndarray]) -> list[str]:
    """activation_<L>.pt: a 1-D int64 tensor of per-neuron firing counts, as PowerInfer's solver loads them
    (torch.load(f"{path}/activation_{i}.pt") for i in range(layers)). Written in numeric layer order."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for layer in sorted(fire_counts):
        path = os.path.join(folder, powerinfer_name(layer))
        with atomic_path(path) as tmp:
            torch.save(torch.from_numpy(np.asarray(fire_counts[layer], dtype=np.int64).copy()), tmp)
        paths.append(path)
    return paths


def metis_edges(packed: np.ndarray, width: int, min_support: int, min_lift: float, trials: int):
    """Yield (i, neighbours, weights) per neuron: j != i with C[i, j] >= min_support and lift >= min_lift."""
    diag = triangle.diagonal(packed, width).astype(np.float64)
    for r0, r1, block in triangle.full_row_blocks(packed, width):
        keep = block >= max(min_support, 1)
        if min_lift > 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                keep &= block * float(trials) >= min_lift * diag[r0:r1, None] * diag[None, :]
        keep[np.arange(r1 - r0), np.arange(r0, r1)] = False
        for r in range(r1 - r0):
            cols = np.flatnonzero(keep[r])
            yield r0 + r, cols, block[r, cols]


def write_metis(path: str, packed: np.ndarray, width: int, trials: int, min_support: int = 1,
                min_lift: float = 0.0) -> int:
    """The co-firing graph in METIS format (fmt 001: integer edge weights = co-firing counts); returns edges.

    Line 1: `n m 001`; line 1 + v: `u w u w ...` for v's neighbours u (1-based)."""
    # Two passes over the rows on purpose: the header needs the edge count, and a first pass that only counts
    # is cheaper than holding the edge lists (up to N^2) or writing the body twice through a temporary file.
    edges = sum(len(cols) for _, cols, _ in metis_edges(packed, width, min_support, min_lift, trials)) // 2
    with atomic_write(path) as fh:
        fh.write(f"{width} {edges} 001\n".encode())
        for _, cols, weights in metis_edges(packed, width, min_support, min_lift, trials):
            pairs = np.empty(2 * len(cols), dtype=np.int64)
            pairs[0::2], pairs[1::2] = cols + 1, weights
            fh.write((" ".join(map(str, pairs.tolist())) + "\n").encode())
    return edges


def write_permutation(path: str, permutations: dict[int, np.ndarray], labels: dict[int, np.ndarray]) -> None:
    """JSON {"layers": {"<L>": {"permutation": [...], "cluster_sizes": [...]}}}; new neuron p = old perm[p].

    Apply to a gated FFN as gate.weight[perm], up.weight[perm], down.weight[:, perm]; the layer's output
    is unchanged, and neurons of one cluster become contiguous (cluster c is the c-th run of sizes)."""
    doc = {"format": "mpicorr-permutation-1",
           "layers": {str(l): {"permutation": permutations[l].tolist(),
                               "cluster_sizes": np.bincount(labels[l]).tolist()} for l in sorted(permutations)}}
    with atomic_write(path) as fh:
        fh.write(json.dumps(doc).encode())
