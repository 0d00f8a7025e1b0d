"""Co-activation bundles: for each neuron, the neurons that fire with it with P(j | i) >= q.

    python analysis/bundles.py RUN_DIR [--q 0.8] [--min-support 10] [--layers 0-3]

Writes bundles.h5 (CSR per layer, format in the README) and bundle_sizes.png (to RUN_DIR unless --out),
and prints bundle-size statistics per layer.
"""

from __future__ import annotations

import argparse
import os
import sys

from mpicorr import analysis, bundles, figures
from mpicorr.errors import UserError

HEADER = "layer  mean_size  median  max  nonempty"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared with report.py."""
    p.add_argument("--q", type=float, default=0.8, help="bundle of i: neurons j with P(j | i) >= q"
                                                        " (default: %(default)s)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work, before any file is read."""
    if not 0.0 < args.q <= 1.0:
        raise UserError(f"--q {args.q}: must be in (0, 1]")
    if args.min_support < 1:
        raise UserError(f"--min-support {args.min_support}: must be at least 1")


def format_row(layer: int, s: dict) -> str:
    """One printed table line."""
    return f"{layer:5d}  {s['mean']:9.2f}  {s['median']:6.1f}  {s['max']:4d}  {s['nonempty']:8.3f}"


def main() -> int:
    p = analysis.script_parser(__doc__)
    add_arguments(p)
    p.add_argument("--min-support", type=int, default=10,
                   help="ignore pairs that co-fire on fewer tokens (a neuron seen twice says little)")
    args = p.parse_args()
    out = args.out or args.run_dir

    def body() -> None:
        check_arguments(args)
        paths = analysis.script_layers(args)
        results = [bundles.layer_bundles(lm.layer, lm.packed, lm.width, args.q, args.min_support)
                   for lm in analysis.read_layers(paths, "bundling")]
        print(HEADER)
        for b in results:
            print(format_row(b.layer, bundles.size_stats(b)))
        h5, png = (analysis.output_name(n, args.expert) for n in (bundles.BUNDLES, "bundle_sizes.png"))
        bundles.write_bundles(os.path.join(out, h5), results,
                              {"q": args.q, "min_support": args.min_support, "run_dir": os.path.abspath(args.run_dir)})
        figures.bundle_sizes({b.layer: b.sizes() for b in results}, args.q, os.path.join(out, png),
                             args.min_support, analysis.run_label(args.run_dir, args.expert))
        print(f"outputs in {out}: {h5}, {png}")

    return analysis.run_script("bundles.py", body)


if __name__ == "__main__":
    sys.exit(main())
