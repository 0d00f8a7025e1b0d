"""Neuron clusters per layer: K groups that fire together, a spectral ordering, quality against random.

    python analysis/clusters.py RUN_DIR [--clusters 8] [--balanced] [--seed 0] [--layers 0-3]

Writes clusters.h5 (per layer: cluster id and Fiedler value of every neuron, and the permutation that puts
clusters and co-firing neurons side by side) and cluster_quality.png (to RUN_DIR unless --out), and prints
per layer the share of co-firing mass inside clusters and the clusters an average token touches (bounds
from pairwise counts), each next to a random partition with the same sizes.
"""

from __future__ import annotations

import argparse
import os
import sys

from mpicorr import analysis, clusters, figures
from mpicorr.errors import UserError

HEADER = "layer  inside  random_inside  touched        random_touched  of K"
DEFAULT_CLUSTERS = 8  # K without --clusters; a narrower layer (--site heads of a small model) gets its width


def quality_row(r: clusters.LayerClusters) -> dict:
    """One layer's quality numbers, flat."""
    q, z = r.quality, r.random
    return {"layer": r.layer, "clusters": int(r.labels.max()) + 1, "inside_share": q.inside_share,
            "touched_low": q.touched_low, "touched_high": q.touched_high, "random_inside_share": z.inside_share,
            "random_touched_low": z.touched_low, "random_touched_high": z.touched_high}


def format_row(r: dict) -> str:
    """One printed table line."""
    return (f"{r['layer']:5d}  {r['inside_share']:6.3f}  {r['random_inside_share']:13.3f}  "
            f"{r['touched_low']:5.2f}-{r['touched_high']:<5.2f}    {r['random_touched_low']:5.2f}-"
            f"{r['random_touched_high']:<5.2f}     {r['clusters']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared with report.py."""
    p.add_argument("--clusters", type=int, default=None,
                   help=f"clusters K per layer (default: {DEFAULT_CLUSTERS}, or the layer's width where it has fewer "
                        f"neurons, as --site heads of a small model; a K given here must fit every layer)")
    p.add_argument("--balanced", action="store_true", help="clusters of equal size (sizes differ by at most one)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and of the random baseline"
                                                       " (default: %(default)s)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work, before any file is read."""
    if args.clusters is not None and args.clusters < 1:
        raise UserError(f"--clusters {args.clusters}: must be at least 1")


def clusters_for(args: argparse.Namespace, width: int) -> int:
    """K for a layer of `width` neurons: --clusters as given (cluster_layer refuses one larger than the
    layer), else the default, or the width of a narrower layer."""
    return args.clusters if args.clusters is not None else min(DEFAULT_CLUSTERS, width)


def cluster(lm: analysis.LayerMatrix, args: argparse.Namespace) -> clusters.LayerClusters:
    """Cluster one layer."""
    return clusters.cluster_layer(lm.layer, clusters.dense(lm.packed, lm.width), lm.trials,
                                  clusters_for(args, lm.width), args.balanced, args.seed)


def narrowed(args: argparse.Namespace, results: list[clusters.LayerClusters]) -> str | None:
    """The note that the default K was lowered to the width of narrower layers; None when it was not."""
    few = {r.layer: len(r.labels) for r in results if len(r.labels) < DEFAULT_CLUSTERS}
    if args.clusters is not None or not few:
        return None
    layers = ", ".join(f"{layer} ({width})" for layer, width in few.items())
    return (f"--clusters not given: K = {DEFAULT_CLUSTERS}, lowered to the layer's width (one cluster per neuron) "
            f"for the layers with fewer neurons: {layers}")


def file_attributes(args: argparse.Namespace) -> dict:
    """Root attributes of clusters.h5 (`clusters`: the K asked; a narrower layer's is its width)."""
    return {"run_dir": os.path.abspath(args.run_dir), "clusters": args.clusters or DEFAULT_CLUSTERS,
            "balanced": args.balanced, "seed": args.seed, "affinity": "count"}


def main() -> int:
    p = analysis.script_parser(__doc__)
    add_arguments(p)
    args = p.parse_args()
    out = args.out or args.run_dir

    def body() -> None:
        check_arguments(args)
        paths = analysis.script_layers(args)
        results, rows = [], []
        for lm in analysis.read_layers(paths, "clustering"):
            results.append(cluster(lm, args))
            rows.append(quality_row(results[-1]))
        print(HEADER)
        for r in rows:
            print(format_row(r))
        if note := narrowed(args, results):
            print(note)
        h5, png = (analysis.output_name(n, args.expert) for n in (clusters.CLUSTERS, "cluster_quality.png"))
        clusters.write_clusters(os.path.join(out, h5), results, file_attributes(args))
        figures.cluster_quality(rows, os.path.join(out, png), analysis.run_label(args.run_dir, args.expert))
        print(f"outputs in {out}: {h5}, {png}")

    return analysis.run_script("clusters.py", body)


if __name__ == "__main__":
    sys.exit(main())
