"""Firing statistics of a run folder: rank-frequency power laws, coverage curves, trends across depth.

    python analysis/firing.py RUN_DIR [--layers 0-7] [--out DIR] [--thresholds 0.25,0.5,1]

Writes firing_rank_frequency.png, firing_coverage.png and firing_depth.png (to RUN_DIR unless --out) and
prints one line per layer. Reads only files: summary.h5 when present, else the matrix diagonals (so
folders of the original tool work too).
"""

from __future__ import annotations

import os
import sys

from mpicorr import analysis, figures
from mpicorr.errors import UserError

HEADER = "layer  width  density  alpha  top20%  dead  always_on"


def format_row(r: dict) -> str:
    """One printed table line."""
    return (f"{r['layer']:5d}  {r['width']:5d}  {r['density']:7.4f}  {r['alpha']:5.2f}  {r['coverage20']:6.3f}"
            f"  {r['dead']:4d}  {r['always_on']:9d}")


def threshold_table(run_dir: str, layers: str | None, thresholds: str, expert: int | None = None) -> list[str]:
    """Per layer, the density (share of neurons firing per token) each threshold would give: the printed
    lines, all computed first so that a threshold that is not a bin edge fails before anything is printed."""
    try:
        values = [float(t) for t in thresholds.split(",")]
    except ValueError:
        raise UserError(f"--thresholds {thresholds}: give numbers like 0.25,0.5,1") from None
    hists = analysis.activation_histograms(run_dir, layers, expert)
    lines = ["layer  " + "  ".join(f"T={t:<6g}" for t in values)]
    for layer, (hist, edges) in hists.items():
        lines.append(f"{layer:5d}  " + "  ".join(f"{analysis.threshold_density(hist, edges, t):8.4f}"
                                                for t in values))
    return lines


def main() -> int:
    p = analysis.script_parser(__doc__, "figures")
    p.add_argument("--thresholds", help="also print the density each of these thresholds would give, e.g. "
                                        "0.25,0.5,1 (from summary.h5's act_hist; edges 2^(k/2) only)")
    args = p.parse_args()
    out = args.out or args.run_dir

    def body() -> None:
        analysis.output_folder(args.out)
        layers = analysis.firing(args.run_dir, args.layers, args.expert)
        table = threshold_table(args.run_dir, args.layers, args.thresholds, args.expert) if args.thresholds else []
        os.makedirs(out, exist_ok=True)
        rows = [analysis.layer_row(lf.layer, lf.trials, lf.fire_count) for lf in layers]
        print(HEADER)
        for r in rows:
            print(format_row(r))
        for line in table:
            print(line)
        label = analysis.run_label(args.run_dir, args.expert)
        names = [analysis.output_name(f"firing_{what}.png", args.expert) for what in ("rank_frequency", "coverage", "depth")]
        figures.rank_frequency(layers, os.path.join(out, names[0]), label)
        figures.coverage(layers, os.path.join(out, names[1]), label)
        figures.depth(rows, os.path.join(out, names[2]), label)
        print(f"figures in {out}: {', '.join(names)}")

    return analysis.run_script("firing.py", body)


if __name__ == "__main__":
    sys.exit(main())
