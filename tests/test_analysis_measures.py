"""Co-firing measures, top pairs, distributions and bundles against brute force on small matrices."""

import itertools
import math

import numpy as np
import pytest

from mpicorr import bundles, layout, measures, triangle


def random_counts(width=23, tokens=300, seed=0):
    """(packed, full, tokens) from random firing with a few always-together and always-on neurons."""
    rng = np.random.default_rng(seed)
    fired = rng.random((tokens, width)) < rng.uniform(0.01, 0.6, width)
    fired[:, 3] = fired[:, 7]
    fired[:, 11] = True
    fired[:, 12] = False
    full = fired.T.astype(np.int64) @ fired
    return full[np.tril_indices(width)].astype(np.uint32), full, tokens


def test_measures_hand_values():
    # c = 2, ci = 4, cj = 5, T = 10: independent pair.
    got = {k: float(measures.pair_measure(2, 4, 5, 10, k)) for k in measures.MEASURES}
    assert got == pytest.approx({"count": 2, "freq": 0.2, "cond": 0.5, "lift": 1.0, "pmi": 0.0, "phi": 0.0,
                                 "jaccard": 2 / 7})
    # c = 4: i never fires without j.
    got = {k: float(measures.pair_measure(4, 4, 5, 10, k)) for k in measures.MEASURES}
    assert got == pytest.approx({"count": 4, "freq": 0.4, "cond": 1.0, "lift": 2.0, "pmi": 1.0,
                                 "phi": 20 / math.sqrt(600), "jaccard": 0.8})
    # Undefined: a neuron that never fires (cond, lift), one that always fires (phi).
    assert np.isnan(measures.pair_measure(0, 0, 5, 10, "cond"))
    assert np.isnan(measures.pair_measure(0, 0, 5, 10, "lift"))
    assert np.isnan(measures.pair_measure(5, 10, 5, 10, "phi"))


def brute_pairs(full, tokens, kind, min_support):
    """Every pair i > j with its rank value, sorted as top_pairs promises."""
    out = []
    for i, j in itertools.combinations(range(len(full)), 2):
        i, j = j, i  # i > j
        c, ci, cj = full[i, j], full[i, i], full[j, j]
        if c < min_support:
            continue
        v = measures.pair_measure(c, ci, cj, tokens, kind)
        if kind == "cond":
            v = max(c / ci, c / cj)
        if not np.isnan(v):
            out.append((-float(v), -int(c), i, j))
    return sorted(out)


@pytest.mark.parametrize("kind", measures.RANKABLE)
@pytest.mark.parametrize("min_support", [1, 20])
def test_top_pairs_match_brute_force(kind, min_support, monkeypatch):
    monkeypatch.setattr(measures, "BLOCK_ELEMENTS", 40)  # many row blocks
    packed, full, tokens = random_counts()
    got = measures.top_pairs(packed, len(full), tokens, kind, 15, min_support)
    want = brute_pairs(full, tokens, kind, min_support)[:15]
    assert list(zip(got.i.tolist(), got.j.tolist())) == [(i, j) for _, _, i, j in want]
    assert got.value == pytest.approx([-v for v, _, _, _ in want])


def test_histograms_count_every_supported_pair(monkeypatch):
    monkeypatch.setattr(measures, "BLOCK_ELEMENTS", 50)
    packed, full, tokens = random_counts()
    hist = measures.histograms(packed, len(full), tokens, min_support=5)
    i, j = np.tril_indices(len(full), -1)
    keep = full[i, j] >= 5
    c, ci, cj = full[i, j][keep], full[i, i][keep], full[j, j][keep]
    for kind, edges in measures.BINS.items():
        v = measures.pair_measure(c, ci, cj, tokens, kind)
        if kind == "cond":
            v = np.concatenate([v, measures.pair_measure(c, cj, ci, tokens, kind)])
        v = np.clip(v[~np.isnan(v)], edges[0], edges[-1])
        assert hist[kind].tolist() == np.histogram(v, bins=edges)[0].tolist(), kind
    assert hist["jaccard"].sum() == keep.sum()


@pytest.mark.parametrize("q,support", [(0.8, 1), (0.5, 10), (1.0, 1)])
def test_bundles_match_brute_force(q, support, tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "ROW_BLOCK_ELEMENTS", 50)
    packed, full, tokens = random_counts()
    b = bundles.layer_bundles(4, packed, len(full), q, support)
    for i in range(len(full)):
        want = [j for j in range(len(full)) if j != i and full[i, i] > 0 and full[i, j] >= max(support, 1)
                and full[i, j] / full[i, i] >= q]
        assert b.bundle(i).tolist() == want
    assert 7 in b.bundle(3).tolist() and 11 in b.bundle(0).tolist()  # planted: always together, always on
    path = str(tmp_path / bundles.BUNDLES)
    bundles.write_bundles(path, [b], {"q": q})
    attrs, back = bundles.read_bundles(path)
    assert attrs["q"] == q and back[4].indptr.tolist() == b.indptr.tolist()
    assert back[4].indices.tolist() == b.indices.tolist()


def test_lower_blocks_cover_the_triangle_once(monkeypatch):
    monkeypatch.setattr(measures, "BLOCK_ELEMENTS", 30)
    packed, full, _ = random_counts(width=17)
    seen = np.zeros_like(full)
    for r0, r1, block, below in measures.lower_blocks(packed, 17):
        assert (block == full[r0:r1, :r1]).all()
        seen[r0:r1, :r1] += below
    assert (seen == np.tril(np.ones_like(full), -1)).all()
    assert triangle.diagonal(packed, 17).tolist() == np.diag(full).tolist()
