"""Co-firing measures of a run folder: the strongest pairs per layer (CSV) and each measure's distribution.

    python analysis/cofiring.py RUN_DIR [--rank-by lift] [--top 100] [--min-support 10] [--layers 0-3]

Writes cofiring_top_pairs.csv (layer, i, j, count, p_i, p_j, p_j_given_i, p_i_given_j, lift, pmi, phi,
jaccard; the --top pairs per layer by --rank-by) and cofiring_distributions.png (to RUN_DIR unless --out).
Only pairs that co-fire on at least --min-support tokens count: rare pairs have huge, meaningless lifts.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

from mpicorr import analysis, figures, layout, measures
from mpicorr.errors import UserError
from mpicorr.files import atomic_path

CSV_FIELDS = ("layer", "i", "j", "count", "p_i", "p_j", "p_j_given_i", "p_i_given_j", "lift", "pmi", "phi", "jaccard")
CSV = "cofiring_top_pairs.csv"


def write_csv(path: str, rows: list[dict]) -> None:
    """The top-pairs table."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def layer_pairs(lm: analysis.LayerMatrix, rank_by: str, top: int, min_support: int) -> list[dict]:
    """CSV rows of one layer's strongest pairs."""
    pairs = measures.top_pairs(lm.packed, lm.width, lm.trials, rank_by, top, min_support)
    return measures.pair_rows(lm.layer, pairs, layout.diagonal(lm.packed, lm.width), lm.trials)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared with report.py."""
    p.add_argument("--rank-by", default="lift", choices=measures.RANKABLE,
                   help="measure the strongest pairs are chosen by (cond: the larger of P(j|i), P(i|j))")
    p.add_argument("--top", type=int, default=100, help="pairs per layer in the CSV (default: %(default)s)")
    p.add_argument("--min-support", type=int, default=10, help="ignore pairs that co-fire on fewer tokens"
                                                               " (default: %(default)s)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work."""
    if args.top < 1:
        raise UserError(f"--top {args.top}: must be at least 1")
    if args.min_support < 1:
        raise UserError(f"--min-support {args.min_support}: must be at least 1 (a pair must co-fire at least once)")


def main() -> int:
    p = analysis.script_parser(__doc__)
    add_arguments(p)
    args = p.parse_args()
    out = args.out or args.run_dir

    def body() -> None:
        check_arguments(args)
        paths = analysis.script_layers(args)
        rows, hists = [], {}
        print("layer  pairs>=support  median_pmi  share_lift>2  best_" + args.rank_by)
        for lm in analysis.read_layers(paths):
            layer_rows = layer_pairs(lm, args.rank_by, args.top, args.min_support)
            hists[lm.layer] = measures.histograms(lm.packed, lm.width, lm.trials, args.min_support)
            rows += layer_rows
            print(summary_line(lm.layer, hists[lm.layer], layer_rows, args.rank_by))
        csv_name, png = (analysis.output_name(n, args.expert) for n in (CSV, "cofiring_distributions.png"))
        write_csv(os.path.join(out, csv_name), rows)
        figures.distributions(hists, args.min_support, os.path.join(out, png),
                              analysis.run_label(args.run_dir, args.expert))
        print(f"outputs in {out}: {csv_name}, {png}")

    return analysis.run_script("cofiring.py", body)


def summary_line(layer: int, hist: dict, rows: list[dict], rank_by: str) -> str:
    """One printed line: pairs with support, median PMI, share of pairs with lift > 2, best value."""
    pmi = hist["pmi"]
    n = int(pmi.sum())
    centres = (measures.BINS["pmi"][:-1] + measures.BINS["pmi"][1:]) / 2
    median = float(centres[np.searchsorted(np.cumsum(pmi), n / 2)]) if n else float("nan")
    above = float(pmi[centres > 1].sum() / n) if n else 0.0
    if not rows:
        best = float("nan")
    elif rank_by == "cond":
        best = max(rows[0]["p_j_given_i"], rows[0]["p_i_given_j"])
    else:
        best = rows[0][rank_by]
    return f"{layer:5d}  {n:14d}  {median:10.2f}  {above:12.3f}  {best:.4g}"


if __name__ == "__main__":
    sys.exit(main())
