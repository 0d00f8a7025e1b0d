"""One self-contained HTML report of a run folder: metadata, firing, co-firing, heatmaps, clusters, bundles.

    python analysis/report.py RUN_DIR [--out DIR] [--clusters 8] [--balanced] [--q 0.8] [--min-support 10]

Reads each layer's matrix once, then writes report.html (figures embedded, opens anywhere) and the data
files behind it: cofiring_top_pairs.csv, clusters.h5, bundles.h5 (to RUN_DIR unless --out).
"""

from __future__ import annotations

import argparse
import base64
import html
import os
import sys
import tempfile

import numpy as np

# The sibling scripts own their options and table formats; the report reuses them.
import bundles as bundles_script
import clusters as clusters_script
import cofiring
from mpicorr import analysis, bundles, clusters, figures, layout, measures
from mpicorr.errors import UserError
from mpicorr.files import atomic_write

META_KEYS = ("model", "data", "data_sha256", "tokens", "chunks", "ctx", "threshold", "site", "site_modules",
             "perplexity", "ranks", "created", "command", "mpicorr_version")
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l{text-align:left}img{max-width:100%;border:1px solid #eee}h2{margin-top:2em}"""


def analyse(lm: analysis.LayerMatrix, args: argparse.Namespace) -> dict:
    """Everything the report shows about one layer, from one read of its matrix."""
    diag = layout.diagonal(lm.packed, lm.width)
    found = clusters_script.cluster(lm, args) if lm.width > 2 else None
    pixels = min(args.pixels, lm.width)
    cluster_order = found.permutation if found else np.arange(lm.width)
    return {
        "firing": analysis.layer_row(lm.layer, lm.trials, diag),
        "fire": analysis.LayerFiring(lm.layer, lm.trials, diag),
        "pairs": cofiring.layer_pairs(lm, args.rank_by, args.top, args.min_support),
        "hist": measures.histograms(lm.packed, lm.width, lm.trials, args.min_support),
        "clusters": found,
        "quality": clusters_script.quality_row(found) if found else None,
        "bundles": bundles.layer_bundles(lm.layer, lm.packed, lm.width, args.q, args.min_support),
        "freq_image": analysis.heatmap(lm.packed, lm.width, lm.trials, analysis.frequency_order(lm.packed, lm.width),
                                       pixels, "lift"),
        "cluster_image": analysis.heatmap(lm.packed, lm.width, lm.trials, cluster_order, pixels, "lift"),
        "width": lm.width,
    }


def findings(layer: dict, args: argparse.Namespace) -> str:
    """A short written summary of one layer."""
    f = layer["firing"]
    text = (f"{100 * f['density']:.1f} % of the {f['width']} neurons fire on an average token; the top 20 % of "
            f"neurons make {100 * f['coverage20']:.0f} % of all firings (power-law α = {f['alpha']:.2f}); "
            f"{f['dead']} never fire and {f['always_on']} always fire.")
    if layer["pairs"]:
        p = layer["pairs"][0]
        text += (f" Strongest pair by {args.rank_by}: {p['i']}–{p['j']} (co-fire on {p['count']} tokens, "
                 f"lift {p['lift']:.1f}, P(j|i) {p['p_j_given_i']:.2f}).")
    c = layer["clusters"]
    if c is not None:
        k = int(c.labels.max()) + 1
        text += (f" {k} clusters keep {100 * c.quality.inside_share:.0f} % of the co-firing mass inside "
                 f"(random partition of the same sizes: {100 * c.random.inside_share:.0f} %); a token touches "
                 f"{c.quality.touched_low:.1f}–{c.quality.touched_high:.1f} of them "
                 f"(random: {c.random.touched_low:.1f}–{c.random.touched_high:.1f}).")
    s = bundles.size_stats(layer["bundles"])
    text += (f" Bundles at q = {args.q}: {100 * s['nonempty']:.0f} % of neurons have one, "
             f"mean size {s['mean']:.1f}, largest {s['max']}.")
    return text


def table(header: list[str], rows: list[list]) -> str:
    """An HTML table; strings left-aligned, numbers right-aligned."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"<td>{v:.4g}</td>"
        return f"<td class=l>{html.escape(str(v))}</td>" if isinstance(v, str) else f"<td>{v}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>" + "".join("<tr>" + "".join(map(cell, r)) + "</tr>" for r in rows) + "</table>"


def embed(path: str) -> str:
    """An <img> with the PNG inlined."""
    with open(path, "rb") as fh:
        return f'<img src="data:image/png;base64,{base64.b64encode(fh.read()).decode()}">'


def draw_figures(layers: dict[int, dict], args: argparse.Namespace, folder: str) -> dict[str, str]:
    """Every figure of the report, as embedded <img> tags by name."""
    rows = [d["firing"] for d in layers.values()]
    firing_layers = [d["fire"] for d in layers.values()]
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    widths = {l: d["width"] for l, d in layers.items()}
    label = analysis.run_label(args.run_dir, args.expert)
    out = {
        "rank_frequency": figures.rank_frequency(firing_layers, path("rf.png"), label),
        "coverage": figures.coverage(firing_layers, path("cov.png"), label),
        "depth": figures.depth(rows, path("depth.png"), label),
        "distributions": figures.distributions({l: d["hist"] for l, d in layers.items()}, args.min_support,
                                               path("dist.png"), label),
        "sheet_frequency": figures.contact_sheet({l: d["freq_image"] for l, d in layers.items()}, widths, "lift",
                                                 path("sheet_f.png"), "neurons by firing frequency", label),
        "sheet_cluster": figures.contact_sheet({l: d["cluster_image"] for l, d in layers.items()}, widths, "lift",
                                               path("sheet_c.png"), "neurons in cluster order", label),
        "bundles": figures.bundle_sizes({l: d["bundles"].sizes() for l, d in layers.items()}, args.q,
                                        path("bundles.png"), args.min_support, label),
    }
    quality = [d["quality"] for d in layers.values() if d["quality"] is not None]
    if quality:
        out["quality"] = figures.cluster_quality(quality, path("quality.png"), label)
    return {name: embed(p) for name, p in out.items()}


def render(run_dir: str, meta: dict, layers: dict[int, dict], imgs: dict[str, str], args,
           note: str | None = None) -> str:
    """The report's HTML; `note`: clusters.py's word on a K lowered for narrow layers."""
    meta_rows = [[k, _plain(meta[k])] for k in META_KEYS if k in meta] or [["source", "matrix files only "
                                                                            "(original tool's format)"]]
    firing_rows = [[f["layer"], f["width"], f["trials"], f["density"], f["alpha"], f["coverage20"], f["dead"],
                    f["always_on"]] for f in (d["firing"] for d in layers.values())]
    quality_rows = [[r["layer"], r["clusters"], r["inside_share"], r["random_inside_share"],
                     f"{r['touched_low']:.2f}–{r['touched_high']:.2f}",
                     f"{r['random_touched_low']:.2f}–{r['random_touched_high']:.2f}"]
                    for r in (d["quality"] for d in layers.values() if d["quality"] is not None)]
    bundle_rows = [[l, *bundles.size_stats(d["bundles"]).values()] for l, d in layers.items()]
    pair_rows = [[p["layer"], p["i"], p["j"], p["count"], p["p_j_given_i"], p["p_i_given_j"], p["lift"], p["phi"],
                  p["jaccard"]] for d in layers.values() for p in d["pairs"][:5]]
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>mpicorr report: {html.escape(run_dir)}</title>",
        f"<style>{STYLE}</style></head><body><h1>mpicorr report</h1><p>{html.escape(os.path.abspath(run_dir))}"
        + (f", expert {args.expert} of each MoE block" if args.expert is not None else "") + "</p>",
        "<h2>Run</h2>", table(["attribute", "value"], meta_rows),
        "<h2>Findings per layer</h2>",
        "".join(f"<p><b>Layer {l}.</b> {html.escape(findings(d, args))}</p>" for l, d in layers.items()),
        "<h2>Firing</h2>", table(["layer", "width", "tokens", "density", "α", "top-20 % share", "dead", "always on"],
                                 firing_rows),
        imgs["depth"], imgs["rank_frequency"], imgs["coverage"],
        f"<h2>Co-firing</h2><p>Pairs that co-fire on at least {args.min_support} tokens; the 5 strongest by "
        f"{args.rank_by} per layer (all {args.top} in {analysis.output_name(cofiring.CSV, args.expert)}).</p>",
        table(["layer", "i", "j", "count", "P(j|i)", "P(i|j)", "lift", "phi", "Jaccard"], pair_rows),
        imgs["distributions"],
        "<h2>Heatmaps</h2><p>Lift on one colour scale for all layers (red: fire together more than chance, "
        "blue: less, grey: no value), neurons by firing frequency:</p>", imgs["sheet_frequency"], "<p>The same, neurons in cluster order:</p>", imgs["sheet_cluster"],
        f"<h2>Clusters</h2><p>K = {args.clusters or clusters_script.DEFAULT_CLUSTERS}"
        f"{' balanced' if args.balanced else ''} spectral clusters of the co-firing graph; touched = clusters an "
        f"average token touches (bounds from pairwise counts).{html.escape(' ' + note) if note else ''}</p>",
        table(["layer", "K", "inside share", "random inside", "touched", "random touched"], quality_rows),
        imgs.get("quality", ""),
        f"<h2>Bundles</h2><p>Neurons j with P(j | i) ≥ {args.q} (pairs with support ≥ {args.min_support}).</p>",
        table(["layer", "mean size", "median", "max", "share non-empty"], bundle_rows), imgs["bundles"],
        "</body></html>",
    ]
    return "\n".join(parts)


def _plain(value) -> str:
    if isinstance(value, np.ndarray):
        return ", ".join(map(str, value.tolist())) if value.size <= 4 else f"{value.size} entries: {value[0]} …"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> int:
    p = analysis.script_parser(__doc__, "report and its data files")
    cofiring.add_arguments(p)
    clusters_script.add_arguments(p)
    bundles_script.add_arguments(p)
    p.add_argument("--pixels", type=int, default=256, help="side of each heatmap in the contact sheets"
                                                           " (default: %(default)s)")
    args = p.parse_args()
    out = args.out or args.run_dir

    def body() -> None:
        for module in (cofiring, clusters_script, bundles_script):
            module.check_arguments(args)
        if args.pixels < 1:
            raise UserError(f"--pixels {args.pixels}: must be at least 1")
        paths = analysis.script_layers(args)
        layers = {}
        for lm in analysis.read_layers(paths):
            layers[lm.layer] = analyse(lm, args)
        csv_name, clusters_h5, bundles_h5, page_name = (analysis.output_name(n, args.expert) for n in (
            cofiring.CSV, clusters.CLUSTERS, bundles.BUNDLES, "report.html"))
        cofiring.write_csv(os.path.join(out, csv_name), [p for d in layers.values() for p in d["pairs"]])
        found = [d["clusters"] for d in layers.values() if d["clusters"] is not None]
        clusters.write_clusters(os.path.join(out, clusters_h5), found, clusters_script.file_attributes(args))
        bundles.write_bundles(os.path.join(out, bundles_h5), [d["bundles"] for d in layers.values()],
                              {"q": args.q, "min_support": args.min_support, "run_dir": os.path.abspath(args.run_dir)})
        with tempfile.TemporaryDirectory() as tmp:
            imgs = draw_figures(layers, args, tmp)
        note = clusters_script.narrowed(args, found)
        page = render(args.run_dir, analysis.metadata(args.run_dir), layers, imgs, args, note)
        path = os.path.join(out, page_name)
        with atomic_write(path) as fh:
            fh.write(page.encode())
        if note:
            print(note)
        print(f"{path} ({len(page) / 1e6:.1f} MB); data: {csv_name}, {clusters_h5}, {bundles_h5}")

    return analysis.run_script("report.py", body)


if __name__ == "__main__":
    sys.exit(main())
