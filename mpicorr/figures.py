"""The analysis figures (matplotlib, Agg backend): each function draws one PNG from computed numbers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import analysis, measures  # noqa: E402

DPI = 110


def _save(fig, path: str, dpi: int = DPI) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _colours(n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def rank_frequency(layers, path: str) -> str:
    """Log-log rank-frequency curves, one per layer, coloured by depth."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for colour, lf in zip(_colours(len(layers)), layers):
        counts = np.sort(lf.fire_count[lf.fire_count > 0])[::-1]
        alpha = analysis.powerlaw_exponent(lf.fire_count)
        ax.loglog(np.arange(1, len(counts) + 1), counts, color=colour,
                  label=f"layer {lf.layer} (α={alpha:.2f})" if len(layers) <= 8 else None)
    ax.set(xlabel="neuron rank (most frequent first)", ylabel="firing count", title="Rank-frequency of neuron firing")
    if len(layers) <= 8:
        ax.legend(fontsize=8)
    return _save(fig, path)


def coverage(layers, path: str) -> str:
    """Share of all firings made by the most frequent x % of neurons."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for colour, lf in zip(_colours(len(layers)), layers):
        x, y = analysis.coverage_curve(lf.fire_count)
        ax.plot(100 * x, 100 * y, lw=1, color=colour, label=f"layer {lf.layer}" if len(layers) <= 8 else None)
    ax.plot([0, 100], [0, 100], "k:", lw=1, label="uniform")
    ax.axvline(20, color="grey", lw=0.5)
    ax.set(xlabel="most frequent neurons (%)", ylabel="share of all firings (%)", title="Firing coverage")
    ax.legend(fontsize=8)
    return _save(fig, path)


def depth(rows: list[dict], path: str) -> str:
    """Density, power-law exponent and top-20 % coverage against layer."""
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    layers = [r["layer"] for r in rows]
    for ax, key, label in zip(axes, ("density", "alpha", "coverage20"),
                              ("density (share firing per token)", "power-law exponent α", "coverage of top 20 %")):
        ax.plot(layers, [r[key] for r in rows], "o-")
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xlabel("layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Firing across depth")
    return _save(fig, path)


def _show(ax, image: np.ndarray, kind: str, width: int):
    """Draw a heatmap image; lift on a log scale symmetric around 1 (white = independent); NaN stays blank."""
    extent = (0, width, width, 0)
    if kind == "lift":
        positive = image[image > 0]
        span = max(positive.max(), 1 / max(positive.min(), 1e-3), 1.01) if positive.size else 10.0
        shown = np.where(np.isnan(image), np.nan, np.where(image > 0, image, 1 / span))
        return ax.imshow(shown, norm=LogNorm(vmin=1 / span, vmax=span),
                         cmap="RdBu_r", extent=extent, interpolation="nearest")
    if kind == "phi":
        span = max(float(np.nan_to_num(np.abs(image)).max()), 1e-6)
        return ax.imshow(image, cmap="RdBu_r", vmin=-span, vmax=span, extent=extent, interpolation="nearest")
    return ax.imshow(image, cmap="magma", extent=extent, interpolation="nearest")


def heatmap(image: np.ndarray, width: int, layer: int, kind: str, order_name: str, path: str) -> str:
    """One layer's heatmap with axis labels and a colour bar."""
    fig, ax = plt.subplots(figsize=(8, 7))
    fig.colorbar(_show(ax, image, kind, width), ax=ax, label=kind)
    ax.set(xlabel=f"neuron j ({order_name})", ylabel=f"neuron i ({order_name})", title=f"layer {layer}: {kind}")
    return _save(fig, path, dpi=100)


def contact_sheet(images: dict[int, np.ndarray], widths: dict[int, int], kind: str, path: str) -> str:
    """All layers' heatmaps in one grid, each with its own colour scale."""
    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (layer, image) in zip(axes.ravel(), images.items()):
        _show(ax, image, kind, widths[layer])
        ax.set_title(f"layer {layer}", fontsize=8)
    fig.suptitle(f"{kind}, all layers")
    return _save(fig, path, dpi=90)


def distributions(hists: dict[int, dict[str, np.ndarray]], min_support: int, path: str) -> str:
    """Distribution of each co-firing measure over pairs, one line per layer."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    labels = {"cond": "P(j | i)", "pmi": "PMI = log2 lift", "phi": "phi coefficient", "jaccard": "Jaccard"}
    colours = _colours(len(hists))
    for ax, kind in zip(axes.ravel(), measures.BINS):
        edges = measures.BINS[kind]
        centres = (edges[:-1] + edges[1:]) / 2
        for colour, (layer, h) in zip(colours, hists.items()):
            total = max(h[kind].sum(), 1)
            ax.plot(centres, h[kind] / total, color=colour, lw=1, label=f"layer {layer}" if len(hists) <= 8 else None)
        ax.set_yscale("log")
        ax.set(xlabel=labels[kind], ylabel="share of pairs")
    if len(hists) <= 8:
        axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"Co-firing measures over pairs that co-fire on >= {min_support} tokens")
    return _save(fig, path)


def cluster_quality(rows: list[dict], path: str) -> str:
    """Inside-cluster co-firing share and clusters touched per token, clusters vs random, across layers."""
    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    layers = [r["layer"] for r in rows]
    axes[0].plot(layers, [r["inside_share"] for r in rows], "o-", label="clusters")
    axes[0].plot(layers, [r["random_inside_share"] for r in rows], "s--", label="random, same sizes")
    axes[0].set_ylabel("co-firing mass inside")
    for key, style, label in (("", "o-", "clusters"), ("random_", "s--", "random, same sizes")):
        lo = np.array([r[f"{key}touched_low"] for r in rows])
        hi = np.array([r[f"{key}touched_high"] for r in rows])
        line, = axes[1].plot(layers, (lo + hi) / 2, style, label=label)
        axes[1].fill_between(layers, lo, hi, color=line.get_color(), alpha=0.2)
    axes[1].set(xlabel="layer", ylabel="clusters touched per token")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("Cluster quality (band: bounds from pairwise counts)")
    return _save(fig, path)


def bundle_sizes(sizes: dict[int, np.ndarray], q: float, path: str) -> str:
    """Distribution of bundle sizes per layer."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max((int(s.max()) for s in sizes.values() if len(s)), default=0)
    bins = np.arange(top + 2) - 0.5 if top < 64 else np.unique(np.geomspace(1, top + 1, 40).astype(int)) - 0.5
    for colour, (layer, s) in zip(_colours(len(sizes)), sizes.items()):
        ax.hist(s, bins=bins, histtype="step", color=colour, label=f"layer {layer}" if len(sizes) <= 8 else None)
    ax.set_yscale("log")
    ax.set(xlabel="bundle size (neurons j with P(j | i) >= q)", ylabel="neurons", title=f"Bundle sizes, q = {q}")
    if len(sizes) <= 8:
        ax.legend(fontsize=8)
    return _save(fig, path)


def routers(found, path: str) -> str:
    """Per MoE block, the lift of each expert pair's co-selection (log colour scale) and each expert's load."""
    cols = min(len(found), 4)
    rows = -(-len(found) // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.4 * cols + 1, 5.2 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] * rows}, layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")  # grey: the diagonal and unused experts
    for k, router in enumerate(found):
        top, bottom = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
        with np.errstate(divide="ignore"):
            image = top.imshow(np.log2(router.lift()), cmap=cmap, vmin=-2, vmax=2)
        top.set(title=f"block {router.layer}: log2 lift", xlabel="expert", ylabel="expert")
        for axis in (top.xaxis, top.yaxis, bottom.xaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        bottom.bar(np.arange(len(router.load)), router.load / max(router.tokens, 1), color="grey")
        bottom.set(xlabel="expert", ylabel="share of tokens")
    for k in range(len(found), rows * cols):
        axes[2 * (k // cols), k % cols].axis("off")
        axes[2 * (k // cols) + 1, k % cols].axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="log2 lift (0: chosen independently)")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
