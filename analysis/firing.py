"""Firing statistics of a run folder: rank-frequency power laws, coverage curves, trends across depth.

    python analysis/firing.py RUN_DIR [--layers 0-7] [--out DIR]

Writes firing_rank_frequency.png, firing_coverage.png and firing_depth.png (to RUN_DIR unless --out) and
prints one line per layer. Reads only files: summary.h5 when present, else the matrix diagonals (so
folders of the original tool work too).
"""

from __future__ import annotations

import os
import sys

from mpicorr import analysis, figures

HEADER = "layer  width  density  alpha  top20%  dead  always_on"


def format_row(r: dict) -> str:
    """One printed table line."""
    return (f"{r['layer']:5d}  {r['width']:5d}  {r['density']:7.4f}  {r['alpha']:5.2f}  {r['coverage20']:6.3f}"
            f"  {r['dead']:4d}  {r['always_on']:9d}")


def main() -> int:
    args = analysis.script_parser(__doc__, "figures").parse_args()
    out = args.out or args.run_dir

    def body() -> None:
        layers = analysis.firing(args.run_dir, args.layers)
        os.makedirs(out, exist_ok=True)
        rows = [analysis.layer_row(lf.layer, lf.trials, lf.fire_count) for lf in layers]
        print(HEADER)
        for r in rows:
            print(format_row(r))
        figures.rank_frequency(layers, os.path.join(out, "firing_rank_frequency.png"))
        figures.coverage(layers, os.path.join(out, "firing_coverage.png"))
        figures.depth(rows, os.path.join(out, "firing_depth.png"))
        print(f"figures in {out}: firing_rank_frequency.png, firing_coverage.png, firing_depth.png")

    return analysis.run_script("firing.py", body)


if __name__ == "__main__":
    sys.exit(main())
