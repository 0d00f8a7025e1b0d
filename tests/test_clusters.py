"""Clusters, Fiedler ordering, quality bounds and exporters on counts with planted groups."""

import itertools
import json
import os

import numpy as np
import pytest
import torch

from mpicorr import clusters, exporters


def planted(width=60, groups=4, size=10, tokens=3000, seed=0):
    """(full counts, groups as lists of shuffled indices): groups that always fire together, plus noise."""
    rng = np.random.default_rng(seed)
    fired = rng.random((tokens, width)) < 0.05
    for g in range(groups):
        fired[:, g * size : (g + 1) * size] = (rng.random(tokens) < 0.2)[:, None]
    perm = rng.permutation(width)
    fired = fired[:, perm]
    where = np.argsort(perm)  # where[original neuron] = its shuffled index
    return fired, fired.T.astype(np.int64) @ fired, [where[g * size : (g + 1) * size] for g in range(groups)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_clusters_recover_planted_groups(seed):
    _, full, groups = planted(seed=seed)
    r = clusters.cluster_layer(3, full.astype(np.float32), 3000, 6, balanced=True, seed=seed)
    assert np.bincount(r.labels).tolist() == [10] * 6
    assert all(len(set(r.labels[g])) == 1 for g in groups)
    assert len({int(r.labels[g[0]]) for g in groups}) == 4
    assert r.quality.inside_share > 2 * r.random.inside_share
    assert r.quality.touched_high < r.random.touched_low


def test_unbalanced_clusters_on_the_iterative_solver_path():
    """Wider than DENSE_SOLVER_WIDTH, so the eigenvectors come from ARPACK; K = 5 groups + the noise."""
    _, full, groups = planted(width=clusters.DENSE_SOLVER_WIDTH + 88, groups=5, size=25, tokens=4000)
    r = clusters.cluster_layer(0, full.astype(np.float32), 4000, 6, balanced=False)
    assert all(len(set(r.labels[g])) == 1 for g in groups)
    assert len({int(r.labels[g[0]]) for g in groups}) == 5
    assert sorted(np.bincount(r.labels).tolist()) == [25] * 5 + [600 - 125]


def test_fiedler_order_keeps_groups_contiguous():
    _, full, groups = planted(seed=4)
    order = clusters.spectral_order(full.astype(np.float32))
    position = np.argsort(order)
    assert sorted(order.tolist()) == list(range(60))
    for g in groups:
        assert position[g].max() - position[g].min() == len(g) - 1


def test_permutation_makes_clusters_contiguous():
    _, full, _ = planted(seed=5)
    r = clusters.cluster_layer(0, full.astype(np.float32), 3000, 6, balanced=True)
    assert sorted(r.permutation.tolist()) == list(range(60))
    assert (np.diff(r.labels[r.permutation]) >= 0).all()  # cluster 0 first, then 1, ...


def test_quality_hand_values():
    full = np.array([[4, 3, 1], [3, 5, 0], [1, 0, 2]], dtype=np.float32)
    q = clusters.quality(full, 10, np.array([0, 0, 1]))
    assert q.inside_share == pytest.approx(3 / 4)
    # Cluster {0, 1}: p = .4, .5, p01 = .3 -> de Caen .16/.7 + .25/.8 = .541, Hunter .9 - .3 = .6; {2}: .2.
    assert q.touched_low == pytest.approx(0.16 / 0.7 + 0.25 / 0.8 + 0.2)
    assert q.touched_high == pytest.approx(0.6 + 0.2)


def test_touched_bounds_enclose_the_truth_and_are_exact_for_planted_groups():
    fired, full, groups = planted(seed=6)
    labels = np.full(60, 4)
    for n, g in enumerate(groups):
        labels[g] = n
    q = clusters.quality(full.astype(np.float32), 3000, labels)
    truth = sum(fired[:, labels == c].any(axis=1).mean() for c in range(5))
    assert q.touched_low <= truth + 1e-9 <= q.touched_high + 2e-9
    exact = [fired[:, g[0]].mean() for g in groups]
    for g, p in zip(groups, exact):
        lo, hi = clusters.union_bounds(full[np.ix_(g, g)] / 3000)
        assert lo == pytest.approx(p) and hi == pytest.approx(p)


def test_max_spanning_tree_against_brute_force():
    rng = np.random.default_rng(0)
    w = rng.random((6, 6))
    w = w + w.T
    best = 0.0
    for edges in itertools.combinations(list(itertools.combinations(range(6), 2)), 5):
        parent = list(range(6))

        def root(a):
            while parent[a] != a:
                a = parent[a]
            return a
        ok = True
        for a, b in edges:
            ra, rb = root(a), root(b)
            ok &= ra != rb
            parent[ra] = rb
        if ok:
            best = max(best, sum(w[a, b] for a, b in edges))
    assert clusters.max_spanning_tree(w) == pytest.approx(best)


def test_clusters_file_round_trip(tmp_path):
    _, full, _ = planted(seed=7)
    r = clusters.cluster_layer(2, full.astype(np.float32), 3000, 3, balanced=False)
    path = str(tmp_path / clusters.CLUSTERS)
    clusters.write_clusters(path, [r], {"clusters": 3})
    attrs, back = clusters.read_clusters(path)
    assert attrs["clusters"] == 3 and list(back) == [2]
    assert back[2].labels.tolist() == r.labels.tolist() and back[2].permutation.tolist() == r.permutation.tolist()
    assert back[2].quality == pytest.approx(r.quality) and back[2].random == pytest.approx(r.random)


def test_powerinfer_files_in_numeric_order(tmp_path):
    counts = {l: np.arange(5) * (l + 1) for l in (10, 2, 0, 1)}
    paths = exporters.write_powerinfer(str(tmp_path), counts)
    assert [os.path.basename(p) for p in paths] == ["activation_0.pt", "activation_1.pt", "activation_2.pt",
                                                    "activation_10.pt"]
    for l, c in counts.items():
        t = torch.load(str(tmp_path / f"activation_{l}.pt"))
        assert t.dtype == torch.int64 and t.tolist() == c.tolist()


def read_metis(path):
    """{(u, v): weight} with 0-based vertices, checking the header."""
    lines = open(path).read().splitlines()
    n, m, fmt = lines[0].split()
    assert fmt == "001" and len(lines) == int(n) + 1
    edges = {}
    for v, line in enumerate(lines[1:]):
        nums = list(map(int, line.split()))
        for u, w in zip(nums[0::2], nums[1::2]):
            edges[(v, u - 1)] = w
    assert len(edges) == 2 * int(m)
    return edges


@pytest.mark.parametrize("support,lift", [(1, 0.0), (30, 0.0), (1, 1.5)])
def test_metis_graph(tmp_path, support, lift):
    _, full, _ = planted(seed=8)
    packed = full[np.tril_indices(60)].astype(np.uint32)
    path = str(tmp_path / "g.graph")
    exporters.write_metis(path, packed, 60, 3000, support, lift)
    edges = read_metis(path)
    d = np.diag(full)
    want = {(i, j): int(full[i, j]) for i in range(60) for j in range(60)
            if i != j and full[i, j] >= support and full[i, j] * 3000 >= lift * d[i] * d[j]}
    assert edges == want


def test_permutation_json_reorders_an_ffn(tmp_path):
    _, full, _ = planted(seed=9)
    r = clusters.cluster_layer(0, full.astype(np.float32), 3000, 6, balanced=True)
    path = str(tmp_path / "perm.json")
    exporters.write_permutation(path, {0: r.permutation}, {0: r.labels})
    doc = json.load(open(path))
    perm = np.array(doc["layers"]["0"]["permutation"])
    assert doc["layers"]["0"]["cluster_sizes"] == [10] * 6
    # Reordering up and down projections leaves the FFN output unchanged.
    rng = np.random.default_rng(0)
    up, down, x = rng.normal(size=(60, 8)), rng.normal(size=(8, 60)), rng.normal(size=8)
    assert np.allclose(down @ np.maximum(up @ x, 0), down[:, perm] @ np.maximum(up[perm] @ x, 0))
