"""Export a run folder to the files neighbouring tools load.

    python analysis/export.py RUN_DIR --powerinfer DIR          # DIR/activation_<L>.pt per layer
    python analysis/export.py RUN_DIR --metis DIR [--min-support 10] [--min-lift 1.5]   # DIR/cofiring_<L>.graph
    python analysis/export.py RUN_DIR --permutation FILE.json   # from RUN_DIR/clusters.h5 (or --clusters)

PowerInfer's solver reads activation_<i>.pt for i = 0..layers-1: 1-D tensors of per-neuron firing counts.
The METIS graph (for gpmetis) has the co-firing counts as integer edge weights. The permutation file is
what a weight-reordering script applies (see the README).
"""

from __future__ import annotations

import os
import sys

from mpicorr import analysis, clusters, exporters
from mpicorr.errors import UserError


def main() -> int:
    p = analysis.script_parser(__doc__, None)  # each export names its own place
    p.add_argument("--powerinfer", metavar="DIR", help="write PowerInfer's activation_<L>.pt files here")
    p.add_argument("--metis", metavar="DIR", help="write one METIS graph cofiring_<L>.graph per layer here")
    p.add_argument("--permutation", metavar="FILE", help="write the cluster permutations as JSON here")
    p.add_argument("--clusters", help="clusters.h5 for --permutation (default: RUN_DIR/clusters.h5; with "
                                      "--expert E, RUN_DIR/clusters_expert_E.h5)")
    p.add_argument("--min-support", type=int, default=1, help="METIS: keep edges that co-fire on >= this many tokens"
                                                              " (default: %(default)s)")
    p.add_argument("--min-lift", type=float, default=0.0, help="METIS: keep edges with lift >= this (0: all)"
                                                               " (default: %(default)s)")
    args = p.parse_args()

    def body() -> None:
        if not (args.powerinfer or args.metis or args.permutation):
            raise UserError("nothing to export: give --powerinfer DIR, --metis DIR and/or --permutation FILE")
        analysis.output_folder(args.powerinfer, "--powerinfer")
        analysis.output_folder(args.metis, "--metis")
        analysis.output_file(args.permutation, "--permutation")
        paths = analysis.select(analysis.matrix_paths(args.run_dir, args.expert), args.layers)
        found = {}
        if args.permutation:  # read and checked first: a missing or foreign clusters file writes nothing
            default = os.path.join(args.run_dir, analysis.output_name(clusters.CLUSTERS, args.expert))
            found = clusters.clusters_for(args.clusters or default, analysis.widths(paths))
        if args.powerinfer:
            fire = {lf.layer: lf.fire_count for lf in analysis.firing(args.run_dir, args.layers, args.expert)}
            written = exporters.write_powerinfer(args.powerinfer, fire)
            print(f"{len(written)} PowerInfer activation files in {args.powerinfer}")
        if args.metis:
            os.makedirs(args.metis, exist_ok=True)
            for lm in analysis.read_layers(paths, "exporting"):
                path = os.path.join(args.metis, f"cofiring_{lm.layer}.graph")
                edges = exporters.write_metis(path, lm.packed, lm.width, lm.trials, args.min_support, args.min_lift)
                print(f"{path}: {lm.width} vertices, {edges} edges")
        if args.permutation:
            exporters.write_permutation(args.permutation, {l: c.permutation for l, c in found.items()},
                                        {l: c.labels for l, c in found.items()})
            print(f"{args.permutation}: permutations of {len(found)} layers")

    return analysis.run_script("export.py", body)


if __name__ == "__main__":
    sys.exit(main())
