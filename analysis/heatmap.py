"""Heatmap of one layer's co-firing matrix, neurons ordered by firing frequency.

    python analysis/heatmap.py RUN_DIR [--layer L] [--measure lift|cond|freq|count] [--pixels 1024]

Writes heatmap_<measure>_<L>.png (to RUN_DIR unless --out). Large layers are reduced by averaging square
blocks, so a 14336-wide layer gives at most --pixels (<= 4096) per side. Measures: freq = C[i,j]/T,
cond = P(j | i) = C[i,j]/C[i,i], lift = P(i,j) / (P(i) P(j)) (1 = independent), count = C[i,j].
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mpicorr import analysis, matrixfile, triangle  # noqa: E402
from mpicorr.errors import UserError  # noqa: E402


def draw(image: np.ndarray, width: int, layer: int, kind: str, path: str) -> None:
    """Save the image with axis labels and a colour bar; lift is shown on a log scale around 1."""
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(8, 7))
    extent = (0, width, width, 0)
    if kind == "lift":
        positive = image[image > 0]
        # Symmetric on a log scale, so that white is lift 1 (independent firing).
        span = max(positive.max(), 1 / max(positive.min(), 1e-3), 1.01) if positive.size else 10.0
        im = ax.imshow(np.where(image > 0, image, 1 / span), norm=LogNorm(vmin=1 / span, vmax=span),
                       cmap="RdBu_r", extent=extent, interpolation="nearest")
    else:
        im = ax.imshow(image, cmap="magma", extent=extent, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=kind)
    ax.set_xlabel("neuron j (by firing frequency, most frequent first)")
    ax.set_ylabel("neuron i (by firing frequency, most frequent first)")
    ax.set_title(f"layer {layer}: {kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder with correlations_block_<L>.zstd files")
    p.add_argument("--layer", type=int, default=None, help="layer to draw (default: the first)")
    p.add_argument("--measure", default="lift", choices=("lift", "cond", "freq", "count"), help="what to draw")
    p.add_argument("--pixels", type=int, default=1024, help="image side in matrix cells, at most 4096")
    p.add_argument("--out", help="folder for the image (default: RUN_DIR)")
    args = p.parse_args()
    try:
        paths = analysis.matrix_paths(args.run_dir)
        layer = next(iter(paths)) if args.layer is None else args.layer
        if layer not in paths:
            raise UserError(f"--layer {layer}: no such layer in {args.run_dir} (have {min(paths)}..{max(paths)})")
        header, packed = matrixfile.read_matrix(paths[layer])
    except UserError as exc:
        print(f"heatmap.py: error: {exc}", file=sys.stderr)
        return 2
    diag = triangle.diagonal(packed, header.width)
    order = np.argsort(-diag.astype(np.int64), kind="stable")
    image = analysis.heatmap(packed, header.width, header.trials, order, min(args.pixels, 4096), args.measure)
    out = args.out or args.run_dir
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"heatmap_{args.measure}_{layer}.png")
    draw(image, header.width, layer, args.measure, path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
