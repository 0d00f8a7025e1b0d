"""The analysis figures (matplotlib, Agg backend): each function draws one PNG from computed numbers."""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, MaxNLocator, NullLocator  # noqa: E402

from . import analysis, measures  # noqa: E402

DPI = 110
PLAIN = FuncFormatter(lambda value, _: f"{value:g}")  # log axes of counts: 1, 10, 100 rather than 10⁰, 10¹, 10²


class _PlainLogMinor(LogFormatterSciNotation):
    """Matplotlib's choice of which minor log ticks to label (all within a decade, a few within two), written
    as plain numbers (4000, not 4×10³) like PLAIN's major ticks."""

    def _non_decade_format(self, sign_string, base, fx, usetex):
        return f"{sign_string}{float(base) ** fx:.4g}"
# Heatmap cells whose measure is undefined: a grey that no colour map here uses (RdBu's middle is near-white).
UNDEFINED = "#9a9a9a"
# Why a measure can be undefined at a cell (the legend of heatmaps that have such cells).
UNDEFINED_WHY = {"phi": "a neuron that never or always fires", "freq": None, "count": None}
# Lift's colour scale ends at this percentile of max(lift, 1/lift): the lift of rare pairs explodes (two
# neurons that each fire twice, once together, have lift T/4) and would wash out everything else.
LIFT_PERCENTILE = 99.5


def titled(title: str, label: str) -> str:
    """A title with the run's label (analysis.run_label: the firing rule, the expert) in parentheses."""
    return f"{title} ({label})" if label else title


def _save(fig, path: str, dpi: int = DPI) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _nothing(title: str, why: str, path: str) -> str:
    """A figure that says why there is nothing to draw, instead of empty axes."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=12, transform=ax.transAxes)
    ax.set_axis_off()
    ax.set_title(title)
    return _save(fig, path)


def _colours(n: int):
    """n colours by depth; viridis without its pale yellow end, which vanishes on white."""
    cmap = plt.get_cmap("viridis")
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def rank_frequency(layers, path: str, label: str = "") -> str:
    """Log-log rank-frequency curves, one per layer, coloured by depth."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for colour, lf in zip(_colours(len(layers)), layers):
        counts = np.sort(lf.fire_count[lf.fire_count > 0])[::-1]
        alpha = analysis.powerlaw_exponent(lf.fire_count)
        ax.loglog(np.arange(1, len(counts) + 1), counts, color=colour,
                  label=f"layer {lf.layer} (α={alpha:.2f})" if len(layers) <= 8 else None)
    ax.set(xlabel="neuron rank (most frequent first)", ylabel="firing count", title=titled("Rank-frequency of neuron firing", label))
    for axis in (ax.xaxis, ax.yaxis):  # minor ticks too: a range within one decade labels only some of those
        axis.set_major_formatter(PLAIN)
        axis.set_minor_formatter(_PlainLogMinor(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    if len(layers) <= 8:
        ax.legend(fontsize=8)
    return _save(fig, path)


def coverage(layers, path: str, label: str = "") -> str:
    """Share of all firings made by the most frequent x % of neurons."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for colour, lf in zip(_colours(len(layers)), layers):
        x, y = analysis.coverage_curve(lf.fire_count)
        ax.plot(100 * x, 100 * y, lw=1, color=colour, label=f"layer {lf.layer}" if len(layers) <= 8 else None)
    ax.plot([0, 100], [0, 100], "k:", lw=1, label="uniform")
    ax.axvline(20, color="grey", lw=0.5, label="top 20 %")
    ax.set(xlabel="most frequent neurons (%)", ylabel="share of all firings (%)", title=titled("Firing coverage", label))
    ax.legend(fontsize=8)
    return _save(fig, path)


def depth(rows: list[dict], path: str, label: str = "") -> str:
    """Density, power-law exponent and top-20 % coverage against layer, each axis from 0 (a small change must
    not look like a cliff)."""
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    layers = [r["layer"] for r in rows]
    density = [100 * r["density"] for r in rows]
    alpha = [r["alpha"] for r in rows]
    top20 = [100 * r["coverage20"] for r in rows]
    axes[0].plot(layers, density, "o-")
    axes[0].set(ylabel="density (% firing per token)", ylim=(0, 1.15 * max(max(density), 1e-9)))
    axes[1].plot(layers, alpha, "o-")
    axes[1].set(ylabel="power-law exponent α", ylim=(0, max(1.0, 1.15 * max(alpha))))
    axes[2].plot(layers, top20, "o-")
    axes[2].axhline(20, color="grey", ls=":", lw=1, label="uniform firing")
    axes[2].set(ylabel="firings by the top 20 % (%)", ylim=(0, 100))
    axes[2].legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.yaxis.label.set_size(8)
    axes[-1].set_xlabel("layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(titled("Firing across depth", label))
    return _save(fig, path)


def colour_scale(images: list[np.ndarray], kind: str) -> tuple[Normalize, object, str]:
    """(norm, colour map, colour-bar extension) shared by heatmaps of one measure. Lift: a log scale symmetric
    around 1 (white: independent) up to the LIFT_PERCENTILE-th percentile of max(lift, 1/lift), the end
    colours beyond; phi: symmetric around 0; the others from 0 (cond and jaccard to 1). Undefined cells grey."""
    values = np.concatenate([im[np.isfinite(im)].ravel() for im in images] or [np.zeros(0)])
    if kind == "lift":
        positive = values[values > 0]
        ratio = np.maximum(positive, 1 / positive)
        span = max(float(np.percentile(ratio, LIFT_PERCENTILE)) if ratio.size else 2.0, 1.05)
        extend = "both" if ratio.size and ratio.max() > span else "neither"
        norm, cmap = LogNorm(vmin=1 / span, vmax=span), plt.get_cmap("RdBu_r")
    elif kind == "phi":
        span = max(float(np.abs(values).max()) if values.size else 0.0, 1e-6)
        norm, cmap, extend = Normalize(-span, span), plt.get_cmap("RdBu_r"), "neither"
    else:
        top = 1.0 if kind in ("cond", "jaccard") else max(float(values.max()) if values.size else 0.0, 1e-12)
        norm, cmap, extend = Normalize(0, top), plt.get_cmap("magma"), "neither"
    return norm, cmap.with_extremes(bad=UNDEFINED), extend


def _floor(image: np.ndarray, norm: Normalize) -> np.ndarray:
    """On a log scale, lift 0 (never together) takes the lowest colour rather than none (NaN stays NaN)."""
    return np.maximum(image, norm.vmin) if isinstance(norm, LogNorm) else image


def _show(ax, image: np.ndarray, width: int, norm: Normalize, cmap):
    """Draw a heatmap image over neuron indices 0..width."""
    return ax.imshow(_floor(image, norm), norm=norm, cmap=cmap, extent=(0, width, width, 0), interpolation="nearest")


def _colour_bar(fig, mappable, axes, kind: str, extend: str):
    """The colour bar of heatmaps; lift's ticks at powers of 2 written as 1/4, 1/2, 1, 2, 4 (not 4×10⁰)."""
    label = {"lift": "lift (log scale; 1: independent)", "cond": "P(j | i)", "freq": "P(i and j)",
             "count": "tokens on which both fire", "phi": "phi", "jaccard": "Jaccard"}[kind]
    bar = fig.colorbar(mappable, ax=axes, label=label, extend=extend, shrink=0.9)
    if kind == "lift":
        top = float(np.log2(mappable.norm.vmax))
        powers = np.arange(-int(top), int(top) + 1)
        powers = powers[powers % max(1, -(-len(powers) // 9)) == 0]  # at most about 9 ticks, 1 among them
        ticks = [float(2.0 ** e) for e in powers] if top >= 1 else [mappable.norm.vmin, 1.0, mappable.norm.vmax]
        bar.set_ticks(ticks, labels=[_lift_label(t) for t in ticks])
        bar.ax.yaxis.set_minor_locator(NullLocator())
    return bar


def _lift_label(value: float) -> str:
    if value >= 1:
        return f"{value:.3g}"
    inverse = 1 / value
    return f"1/{inverse:.0f}" if abs(inverse - round(inverse)) < 1e-9 else f"{value:.2f}"


def _undefined_legend(fig, images: list[np.ndarray], kind: str) -> None:
    """Name the grey of undefined cells, when some are drawn."""
    if not any(np.isnan(im).any() for im in images):
        return
    why = UNDEFINED_WHY.get(kind, "a neuron that never fires")
    text = f"no value: {why}, or a neuron with itself" if why else "no value: a neuron with itself"
    fig.legend(handles=[Patch(facecolor=UNDEFINED, label=text)], loc="outside lower center", frameon=False,
               fontsize=9)


def _axes_pixels(fig, axes) -> float:
    """The fewest pixels a side of these (square) image axes has at dpi 100, after the layout."""
    fig.canvas.draw()
    return min(min(ax.get_window_extent().width, ax.get_window_extent().height) for ax in axes) * 100 / fig.dpi


def heatmap(image: np.ndarray, width: int, layer: int, kind: str, order_name: str, path: str, label: str = "") -> str:
    """One layer's heatmap with axis labels, a colour bar and, where cells have no value, a legend for them.
    The PNG has at least one pixel per image cell (a larger dpi for a --pixels above the axes' 590 or so):
    fewer would drop whole rows and columns of cells when drawn."""
    fig, ax = plt.subplots(figsize=(8, 7), layout="constrained")
    norm, cmap, extend = colour_scale([image], kind)
    _colour_bar(fig, _show(ax, image, width, norm, cmap), ax, kind, extend)
    ax.set(xlabel=f"neuron j ({order_name})", ylabel=f"neuron i ({order_name})", title=titled(f"layer {layer}: {kind}", label))
    _undefined_legend(fig, [image], kind)
    fig.savefig(path, dpi=100 * max(1.0, 1.02 * image.shape[0] / _axes_pixels(fig, [ax])))
    plt.close(fig)
    return path


def contact_sheet(images: dict[int, np.ndarray], widths: dict[int, int], kind: str, path: str,
                  order_name: str | None = None, label: str = "") -> str:
    """All layers' heatmaps in one grid on one colour scale, with neuron axes and one colour bar."""
    n = len(images)
    cols = min(4, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols + 1.3, 3.2 * rows + 0.9), squeeze=False,
                             layout="constrained")
    norm, cmap, extend = colour_scale(list(images.values()), kind)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for k, (ax, (layer, image)) in enumerate(zip(axes.ravel(), images.items())):
        shown = _show(ax, image, widths[layer], norm, cmap)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.tick_params(labelsize=7)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(4, integer=True))
        if k % cols == 0:
            ax.set_ylabel("neuron i", fontsize=8)
        if k + cols >= n:
            ax.set_xlabel("neuron j", fontsize=8)
    _colour_bar(fig, shown, axes.ravel()[:n].tolist(), kind, extend)
    # wrapped to the figure's width: one column of panels is narrower than the order's name and the label
    fig.suptitle(textwrap.fill(titled(f"{kind}, all layers", ", ".join(filter(None, (order_name, label)))),
                               int(10 * fig.get_figwidth())))
    _undefined_legend(fig, list(images.values()), kind)
    # Each panel shows its layer averaged down to the panel's pixels: more cells than pixels would be
    # drawn by dropping whole rows and columns of them.
    panel = int(_axes_pixels(fig, axes.ravel()[:n]))
    for ax, image in zip(axes.ravel(), images.values()):
        if image.shape[0] > panel:
            ax.images[0].set_data(_floor(analysis.shrink(image, panel), norm))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def distributions(hists: dict[int, dict[str, np.ndarray]], min_support: int, path: str, label: str = "") -> str:
    """Distribution of each co-firing measure over pairs, one line per layer."""
    title = titled(f"Co-firing measures over pairs that co-fire on >= {min_support} tokens", label)
    if not any(h[kind].sum() for h in hists.values() for kind in measures.BINS):
        return _nothing(title, f"no pair of neurons co-fires on {min_support} tokens or more in these layers:\n"
                               f"count more tokens, or lower --min-support", path)
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
    fig.suptitle(title)
    return _save(fig, path)


def cluster_quality(rows: list[dict], path: str, label: str = "") -> str:
    """Inside-cluster co-firing share and clusters touched per token, clusters vs random, across layers. The
    touched counts are bounds (from pairwise counts): drawn as intervals side by side, not as bands that hide
    each other, on an axis from 0 to K."""
    fig, axes = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    layers = np.array([r["layer"] for r in rows], dtype=float)
    k = max(int(r["clusters"]) for r in rows)
    styles = (("", "o-", "C0", f"{k} spectral clusters"), ("random_", "s--", "C1", "random partition, same sizes"))
    for key, style, colour, name in styles:
        axes[0].plot(layers, [100 * r[f"{key}inside_share"] for r in rows], style, color=colour, label=name)
    axes[0].set(ylabel="co-firing mass inside clusters (%)", ylim=(0, 100))
    axes[0].legend(fontsize=8)
    shift = 0.12 if len(rows) > 1 else 0.04
    for (key, _, colour, name), dx in zip(styles, (-shift, shift)):
        lo = np.array([r[f"{key}touched_low"] for r in rows])
        hi = np.array([r[f"{key}touched_high"] for r in rows])
        axes[1].vlines(layers + dx, lo, hi, color=colour, lw=6, alpha=0.75, label=name)
        axes[1].plot(np.repeat(layers + dx, 2), np.concatenate([lo, hi]).reshape(2, -1).T.ravel(), "_",
                     color=colour, ms=12)
    axes[1].axhline(k, color="grey", ls=":", lw=1)
    axes[1].set(xlabel="layer", ylabel="clusters touched per token", ylim=(0, k + 0.5))
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(titled(f"Cluster quality, K = {k}", label) + "\nbars: lower to upper bound from pairwise counts",
                 fontsize=11)
    return _save(fig, path)


def bundle_sizes(sizes: dict[int, np.ndarray], q: float, path: str, min_support: int | None = None,
                 label: str = "") -> str:
    """Distribution of the sizes of non-empty bundles per layer (the legend gives the share of neurons with
    one); a run without any bundle says so instead of drawing empty axes."""
    title = titled(f"Bundle sizes, q = {q}", label)
    if not any((s > 0).any() for s in sizes.values()):
        support = f" with support ≥ {min_support}" if min_support else ""
        return _nothing(title, f"no bundles at q = {q}:\nno neuron i has a partner j with P(j | i) ≥ {q}{support}",
                        path)
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    top = max(int(s.max()) for s in sizes.values() if len(s))
    bins = np.arange(1, top + 2) - 0.5 if top < 64 else np.unique(np.geomspace(1, top + 1, 40).astype(int)) - 0.5
    for colour, (layer, s) in zip(_colours(len(sizes)), sizes.items()):
        share = float((s > 0).mean()) if len(s) else 0.0
        label = f"layer {layer}: {100 * share:.3g} % of neurons have one" if len(sizes) <= 8 else None
        ax.hist(s[s > 0], bins=bins, histtype="step", color=colour, label=label, lw=1.5)
    ax.set_yscale("log")
    ax.set(xlabel="bundle size (neurons j with P(j | i) >= q)", ylabel="neurons", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PLAIN)
    if len(sizes) <= 8:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def routers(found, path: str) -> str:
    """Per MoE block, the lift of each expert pair's co-selection (log colour scale, white at the lift of
    random top-k routing, which is below 1) and each expert's load (the dotted line: an even load, k / E)."""
    cols = min(len(found), 4)
    rows = -(-len(found) // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.4 * cols + 1, 5.2 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] * rows}, layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")  # grey: the diagonal and unused experts
    centre = float(np.log2(found[0].random_lift()))  # blocks of one model route alike (E, k)
    norm = TwoSlopeNorm(vcenter=centre, vmin=min(-2.0, centre - 1), vmax=max(2.0, centre + 1))
    for k, router in enumerate(found):
        top, bottom = axes[2 * (k // cols), k % cols], axes[2 * (k // cols) + 1, k % cols]
        with np.errstate(divide="ignore"):
            image = top.imshow(np.log2(router.lift()), cmap=cmap, norm=norm)
        top.set(title=f"block {router.layer}: log2 lift", xlabel="expert", ylabel="expert")
        for axis in (top.xaxis, top.yaxis, bottom.xaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        bottom.bar(np.arange(len(router.load)), router.load / max(router.tokens, 1), color="grey")
        if router.top_k:
            bottom.axhline(router.top_k / len(router.load), color="black", ls=":", lw=1)
        bottom.set(xlabel="expert", ylabel="share of tokens")
    for k in range(len(found), rows * cols):
        axes[2 * (k // cols), k % cols].axis("off")
        axes[2 * (k // cols) + 1, k % cols].axis("off")
    random = (f"white: {found[0].top_k} of {len(found[0].load)} experts chosen at random, lift "
              f"{found[0].random_lift():.2f}" if found[0].top_k else "white: lift 1")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label=f"log2 lift ({random})")
    if found[0].top_k:
        fig.suptitle("expert pairs chosen together (red) or apart (blue) more than random routing; "
                     "dotted: an even load", fontsize=10)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
