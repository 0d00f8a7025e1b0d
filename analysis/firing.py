"""Firing statistics of a run folder: rank-frequency power laws, coverage curves, trends across depth.

    python analysis/firing.py RUN_DIR [--out DIR]

Writes firing_rank_frequency.png, firing_coverage.png and firing_depth.png (to RUN_DIR unless --out) and
prints one line per layer. Reads only files: summary.h5 when present, else the matrix diagonals (so
folders of the original tool work too).
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mpicorr import analysis  # noqa: E402
from mpicorr.errors import UserError  # noqa: E402


def rank_frequency_figure(layers, path: str) -> None:
    """Log-log rank-frequency curves, one per layer, coloured by depth."""
    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = plt.get_cmap("viridis")
    for n, lf in enumerate(layers):
        counts = np.sort(lf.fire_count[lf.fire_count > 0])[::-1]
        alpha = analysis.powerlaw_exponent(lf.fire_count)
        ax.loglog(np.arange(1, len(counts) + 1), counts, color=cmap(n / max(len(layers) - 1, 1)),
                  label=f"layer {lf.layer} (α={alpha:.2f})" if len(layers) <= 8 else None)
    ax.set_xlabel("neuron rank (most frequent first)")
    ax.set_ylabel("firing count")
    ax.set_title("Rank-frequency of neuron firing")
    if len(layers) <= 8:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def coverage_figure(layers, path: str) -> None:
    """Share of all firings made by the most frequent x % of neurons."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for lf in layers:
        x, y = analysis.coverage_curve(lf.fire_count)
        ax.plot(100 * x, 100 * y, lw=1, label=f"layer {lf.layer}" if len(layers) <= 8 else None)
    ax.plot([0, 100], [0, 100], "k:", lw=1, label="uniform")
    ax.axvline(20, color="grey", lw=0.5)
    ax.set_xlabel("most frequent neurons (%)")
    ax.set_ylabel("share of all firings (%)")
    ax.set_title("Firing coverage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def depth_figure(rows: list[dict], path: str) -> None:
    """Density, power-law exponent and top-20 % coverage against layer."""
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    layers = [r["layer"] for r in rows]
    for ax, key, label in zip(axes, ("density", "alpha", "coverage20"),
                              ("density (share firing per token)", "power-law exponent α",
                               "coverage of top 20 %")):
        ax.plot(layers, [r[key] for r in rows], "o-")
        ax.set_ylabel(label, fontsize=8)
    axes[-1].set_xlabel("layer")
    fig.suptitle("Firing across depth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_rows(layers) -> list[dict]:
    """Per-layer numbers: density, exponent, coverage, dead and always-on neurons."""
    rows = []
    for lf in layers:
        width, trials = len(lf.fire_count), max(lf.trials, 1)
        x, y = analysis.coverage_curve(lf.fire_count)
        rows.append({"layer": lf.layer, "width": width, "density": lf.fire_count.sum() / trials / width,
                     "alpha": analysis.powerlaw_exponent(lf.fire_count),
                     "coverage20": float(y[max(0, int(np.ceil(0.2 * width)) - 1)]),
                     "dead": int((lf.fire_count == 0).sum()),
                     "always_on": int((lf.fire_count >= lf.trials).sum()) if lf.trials else 0})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder with correlations_block_<L>.zstd (and summary.h5)")
    p.add_argument("--out", help="folder for the figures (default: RUN_DIR)")
    args = p.parse_args()
    out = args.out or args.run_dir
    try:
        layers = analysis.firing(args.run_dir)
        os.makedirs(out, exist_ok=True)
    except (UserError, OSError) as exc:
        print(f"firing.py: error: {exc}", file=sys.stderr)
        return 2
    rows = layer_rows(layers)
    print("layer  width  density  alpha  top20%  dead  always_on")
    for r in rows:
        print(f"{r['layer']:5d}  {r['width']:5d}  {r['density']:7.4f}  {r['alpha']:5.2f}  {r['coverage20']:6.3f}"
              f"  {r['dead']:4d}  {r['always_on']:9d}")
    rank_frequency_figure(layers, os.path.join(out, "firing_rank_frequency.png"))
    coverage_figure(layers, os.path.join(out, "firing_coverage.png"))
    depth_figure(rows, os.path.join(out, "firing_depth.png"))
    print(f"figures in {out}: firing_rank_frequency.png, firing_coverage.png, firing_depth.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
