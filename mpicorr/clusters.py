"""Groups of neurons that fire together, from one layer's counts (as MoEfication turns an FFN into experts).

The co-firing graph has the off-diagonal counts C[i, j] as edge weights. A regularised normalised spectral
embedding (Amini et al. 2013: degrees + their mean, so rare and dead neurons do not dominate) gives
- the Fiedler ordering: neurons sorted by the second eigenvector, which puts co-firing neurons next to
  each other (what the original's last tool did for its heatmaps);
- K clusters: k-means on the row-normalised top-K eigenvectors, optionally with equal sizes.

Quality is measured on the counts only: the share of co-firing mass inside clusters, and how many
clusters an average token touches, bounded from pairwise counts (no per-token data exists):
de Caen's lower bound P(any of g fires) >= sum_i p_i^2 / sum_j p_ij and Hunter's upper bound
sum_i p_i - (maximum spanning tree of p_ij). Both are exact when a cluster's neurons always fire together.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np
from scipy.sparse.linalg import LinearOperator, eigsh

from . import __version__, layout
from .errors import UserError
from .files import atomic_path, read_layer_groups

CLUSTERS = "clusters.h5"
KMEANS_ITERS = 100
KMEANS_RESTARTS = 10
BALANCED_ITERS = 20
DENSE_SOLVER_WIDTH = 512  # below this a full eigendecomposition is fast and exact


def dense(packed: np.ndarray, width: int) -> np.ndarray:
    """The full symmetric count matrix as float32 (exact below 2^24), filled in row blocks."""
    full = np.empty((width, width), dtype=np.float32)
    for r0, r1, block in layout.full_row_blocks(packed, width):
        full[r0:r1] = block
    return full


def affinity(full: np.ndarray) -> np.ndarray:
    """The co-firing graph: counts with a zero diagonal (a new array)."""
    w = full.copy()
    np.fill_diagonal(w, 0.0)
    return w


def spectral(w: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues descending, eigenvectors as columns) of the k largest of D^-1/2 W D^-1/2, D = degree + mean.

    The returned vectors are already scaled by D^-1/2 (random-walk form), so they can be sorted directly."""
    n = len(w)
    degree = w.sum(axis=1, dtype=np.float64)
    scale = (1.0 / np.sqrt(degree + max(degree.mean(), 1e-12))).astype(np.float32)
    k = min(k, n - 1)
    if n < 3 or k < 1:
        return np.ones(1), np.ones((n, 1)) / max(np.sqrt(n), 1)
    if n <= DENSE_SOLVER_WIDTH:
        vals, vecs = np.linalg.eigh((scale[:, None] * w * scale[None, :]).astype(np.float64))
    else:
        # float32 products: a float64 operand would make numpy copy W to float64 on every product.
        op = LinearOperator((n, n), dtype=np.float32,
                            matvec=lambda x: scale * (w @ (scale * x.ravel().astype(np.float32))),
                            matmat=lambda x: scale[:, None] * (w @ (scale[:, None] * x.astype(np.float32))))
        v0 = np.random.default_rng(seed).random(n).astype(np.float32) + 0.5  # fixed start: reproducible
        vals, vecs = eigsh(op, k=k, which="LA", v0=v0, tol=1e-5, maxiter=100 * n)
    order = np.argsort(-vals, kind="stable")[:k]
    vecs = vecs[:, order] * scale[:, None]
    # Sign convention (eigenvectors have none): the largest entry in absolute value is positive.
    flip = np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])])
    return vals[order], vecs * np.where(flip == 0, 1, flip)


def fiedler_order(vecs: np.ndarray) -> np.ndarray:
    """Neurons sorted by the Fiedler vector (the second eigenvector; ties by index)."""
    key = vecs[:, 1] if vecs.shape[1] > 1 else np.zeros(len(vecs))
    return np.lexsort((np.arange(len(key)), key))


def kmeans(x: np.ndarray, k: int, balanced: bool, seed: int = 0, restarts: int = KMEANS_RESTARTS) -> np.ndarray:
    """Cluster ids of the rows of x: the best (least squared distance) of several k-means++/Lloyd runs;
    `balanced` then enforces sizes that differ by at most one."""
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):  # Lloyd finds local optima; restarts are cheap next to the eigenvectors
        labels, centres = _lloyd(x, _plus_plus(x, k, rng))
        cost = _distances(x, centres)[np.arange(len(x)), labels].sum()
        if cost < best_cost - 1e-12:
            best, best_cost, best_centres = labels, cost, centres
    labels, centres = best, best_centres
    if balanced:
        for _ in range(BALANCED_ITERS):
            new = balanced_assign(_distances(x, centres), _sizes(len(x), k))
            if np.array_equal(new, labels):
                break
            labels = new
            centres = _centres(x, labels, centres)
    return labels


def _lloyd(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations to a fixed point: (labels, centres)."""
    labels = np.full(len(x), -1)
    for _ in range(KMEANS_ITERS):
        new = _distances(x, centres).argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        centres = _centres(x, labels, centres)
    return labels, centres


def _plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding."""
    centres = [x[rng.integers(len(x))]]
    d = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        pick = rng.choice(len(x), p=d / d.sum()) if d.sum() > 0 else rng.integers(len(x))
        centres.append(x[pick])
        d = np.minimum(d, ((x - x[pick]) ** 2).sum(axis=1))
    return np.array(centres)


def _distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distances [points, centres]."""
    return (x**2).sum(1)[:, None] - 2 * x @ centres.T + (centres**2).sum(1)[None, :]


def _centres(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Means of each cluster; an empty cluster keeps its old centre."""
    out = old.copy()
    for c in np.unique(labels):
        out[c] = x[labels == c].mean(axis=0)
    return out


def _sizes(n: int, k: int) -> np.ndarray:
    """k sizes summing to n that differ by at most one."""
    return np.full(k, n // k) + (np.arange(k) < n % k)


def balanced_assign(dist: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Assign each point to the nearest centre that still has room; points that lose most by waiting go first."""
    sorted_d = np.sort(dist, axis=1)
    regret = sorted_d[:, 1] - sorted_d[:, 0] if dist.shape[1] > 1 else np.zeros(len(dist))
    room = sizes.astype(np.int64).copy()
    labels = np.empty(len(dist), dtype=np.int64)
    for p in np.lexsort((np.arange(len(dist)), -regret)):
        c = int(np.argmin(np.where(room > 0, dist[p], np.inf)))
        labels[p] = c
        room[c] -= 1
    return labels


@dataclass(frozen=True)
class Quality:
    """How well a partition keeps co-firing inside clusters (see the module docstring)."""

    inside_share: float   # co-firing mass (sum of C[i, j], i != j) inside clusters / all of it
    touched_low: float    # clusters an average token touches: lower bound (de Caen)
    touched_high: float   # upper bound (Hunter)


def quality(full: np.ndarray, trials: int, labels: np.ndarray) -> Quality:
    """Quality of `labels` on the counts `full`."""
    diag = np.diag(full).astype(np.float64)
    total = full.sum(dtype=np.float64) - diag.sum()
    inside, low, high = 0.0, 0.0, 0.0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        block = full[np.ix_(idx, idx)].astype(np.float64) / max(trials, 1)
        inside += block.sum() * max(trials, 1) - diag[idx].sum()
        lo, hi = union_bounds(block)
        low, high = low + lo, high + hi
    return Quality(float(inside / total) if total > 0 else 0.0, float(low), float(high))


def union_bounds(p: np.ndarray) -> tuple[float, float]:
    """Bounds on P(at least one of the events fires) from pairwise probabilities p[i, j] (p[i, i] = P(i))."""
    single = np.diag(p)
    live = single > 0
    if not live.any():
        return 0.0, 0.0
    p = p[np.ix_(live, live)]
    single = single[live]
    lower = max(float((single**2 / p.sum(axis=1)).sum()), float(single.max()))
    upper = min(1.0, float(single.sum() - max_spanning_tree(p)))
    return min(lower, upper), upper


def max_spanning_tree(w: np.ndarray) -> float:
    """Weight of a maximum spanning tree of the complete graph with weights w (Prim, O(n^2))."""
    n = len(w)
    if n < 2:
        return 0.0
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0] = True
    best = w[0].astype(np.float64).copy()
    total = 0.0
    for _ in range(n - 1):
        j = int(np.argmax(np.where(in_tree, -np.inf, best)))
        total += best[j]
        in_tree[j] = True
        best = np.maximum(best, w[j])
    return total


def random_balanced(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random partition with the same cluster sizes."""
    return np.random.default_rng(seed).permutation(labels)


@dataclass(frozen=True)
class LayerClusters:
    """The clustering of one layer: labels renumbered so that labels[permutation] is non-decreasing."""

    layer: int
    labels: np.ndarray
    permutation: np.ndarray
    fiedler: np.ndarray
    quality: Quality
    random: Quality


def cluster_layer(layer: int, full: np.ndarray, trials: int, k: int, balanced: bool, seed: int = 0) -> LayerClusters:
    """Clusters, Fiedler vector, permutation and quality (against a random partition) of one layer."""
    width = len(full)
    if not 1 <= k <= width:
        raise UserError(f"--clusters {k}: must be between 1 and the layer width {width}")
    w = affinity(full)
    _, vecs = spectral(w, max(k, 2), seed)
    del w
    emb = vecs[:, :k] / np.maximum(np.linalg.norm(vecs[:, :k], axis=1, keepdims=True), 1e-12)
    labels = kmeans(emb.astype(np.float64), k, balanced, seed) if k > 1 else np.zeros(width, dtype=np.int64)
    fiedler = vecs[:, 1] if vecs.shape[1] > 1 else np.zeros(width)
    labels, permutation = cluster_permutation(labels, fiedler)
    return LayerClusters(layer, labels, permutation, fiedler, quality(full, trials, labels),
                         quality(full, trials, random_balanced(labels, seed)))


def cluster_permutation(labels: np.ndarray, fiedler: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(renumbered labels, permutation): clusters by their mean Fiedler value, members by their own."""
    ids = np.unique(labels)
    means = np.array([fiedler[labels == c].mean() for c in ids])
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.lexsort((ids, means))] = np.arange(len(ids))
    new = rank[np.searchsorted(ids, labels)]
    return new, np.lexsort((np.arange(len(new)), fiedler, new))


def write_clusters(path: str, results: list[LayerClusters], attrs: dict) -> None:
    """clusters.h5: root attributes, then layers/<L>/{labels, permutation, fiedler} with quality attributes."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update({"format": "mpicorr-clusters-1", "mpicorr_version": __version__, **attrs})
        for r in results:
            g = h5.create_group(f"layers/{r.layer}")
            g.create_dataset("labels", data=r.labels.astype(np.int32))
            g.create_dataset("permutation", data=r.permutation.astype(np.int64))
            g.create_dataset("fiedler", data=r.fiedler.astype(np.float64))
            for name, q in (("", r.quality), ("random_", r.random)):
                g.attrs.update({f"{name}inside_share": q.inside_share, f"{name}touched_low": q.touched_low,
                                f"{name}touched_high": q.touched_high})


def read_clusters(path: str) -> tuple[dict, dict[int, LayerClusters]]:
    """(root attributes, {layer: LayerClusters}) of a clusters.h5."""
    def build(layer: int, g) -> LayerClusters:
        q = [Quality(*(float(g.attrs[f"{pre}{k}"]) for k in ("inside_share", "touched_low", "touched_high")))
             for pre in ("", "random_")]
        return LayerClusters(layer, g["labels"][()], g["permutation"][()], g["fiedler"][()], *q)

    return read_layer_groups(path, "mpicorr-clusters-1", "analysis/clusters.py", build)


def clusters_for(path: str, widths: dict[int, int]) -> dict[int, LayerClusters]:
    """The clusters of the layers {layer: width} from the clusters.h5 at `path`, which must hold every one of
    them at that width: a file of other layers, or of another run or expert, would reorder the wrong neurons
    (found before anything is written)."""
    _, found = read_clusters(path)
    for layer, width in widths.items():
        if layer not in found:
            have = ", ".join(map(str, sorted(found))) or "none"
            raise UserError(f"{path}: has no layer {layer} (it holds layers {have}); run analysis/clusters.py "
                            f"on the layers you want")
        if len(found[layer].labels) != width:
            raise UserError(f"{path}: layer {layer} has {len(found[layer].labels)} neurons, the run's "
                            f"{width}: the file belongs to another run (or --expert); run analysis/clusters.py "
                            f"on this one")
    return {layer: found[layer] for layer in widths}


def spectral_order(full: np.ndarray, seed: int = 0) -> np.ndarray:
    """The Fiedler ordering of one layer's neurons."""
    _, vecs = spectral(affinity(full), 2, seed)
    return fiedler_order(vecs)
