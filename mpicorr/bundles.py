"""Bundles: for each neuron i, the neurons j that fire with it with P(j | i) = C[i, j] / C[i, i] >= q.

A runtime that loads neuron i's weights can load its bundle with it (the row-column bundling of LLM in a
flash, the co-activation bundles of PowerInfer-2). Stored as CSR per layer in `bundles.h5` (one writer,
one reader here): bundle of i = indices[indptr[i]:indptr[i + 1]], ascending.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from . import __version__, layout
from .errors import UserError
from .files import atomic_path, read_layer_groups

BUNDLES = "bundles.h5"


@dataclass(frozen=True)
class LayerBundles:
    """CSR bundles of one layer."""

    layer: int
    indptr: np.ndarray   # int64 [width + 1]
    indices: np.ndarray  # int32 [indptr[-1]]

    def bundle(self, i: int) -> np.ndarray:
        """The bundle of neuron i."""
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def sizes(self) -> np.ndarray:
        """Bundle size of every neuron."""
        return np.diff(self.indptr)


def layer_bundles(layer: int, packed: np.ndarray, width: int, q: float, min_support: int = 1) -> LayerBundles:
    """Bundles at P(j | i) >= q among pairs that co-fire on at least min_support tokens (j != i)."""
    if not 0.0 < q <= 1.0:
        raise UserError(f"--q {q}: must be in (0, 1]")
    diag = layout.diagonal(packed, width).astype(np.int64)
    sizes, parts = [], []
    for r0, r1, block in layout.full_row_blocks(packed, width):
        ci = diag[r0:r1, None]
        # C >= q * C_ii rather than C / C_ii >= q: no division rounding at the boundary (counts < 2^53).
        keep = (block >= max(min_support, 1)) & (block >= q * ci) & (ci > 0)
        keep[np.arange(r1 - r0), np.arange(r0, r1)] = False
        rows, cols = np.nonzero(keep)
        sizes.append(np.bincount(rows, minlength=r1 - r0))
        parts.append(cols.astype(np.int32))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(sizes))]).astype(np.int64)
    return LayerBundles(layer, indptr, np.concatenate(parts) if parts else np.zeros(0, np.int32))


def size_stats(b: LayerBundles) -> dict:
    """Mean, median, max bundle size and the share of neurons with a non-empty bundle."""
    s = b.sizes()
    return {"mean": float(s.mean()) if len(s) else 0.0, "median": float(np.median(s)) if len(s) else 0.0,
            "max": int(s.max()) if len(s) else 0, "nonempty": float((s > 0).mean()) if len(s) else 0.0}


def write_bundles(path: str, results: list[LayerBundles], attrs: dict) -> None:
    """bundles.h5: root attributes (q, min_support, ...), layers/<L>/{indptr, indices}."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update({"format": "mpicorr-bundles-1", "mpicorr_version": __version__, **attrs})
        for b in results:
            g = h5.create_group(f"layers/{b.layer}")
            g.create_dataset("indptr", data=b.indptr)
            g.create_dataset("indices", data=b.indices, compression="gzip")


def read_bundles(path: str) -> tuple[dict, dict[int, LayerBundles]]:
    """(root attributes, {layer: LayerBundles}) of a bundles.h5."""
    return read_layer_groups(path, "mpicorr-bundles-1", "analysis/bundles.py",
                             lambda layer, g: LayerBundles(layer, g["indptr"][()], g["indices"][()]))
