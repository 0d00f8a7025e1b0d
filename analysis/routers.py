"""Mixture-of-experts routing of a run folder: how evenly experts are loaded, and which are chosen together.

    python analysis/routers.py RUN_DIR [--layers 0-7] [--out DIR]

Prints one line per MoE block (tokens, smallest and largest expert load, the pair chosen together most
often relative to chance) and writes routers.png: per block, log2 of the co-selection lift
P(i and j) / (P(i) P(j)) of every expert pair (white: the lift of k of E experts chosen at random, which is
below 1), and each expert's share of the tokens. Reads summary.h5's
routers/<L> groups (runs of Mixtral, Qwen2-MoE, Qwen3-MoE).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from mpicorr import analysis, figures

HEADER = "layer  experts  tokens  min_load  max_load  top_pair  lift"


def format_row(router: analysis.Router) -> str:
    """One printed table line."""
    lift = router.lift()
    share = router.load / max(router.tokens, 1)
    if np.isnan(lift).all():
        pair, best = "-", float("nan")
    else:
        i, j = np.unravel_index(np.nanargmax(lift), lift.shape)
        pair, best = f"{min(i, j)}-{max(i, j)}", float(lift[i, j])
    return (f"{router.layer:5d}  {len(router.load):7d}  {router.tokens:6d}  {share.min():8.3f}  {share.max():8.3f}"
            f"  {pair:>8}  {best:4.2f}")


def main() -> int:
    args = analysis.script_parser(__doc__, "figure").parse_args()
    out = args.out or args.run_dir

    def body() -> None:
        analysis.output_folder(args.out)
        found = analysis.routers(args.run_dir, args.layers)
        os.makedirs(out, exist_ok=True)
        print(HEADER)
        for router in found:
            print(format_row(router))
        print(f"figure: {figures.routers(found, os.path.join(out, 'routers.png'))}")

    return analysis.run_script("routers.py", body)


if __name__ == "__main__":
    sys.exit(main())
