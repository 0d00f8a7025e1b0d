"""Heatmaps of co-firing matrices, one PNG per layer plus a contact sheet of all layers.

    python analysis/heatmap.py RUN_DIR [--layers 0-3] [--measure lift] [--order frequency|spectral|cluster]
    python analysis/heatmap.py RUN_DIR --all --pixels 256        # every layer and heatmaps_<measure>.png

Writes heatmap_<measure>_<L>.png (to RUN_DIR unless --out). Large layers are reduced by averaging square
blocks, so a 14336-wide layer gives at most --pixels (<= 4096) per side. Measures: freq = C[i,j]/T,
cond = P(j | i), lift = P(i,j) / (P(i) P(j)) (1 = independent), phi, jaccard, count = C[i,j] (see README).
Orders: by firing frequency; by the Fiedler vector (co-firing neurons side by side); or by the clusters
of analysis/clusters.py (reads RUN_DIR/clusters.h5 or --clusters FILE).
"""

from __future__ import annotations

import os
import sys

from mpicorr import analysis, clusters, figures
from mpicorr.errors import UserError

MEASURES = ("lift", "cond", "freq", "count", "phi", "jaccard")
ORDER_NAMES = {"frequency": "by firing frequency, most frequent first", "spectral": "in Fiedler order",
               "cluster": "in cluster order"}


def order_for(lm: analysis.LayerMatrix, kind: str, cluster_perm: dict):
    """The neuron order of one layer."""
    if kind == "frequency":
        return analysis.frequency_order(lm.packed, lm.width)
    if kind == "spectral":
        return clusters.spectral_order(clusters.dense(lm.packed, lm.width))
    return cluster_perm[lm.layer].permutation


def main() -> int:
    p = analysis.script_parser(__doc__, "images", layers="the first layer; --all: every layer")
    p.add_argument("--all", action="store_true", help="draw every layer (or those of --layers) and a contact sheet "
                                                      "heatmaps_<measure>.png of them")
    p.add_argument("--measure", default="lift", choices=MEASURES, help="what to draw (default: %(default)s)")
    p.add_argument("--order", default="frequency", choices=tuple(ORDER_NAMES), help="how neurons are ordered"
                                                                                    " (default: %(default)s)")
    p.add_argument("--clusters", help="clusters.h5 for --order cluster (default: RUN_DIR/clusters.h5; with "
                                      "--expert E, RUN_DIR/clusters_expert_E.h5)")
    p.add_argument("--pixels", type=int, default=1024, help="image side in matrix cells, at most 4096"
                                                            " (default: %(default)s)")
    args = p.parse_args()
    out = args.out or args.run_dir

    def body() -> None:
        analysis.output_folder(args.out)
        if args.pixels < 1:
            raise UserError(f"--pixels {args.pixels}: must be at least 1")
        paths = analysis.matrix_paths(args.run_dir, args.expert)
        # --layers picks the layers (also for --all's contact sheet); else --all every layer, else the first.
        paths = analysis.select(paths, args.layers or (None if args.all else str(next(iter(paths)))))
        perms = {}
        if args.order == "cluster":
            default = os.path.join(args.run_dir, analysis.output_name(clusters.CLUSTERS, args.expert))
            perms = clusters.clusters_for(args.clusters or default, analysis.widths(paths))
        os.makedirs(out, exist_ok=True)
        label = analysis.run_label(args.run_dir, args.expert)
        name = lambda n: analysis.output_name(n, args.expert)  # noqa: E731
        images, widths = {}, {}
        for lm in analysis.read_layers(paths, "drawing"):
            order = order_for(lm, args.order, perms)
            images[lm.layer] = analysis.heatmap(lm.packed, lm.width, lm.trials, order,
                                                min(args.pixels, 4096), args.measure)
            widths[lm.layer] = lm.width
            print(figures.heatmap(images[lm.layer], lm.width, lm.layer, args.measure, ORDER_NAMES[args.order],
                                  os.path.join(out, name(f"heatmap_{args.measure}_{lm.layer}.png")), label))
        if args.all:
            print(figures.contact_sheet(images, widths, args.measure,
                                        os.path.join(out, name(f"heatmaps_{args.measure}.png")), ORDER_NAMES[args.order],
                                        label))

    return analysis.run_script("heatmap.py", body)


if __name__ == "__main__":
    sys.exit(main())
