"""Offline analysis on counts with a planted structure, and the scripts on original-format folders."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cli_env
from mpicorr import analysis, bundles, clusters, layout, matrixfile, summary, triangle


def planted_run(folder, layers=2, width=40, tokens=500, seed=0):
    """Matrix files only (as the original tool wrote them): Zipf-like firing plus two always-together groups."""
    rng = np.random.default_rng(seed)
    p = 0.6 * np.arange(1, width + 1) ** -1.0
    for layer in range(layers):
        fired = rng.random((tokens, width)) < p
        fired[:, 30:35] = fired[:, [30]]          # a group that always fires together
        full = fired.T.astype(np.int64) @ fired
        matrixfile.write_matrix(os.path.join(folder, matrixfile.matrix_name(layer)), layer, width, tokens,
                                full[np.tril_indices(width)])
    return folder


def test_powerlaw_exponent_recovers_planted_value():
    for alpha in (0.5, 1.0, 1.7):
        counts = np.round(1e6 * np.arange(1, 2001) ** -alpha)
        assert analysis.powerlaw_exponent(np.random.default_rng(0).permutation(counts)) == pytest.approx(alpha, abs=0.01)


def test_coverage_curve_hand_values():
    x, y = analysis.coverage_curve(np.array([1, 0, 6, 3]))
    assert x.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert y.tolist() == [0.6, 0.9, 1.0, 1.0]


def test_heatmap_is_block_mean_of_the_measure(tmp_path):
    planted_run(str(tmp_path), layers=1)
    header, packed = matrixfile.read_matrix(str(tmp_path / matrixfile.matrix_name(0)))
    order = np.random.default_rng(1).permutation(40)
    image = analysis.heatmap(packed, 40, header.trials, order, 8, "freq")
    full = triangle.unpack(packed, 40)[np.ix_(order, order)] / header.trials
    np.fill_diagonal(full, np.nan)  # a neuron with itself is left out
    assert image.shape == (8, 8)
    assert np.allclose(image, np.nanmean(full.reshape(8, 5, 8, 5).transpose(0, 2, 1, 3).reshape(8, 8, 25), axis=2))
    assert analysis.heatmap(packed, 40, header.trials, order, 4096).shape == (40, 40)


def test_heatmap_leaves_undefined_cells_out():
    """Neuron 3 never fires, so its lift with anyone is undefined: NaN pixels at full resolution (as is the
    diagonal), and a block mixing it with firing neurons averages the defined cells only."""
    fired = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 1, 0]], dtype=np.int64)
    full = fired.T @ fired
    packed, trials = full[np.tril_indices(4)], len(fired)
    lift = full * trials / np.outer(np.diag(full), np.diag(full)).clip(1)
    image = analysis.heatmap(packed, 4, trials, np.arange(4), 4, "lift")
    assert np.isnan(image[3]).all() and np.isnan(image[:, 3]).all() and np.isnan(np.diag(image)).all()
    assert np.allclose(image[:3, :3][~np.eye(3, dtype=bool)], lift[:3, :3][~np.eye(3, dtype=bool)])
    halves = analysis.heatmap(packed, 4, trials, np.arange(4), 2, "lift")
    assert halves[0, 1] == pytest.approx((lift[0, 2] + lift[1, 2]) / 2) and np.isnan(halves[1, 1])
    assert halves[0, 0] == pytest.approx(lift[0, 1])


def script(name, *args):
    """Run analysis/<name> and return the completed process."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "analysis", name), *map(str, args)],
                          capture_output=True, text=True, env=cli_env(), timeout=300)


def is_png(path):
    return open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_scripts_run_on_original_format_folder(tmp_path):
    run = planted_run(str(tmp_path))
    for name, args in (("firing.py", []), ("heatmap.py", ["--layers", "1", "--pixels", "20"]),
                       ("cofiring.py", ["--top", "7", "--min-support", "5"]), ("clusters.py", ["--clusters", "4"]),
                       ("bundles.py", ["--q", "0.9", "--min-support", "2"]),
                       ("heatmap.py", ["--all", "--order", "cluster", "--measure", "phi", "--pixels", "10"]),
                       ("export.py", ["--powerinfer", tmp_path / "pi", "--metis", tmp_path / "metis",
                                      "--permutation", tmp_path / "perm.json"])):
        result = script(name, run, *args)
        assert result.returncode == 0, (name, result.stderr)
    for name in ("firing_rank_frequency.png", "firing_coverage.png", "firing_depth.png", "heatmap_lift_1.png",
                 "cofiring_distributions.png", "cluster_quality.png", "bundle_sizes.png", "heatmap_phi_0.png",
                 "heatmaps_phi.png"):
        assert is_png(tmp_path / name), name
    from matplotlib.image import imread
    assert imread(str(tmp_path / "heatmap_lift_1.png")).shape[:2] == (700, 800)
    lines = script("firing.py", run).stdout.splitlines()
    assert lines[1].split()[:2] == ["0", "40"]
    rows = list(csv.DictReader(open(tmp_path / "cofiring_top_pairs.csv")))
    assert len(rows) == 14 and rows[0]["layer"] == "0" and float(rows[0]["lift"]) >= float(rows[1]["lift"])
    _, found = clusters.read_clusters(str(tmp_path / clusters.CLUSTERS))
    assert sorted(found) == [0, 1] and found[0].labels.max() == 3
    # The planted group (neurons 30..34 always fire together) lands in one cluster and one bundle.
    assert len(set(found[0].labels[30:35].tolist())) == 1
    _, b = bundles.read_bundles(str(tmp_path / bundles.BUNDLES))
    assert {30, 31, 32, 34}.issubset(b[0].bundle(33).tolist())
    assert sorted(os.listdir(tmp_path / "pi")) == ["activation_0.pt", "activation_1.pt"]
    assert sorted(os.listdir(tmp_path / "metis")) == ["cofiring_0.graph", "cofiring_1.graph"]
    assert sorted(json.load(open(tmp_path / "perm.json"))["layers"]["1"]["permutation"]) == list(range(40))
    result = script("report.py", run, "--clusters", "4", "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "report" / "report.html").read_text()
    assert "matrix files only" in page and page.count("<b>Layer ") == 2
    assert page.count("data:image/png;base64,") == 8
    assert {"cofiring_top_pairs.csv", "clusters.h5", "bundles.h5"}.issubset(os.listdir(tmp_path / "report"))


def test_heatmap_help_names_its_default_layer(tmp_path):
    """heatmap.py draws only the first layer without --layers or --all, and its --help says so (it said
    'default: all', the other scripts' default)."""
    run = planted_run(str(tmp_path))
    assert script("heatmap.py", run, "--pixels", "10").stdout.split() == [str(tmp_path / "heatmap_lift_0.png")]
    helptext = " ".join(script("heatmap.py", "--help").stdout.split())
    assert "(default: the first layer; --all: every layer)" in helptext
    assert "(default: all)" in " ".join(script("firing.py", "--help").stdout.split())


def test_firing_thresholds_refused_before_any_output(tmp_path):
    """firing.py --thresholds that cannot be answered (here: no summary.h5, so no histograms) is one line
    and exit 2 with nothing printed or written; the table and the --out folder came before the error."""
    os.makedirs(tmp_path / "run")
    run = planted_run(str(tmp_path / "run"))
    result = script("firing.py", run, "--thresholds", "0.5", "--out", tmp_path / "fig")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().endswith("no summary.h5, so no activation histograms (the original tool wrote none)")
    assert not os.path.exists(tmp_path / "fig")


def test_report_on_a_run_folder(tmp_path, llama, sample_path):
    from conftest import run_main
    out = tmp_path / "run"
    assert run_main(["--model", llama, "--data", sample_path, "--out", str(out), "--ctx", "32",
                     "--device", "cpu"]).returncode == 0
    result = script("report.py", out, "--layers", "1", "--pixels", "16")
    assert result.returncode == 0, result.stderr
    page = (out / "report.html").read_text()
    assert "perplexity" in page and "summary.h5" not in page and page.count("<b>Layer 1.</b>") == 1
    assert "analysing layer 1 (1/1)" in result.stderr
    # The histogram predicts the density of any edge threshold; at the run's own (0.5) it is the counted one.
    _, layers = summary.read_summary(str(out / "summary.h5"))
    for layer, entry in layers.items():
        got = analysis.threshold_density(entry["act_hist"], entry["act_hist_edges"], 0.5)
        assert got == pytest.approx(entry["attrs"]["density"], rel=1e-12)
        assert analysis.threshold_density(entry["act_hist"], entry["act_hist_edges"], 0.25) > got
    with pytest.raises(analysis.UserError, match="not a histogram edge; the nearest are 0.25, 0.353553"):
        analysis.threshold_density(entry["act_hist"], entry["act_hist_edges"], 0.3)
    lines = script("firing.py", out, "--thresholds", "0.5,1", "--out", tmp_path / "fig").stdout.splitlines()
    row = lines[lines.index(next(l for l in lines if l.startswith("layer  T=0.5"))) + 1].split()
    assert float(row[1]) == pytest.approx(layers[int(row[0])]["attrs"]["density"], abs=1e-4)


def test_default_clusters_fit_a_heads_run_with_fewer_heads(tmp_path, llama, sample_path):
    """--site heads of a 4-head model: report.py and clusters.py without --clusters once failed ('--clusters 8:
    must be between 1 and the layer width 4'); the default K now drops to the width and says so, while an
    explicit K that does not fit is still one line and exit 2."""
    from conftest import run_main
    out = tmp_path / "run"
    assert run_main(["--model", llama, "--data", sample_path, "--out", str(out), "--ctx", "32", "--chunks", "8",
                     "--site", "heads", "--threshold", "0.25", "--device", "cpu"]).returncode == 0
    note = "--clusters not given: K = 8, lowered to the layer's width (one cluster per neuron) for the layers " \
           "with fewer neurons: 0 (4), 1 (4)"
    for name in ("report.py", "clusters.py"):
        result = script(name, out, "--out", tmp_path / name, "--pixels" if name == "report.py" else "--seed", "16")
        assert result.returncode == 0 and note in result.stdout.splitlines(), (name, result.stderr)
        attrs, found = clusters.read_clusters(str(tmp_path / name / clusters.CLUSTERS))
        assert attrs["clusters"] == 8 and [int(found[l].labels.max()) + 1 for l in (0, 1)] == [4, 4]
    assert html_text(tmp_path / "report.py" / "report.html").count(note) == 1
    for name in ("report.py", "clusters.py"):
        result = script(name, out, "--clusters", "8", "--out", tmp_path / "refused")
        assert result.returncode == 2 and result.stderr.strip().endswith(
            "--clusters 8: must be between 1 and the layer width 4"), result.stderr
    assert script("clusters.py", out, "--clusters", "2", "--out", tmp_path / "two").stdout.count("lowered") == 0


def html_text(path) -> str:
    """A page's text with HTML escapes undone."""
    import html
    return html.unescape(open(path, encoding="utf-8").read())


@pytest.mark.parametrize("name,args,message", [
    ("heatmap.py", [], "no correlations_block"),
    ("heatmap.py", ["--layers", "7"], "--layers 7: no matrix file for layer 7"),
    ("heatmap.py", ["--layers", "x"], "--layers x: give layer numbers"),
    ("firing.py", ["--layers", "1-0"], "--layers 1-0: the range 1-0 holds no layer"),  # was a traceback
    ("heatmap.py", ["--order", "cluster"], "run analysis/clusters.py first"),
    ("cofiring.py", ["--top", "0"], "--top 0"),
    ("clusters.py", ["--clusters", "0"], "--clusters 0"),
    ("bundles.py", ["--q", "1.5"], "--q 1.5"),
    ("export.py", [], "nothing to export"),
    ("report.py", ["--min-support", "0"], "--min-support 0"),
])
def test_script_errors_are_one_line(tmp_path, name, args, message):
    run = str(tmp_path) if not args else planted_run(str(tmp_path), layers=1)
    result = script(name, run, *args)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr


def with_summary(folder):
    """A summary.h5 as mpicorr writes one (the parts the analysis reads) for a folder of matrix files: each
    layer's fire_count, tokens, width and matrix_sha256."""
    import hashlib

    import h5py
    with h5py.File(os.path.join(folder, summary.SUMMARY), "w") as h5:
        h5.attrs["model"] = "planted"
        for name in sorted(os.listdir(folder)):
            if m := analysis.MATRIX_RE.match(name):
                path = os.path.join(folder, name)
                header, packed = matrixfile.read_matrix(path)
                group = h5.create_group(f"layers/{m.group(1)}")
                group["fire_count"] = layout.diagonal(packed, header.width).astype(np.uint64)
                group.attrs.update(tokens=header.trials, width=header.width,
                                   matrix_sha256=hashlib.sha256(open(path, "rb").read()).hexdigest())
    return folder


def swap(run, a, b):
    pa, pb = (os.path.join(run, matrixfile.matrix_name(layer)) for layer in (a, b))
    os.rename(pa, pa + ".x")
    os.rename(pb, pa)
    os.rename(pa + ".x", pb)


@pytest.mark.parametrize("damage,message", [
    ("delete", "correlations_block_1.zstd missing (summary.h5 lists layers 0, 1, 2)"),
    ("swap", "correlations_block_0.zstd: its header says block 1, its name block 0"),
    ("rewrite", "correlations_block_2.zstd: SHA-256 differs"),
    ("extra", "correlations_block_3.zstd not in summary.h5 (which lists layers 0, 1, 2)"),
])
def test_report_refuses_a_damaged_run_folder(tmp_path, damage, message):
    """report.py (and every script: they read through analysis.matrix_paths/read_layers) checks the files
    against summary.h5 and their own headers: a deleted file once left a layer out without a word (exit 0),
    swapped files were analysed under each other's numbers."""
    os.makedirs(tmp_path / "run")
    run = with_summary(planted_run(str(tmp_path / "run"), layers=3, width=40, tokens=200))
    if damage == "delete":
        os.remove(os.path.join(run, matrixfile.matrix_name(1)))
    elif damage == "swap":
        swap(run, 0, 1)
    elif damage == "rewrite":
        header, packed = matrixfile.read_matrix(os.path.join(run, matrixfile.matrix_name(2)))
        matrixfile.write_matrix(os.path.join(run, matrixfile.matrix_name(2)), 2, 40, header.trials, packed // 2)
    else:
        os.makedirs(tmp_path / "other")
        planted_run(str(tmp_path / "other"), layers=4, width=40, tokens=200)
        os.rename(tmp_path / "other" / matrixfile.matrix_name(3), os.path.join(run, matrixfile.matrix_name(3)))
    result = script("report.py", run, "--clusters", "2", "--out", tmp_path / "report")
    errors = [line for line in result.stderr.splitlines() if not line.startswith("analysing layer ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert message in errors[0] and errors[0].startswith("report.py: error:")
    assert not (tmp_path / "report" / "report.html").exists()


def test_swapped_files_of_an_original_folder_are_refused(tmp_path):
    """No summary.h5 (the original tool's folders): the header's block must still match the name."""
    run = planted_run(str(tmp_path), layers=2, width=40, tokens=200)
    assert analysis.firing(run)[1].layer == 1
    swap(run, 0, 1)
    with pytest.raises(analysis.UserError, match="its header says block 1, its name block 0"):
        analysis.firing(run)
    with pytest.raises(analysis.UserError, match="its header says block 1, its name block 0"):
        list(analysis.read_layers(analysis.matrix_paths(run)))


def test_a_folder_a_run_is_using_or_stopped_writing_is_refused(tmp_path):
    """A run holding the folder's lock (counting with --force beside the old outputs, or writing) and a run
    that stopped while writing (matrix files and run.json, no summary.h5) were analysed as finished folders:
    the first read files about to be replaced, the second a layer short without a word, as the original
    tool's folder. Both are one line, exit 2, nothing written; the lock of a threshold-<T> folder's run is on
    the folder above."""
    from mpicorr import outputs
    os.makedirs(tmp_path / "run")
    os.makedirs(tmp_path / "multi" / "threshold-0.5")
    run = with_summary(planted_run(str(tmp_path / "run"), layers=2))
    part = with_summary(planted_run(str(tmp_path / "multi" / "threshold-0.5"), layers=2))
    for folder, held, fig in ((run, run, tmp_path / "fig"), (part, str(tmp_path / "multi"), tmp_path / "fig1")):
        with outputs.locked(held):
            result = script("firing.py", folder, "--out", fig)
        assert result.returncode == 2 and "an mpicorr run or sum is using this folder now" in result.stderr
        assert result.stderr.count("\n") == 1 and not os.path.exists(fig)
        assert script("firing.py", folder, "--out", fig).returncode == 0  # the lock has ended
    os.remove(os.path.join(run, summary.SUMMARY))
    os.remove(os.path.join(run, matrixfile.matrix_name(1)))
    with open(os.path.join(run, "run.json"), "w") as fh:
        json.dump({"format": "mpicorr-run-1", "ranks": []}, fh)
    for name in ("firing.py", "heatmap.py", "routers.py"):
        result = script(name, run, "--out", tmp_path / "fig2")
        assert result.returncode == 2 and "its run has not finished writing" in result.stderr, result.stderr
        assert not os.path.exists(tmp_path / "fig2")
    os.remove(os.path.join(run, "run.json"))  # now the original tool's folder: matrix files only
    assert script("firing.py", run, "--out", tmp_path / "fig2").returncode == 0
    with open(tmp_path / "multi" / "run.json", "w") as fh:  # a finished run of several thresholds
        json.dump({"format": "mpicorr-run-1", "ranks": []}, fh)
    result = script("firing.py", tmp_path / "multi")
    assert result.returncode == 2 and "holds one run folder per threshold; give one of them" in result.stderr
    assert script("firing.py", part, "--out", tmp_path / "fig3").returncode == 0


def test_a_file_cut_short_is_refused_before_any_output(tmp_path):
    """A matrix file cut short (truncate by hand, a full disk) was found only when its layer's turn came:
    heatmap.py --all and export.py had written the earlier layers' files by then. Its frame is now walked
    with the other files' headers, before anything is written."""
    os.makedirs(tmp_path / "run")
    run = planted_run(str(tmp_path / "run"), layers=3, width=600, tokens=300)
    path = os.path.join(run, matrixfile.matrix_name(2))
    os.truncate(path, os.path.getsize(path) // 2)
    for name, args in (("heatmap.py", ["--all", "--pixels", "8", "--out", tmp_path / "fig"]),
                       ("export.py", ["--powerinfer", tmp_path / "fig", "--metis", tmp_path / "fig"]),
                       ("firing.py", ["--out", tmp_path / "fig"])):
        result = script(name, run, *args)
        assert result.returncode == 2 and "correlations_block_2.zstd: truncated" in result.stderr, result.stderr
        assert result.stderr.count("error") == 1 and "layer 0" not in result.stderr
        assert not os.path.exists(tmp_path / "fig")


def test_a_clusters_file_that_does_not_fit_writes_nothing(tmp_path):
    """export.py --permutation without clusters.h5 wrote the PowerInfer and METIS files first, then failed;
    a clusters.h5 of other layers made heatmap.py --all --order cluster draw the earlier layers first; one of
    another run (other widths) was a traceback in heatmap.py and a permutation of the wrong length, exit 0,
    in export.py. Each is now one line, exit 2, before anything is written."""
    for name in ("run", "narrow", "fig"):
        os.makedirs(tmp_path / name)
    run = planted_run(str(tmp_path / "run"), layers=2, width=40, tokens=200)
    narrow = planted_run(str(tmp_path / "narrow"), layers=2, width=36, tokens=200)
    assert script("clusters.py", run, "--clusters", "2", "--layers", "0", "--out", tmp_path / "one").returncode == 0
    assert script("clusters.py", narrow, "--clusters", "2", "--out", tmp_path / "other").returncode == 0
    out = ["--powerinfer", tmp_path / "fig" / "pi", "--metis", tmp_path / "fig" / "metis",
           "--permutation", tmp_path / "fig" / "perm.json"]
    cases = [("export.py", out, "clusters.h5: no such file; run analysis/clusters.py first"),
             ("export.py", [*out, "--clusters", tmp_path / "one" / "clusters.h5"], "has no layer 1 (it holds layers 0)"),
             ("export.py", [*out, "--clusters", tmp_path / "other" / "clusters.h5"],
              "layer 0 has 36 neurons, the run's 40: the file belongs to another run"),
             ("heatmap.py", ["--all", "--order", "cluster", "--clusters", tmp_path / "one" / "clusters.h5",
                             "--out", tmp_path / "fig"], "has no layer 1"),
             ("heatmap.py", ["--order", "cluster", "--clusters", tmp_path / "other" / "clusters.h5",
                             "--out", tmp_path / "fig"], "layer 0 has 36 neurons, the run's 40")]
    for name, args, message in cases:
        result = script(name, run, *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert os.listdir(tmp_path / "fig") == []
    result = script("export.py", run, "--layers", "0", "--permutation", tmp_path / "fig" / "perm.json",
                    "--clusters", tmp_path / "one" / "clusters.h5")
    assert result.returncode == 0 and list(json.load(open(tmp_path / "fig" / "perm.json"))["layers"]) == ["0"]


def test_an_output_path_of_the_wrong_kind_is_one_clear_line(tmp_path):
    """--out naming a file was '[Errno 17] File exists: ...', and export.py --permutation naming a folder
    '[Errno 21] Is a directory: .../.NAME.tmpPID -> ...' after the work; now each names the option, first."""
    os.makedirs(tmp_path / "run")
    run = planted_run(str(tmp_path / "run"), layers=1)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for name in ("firing.py", "cofiring.py", "heatmap.py", "clusters.py", "bundles.py", "report.py"):
        result = script(name, run, "--out", afile)
        assert result.returncode == 2 and result.stdout == "", (name, result.stdout)
        assert result.stderr == f"{name}: error: --out {afile}: is a file, not a folder; give a folder (it is made if missing)\n"
    cases = [(["--powerinfer", afile], f"--powerinfer {afile}: is a file, not a folder"),
             (["--metis", tmp_path / "m", "--permutation", tmp_path], f"--permutation {tmp_path}: is a folder"),
             (["--permutation", tmp_path / "no" / "p.json"], f"there is no folder {tmp_path / 'no'}")]
    for args, message in cases:
        result = script("export.py", run, *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert afile.read_text() == "mine" and not os.path.exists(tmp_path / "m")


def test_figure_titles_name_the_firing_rule_and_the_expert(tmp_path, monkeypatch):
    """The figures' titles said neither the threshold nor, with --expert, the expert ('layer 0: lift' for
    expert 1 of block 0): every figure now adds analysis.run_label, from summary.h5's threshold and site."""
    import h5py

    from mpicorr import figures, measures
    run = with_summary(planted_run(str(tmp_path), layers=2, width=40, tokens=200))
    with h5py.File(os.path.join(run, summary.SUMMARY), "a") as h5:
        h5.attrs.update(threshold=0.5, site="ffn")
    assert analysis.run_label(run) == "|x| ≥ 0.5" and analysis.run_label(run, 2) == "expert 2, |x| ≥ 0.5"
    with h5py.File(os.path.join(run, summary.SUMMARY), "a") as h5:
        h5.attrs.update(threshold=1.5, site="heads")
    assert analysis.run_label(run) == "head norm ≥ 1.5"
    os.makedirs(tmp_path / "original")
    assert analysis.run_label(planted_run(str(tmp_path / "original"), layers=1)) == ""
    titles = []
    close = figures.plt.close
    monkeypatch.setattr(figures.plt, "close", lambda fig: (titles.append(
        " ".join([fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes])),
        close(fig)))
    fire = analysis.firing(run)
    rows = [analysis.layer_row(f.layer, f.trials, f.fire_count) for f in fire]
    image = np.ones((4, 4))
    quality = dict(layer=0, clusters=2, **{f"{pre}{k}": 0.5 for pre in ("", "random_")
                                           for k in ("inside_share", "touched_low", "touched_high")})
    hists = {0: {kind: np.ones(len(edges) - 1) for kind, edges in measures.BINS.items()}}
    png = str(tmp_path / "f.png")
    figures.rank_frequency(fire, png, "LABEL")
    figures.coverage(fire, png, "LABEL")
    figures.depth(rows, png, "LABEL")
    figures.heatmap(image, 4, 0, "lift", "in Fiedler order", png, "LABEL")
    figures.contact_sheet({0: image}, {0: 4}, "lift", png, "in Fiedler order", "LABEL")
    figures.distributions(hists, 10, png, "LABEL")
    figures.cluster_quality([quality], png, "LABEL")
    figures.bundle_sizes({0: np.zeros(4, dtype=int)}, 0.8, png, 10, "LABEL")
    figures.bundle_sizes({0: np.arange(4)}, 0.8, png, 10, "LABEL")
    assert len(titles) == 9 and all("(LABEL)" in t or "(in Fiedler order, LABEL)" in t for t in titles), titles


def test_each_expert_has_its_own_output_names(tmp_path):
    """With --expert E every script wrote the dense blocks' names (firing_*.png, clusters.h5, report.html, ...):
    the analysis of expert 1 replaced expert 0's, or the shared experts' (Qwen2-MoE), in the same folder
    without a word. Now `_expert_<E>` comes before the extension, as in the matrix files, and heatmap.py and
    export.py find that expert's clusters file by default."""
    os.makedirs(tmp_path / "dense")
    planted_run(str(tmp_path / "dense"), layers=2, width=40, tokens=200)
    run = tmp_path / "run"
    os.makedirs(run)
    os.makedirs(tmp_path / "narrow")
    planted_run(str(tmp_path / "narrow"), layers=2, width=36, tokens=200)
    for layer in (0, 1):  # expert 0 as wide as the dense layers, expert 1 narrower
        os.link(tmp_path / "dense" / matrixfile.matrix_name(layer), run / matrixfile.matrix_name(layer, 0))
        os.link(tmp_path / "narrow" / matrixfile.matrix_name(layer), run / matrixfile.matrix_name(layer, 1))
    for expert in ("0", "1"):
        for name, args in (("firing.py", []), ("cofiring.py", ["--min-support", "2"]),
                           ("clusters.py", ["--clusters", "2"]), ("bundles.py", ["--min-support", "2"]),
                           ("heatmap.py", ["--all", "--order", "cluster", "--pixels", "8"]),
                           ("report.py", ["--clusters", "2", "--pixels", "8"])):
            result = script(name, run, "--expert", expert, *args)
            assert result.returncode == 0, (name, result.stderr)
        result = script("export.py", run, "--expert", expert, "--permutation", run / f"perm{expert}.json")
        assert result.returncode == 0, result.stderr
    for e, width in ((0, 40), (1, 36)):
        for name in ("firing_rank_frequency", "firing_coverage", "firing_depth", "cofiring_distributions",
                     "cluster_quality", "bundle_sizes", "heatmap_lift_0", "heatmap_lift_1", "heatmaps_lift"):
            assert is_png(run / f"{name}_expert_{e}.png"), name
        assert len(clusters.read_clusters(str(run / f"clusters_expert_{e}.h5"))[1][0].labels) == width
        assert len(bundles.read_bundles(str(run / f"bundles_expert_{e}.h5"))[1][0].indptr) == width + 1
        assert (run / f"report_expert_{e}.html").exists() and (run / f"cofiring_top_pairs_expert_{e}.csv").exists()
        assert len(json.load(open(run / f"perm{e}.json"))["layers"]["1"]["permutation"]) == width
    assert not any(n in os.listdir(run) for n in ("clusters.h5", "report.html", "firing_depth.png"))


def test_a_heatmap_png_shows_every_cell(tmp_path, monkeypatch):
    """--pixels 1200 gave an 800 x 700 PNG whose axes hold some 590 pixels, so nearest-neighbour drawing
    dropped half the rows and columns of cells (the default, 1024, a third of a 14336-wide layer's). The PNG
    now has a pixel per cell: columns alternating between lift 1/2 and 2 show every alternation. A contact
    sheet's panels show their layers averaged down to the panel's pixels (analysis.shrink)."""
    from matplotlib.image import imread

    from mpicorr import figures
    p = 1200
    image = np.tile(np.where(np.arange(p) % 2 == 0, 0.5, 2.0), (p, 1))
    png = figures.heatmap(image, p, 0, "lift", "by index", str(tmp_path / "h.png"))
    row = imread(png)[imread(png).shape[0] // 2, :, :3]
    red = row[:, 0] > row[:, 2] + 0.2
    blue = row[:, 2] > row[:, 0] + 0.2
    side = np.where(red, 1, np.where(blue, -1, 0))
    side = side[side != 0]
    assert int((side[1:] != side[:-1]).sum()) >= p - 4  # the axes frame covers the outer columns
    small = figures.heatmap(image[:40, :40], 40, 0, "lift", "by index", str(tmp_path / "s.png"))
    assert imread(small).shape[:2] == (700, 800)  # a narrow layer keeps the usual size
    shown = []
    close = figures.plt.close
    monkeypatch.setattr(figures.plt, "close", lambda fig: (shown.append(fig.axes[0].images[0].get_array()), close(fig)))
    figures.contact_sheet({0: image}, {0: p}, "lift", str(tmp_path / "sheet.png"))
    assert shown[0].shape[0] < 400 and np.allclose(shown[0][:, 1:-1], 1.25, atol=0.76)


def test_shrink_averages_defined_cells():
    image = np.array([[1.0, 3.0, 5.0], [np.nan, 2.0, 7.0], [4.0, np.nan, np.nan]])
    assert np.allclose(analysis.shrink(image, 3), image, equal_nan=True)
    half = analysis.shrink(np.arange(16.0).reshape(4, 4), 2)
    assert half.tolist() == [[2.5, 4.5], [10.5, 12.5]]
    one = analysis.shrink(image, 1)
    assert one[0, 0] == pytest.approx(22 / 6)
    assert np.isnan(analysis.shrink(np.full((4, 4), np.nan), 2)).all()


def test_routers_figure_is_white_at_random_routing(tmp_path, monkeypatch):
    """routers.png was white at lift 1, 'chosen independently'; but a token chooses exactly k of E experts,
    so random routing has lift (k - 1) E / (k (E - 1)) (the README's 0.57 for 2 of 8) and every pair of a
    router choosing at random was drawn blue. White is now that lift, from summary.h5's selected_per_token."""
    from mpicorr import figures
    rng = np.random.default_rng(0)
    tokens, experts, k = 20000, 8, 2
    chosen = np.argsort(rng.random((tokens, experts)), axis=1)[:, :k]
    onehot = np.zeros((tokens, experts), dtype=np.int64)
    onehot[np.arange(tokens)[:, None], chosen] = 1
    router = analysis.Router(0, tokens, onehot.sum(0), onehot.T @ onehot, k)
    assert router.random_lift() == pytest.approx(4 / 7)
    lift = router.lift()[~np.eye(experts, dtype=bool)]
    assert np.allclose(lift, 4 / 7, rtol=0.08)
    norms = []
    close = figures.plt.close
    monkeypatch.setattr(figures.plt, "close", lambda fig: (norms.append(fig.axes[0].images[0].norm), close(fig)))
    figures.routers([router], str(tmp_path / "r.png"))
    assert norms[0](np.log2(4 / 7)) == pytest.approx(0.5)  # the middle of RdBu: white
    assert analysis.Router(0, 10, np.ones(4, dtype=np.int64), np.ones((4, 4), dtype=np.int64)).random_lift() == 1.0


def test_an_expert_or_layer_that_is_not_there_says_what_is(tmp_path):
    """--expert on a dense run said 'no correlations_block_<L>_expert_0.zstd files', an expert past the last
    did not say which there are, and routers.py --layers 9 spoke of a 'matrix file'."""
    os.makedirs(tmp_path / "dense")
    dense = planted_run(str(tmp_path / "dense"), layers=1)
    result = script("firing.py", dense, "--expert", "0")
    assert result.stderr == f"firing.py: error: --expert 0: {dense} has no mixture-of-experts blocks; leave out --expert\n"
    moe = tmp_path / "moe"
    os.makedirs(moe)
    for e in (0, 1):
        os.link(os.path.join(dense, matrixfile.matrix_name(0)), moe / matrixfile.matrix_name(0, e))
    result = script("heatmap.py", moe, "--expert", "7")
    assert result.returncode == 2 and result.stderr.endswith("its MoE blocks have experts 0, 1\n"), result.stderr
    assert "--layers 9: no router (not an MoE block) for layer 9 (have 0, 2)" in str(pytest.raises(
        analysis.UserError, analysis.select, {0: "", 2: ""}, "9", "router (not an MoE block)").value)


def test_figures_with_nothing_to_show_say_why_and_log_ticks_are_plain(tmp_path, monkeypatch):
    """cofiring_distributions.png of a run where no pair reaches --min-support was four empty log axes (and
    matplotlib's 'Data has no positive values' warning); it now says why, as bundle_sizes.png does. The
    rank-frequency plot of counts within one decade labelled its minor ticks 4×10³, 3×10³: now 4000, 3000."""
    from mpicorr import figures, measures
    figs = []
    close = figures.plt.close
    def keep(fig):
        fig.canvas.draw()
        figs.append(([t.get_text() for t in fig.texts] + [t.get_text() for ax in fig.axes for t in ax.texts],
                     [t.get_text() for ax in fig.axes for t in ax.yaxis.get_ticklabels(minor=True)]))
        close(fig)
    monkeypatch.setattr(figures.plt, "close", keep)
    empty = {0: {kind: np.zeros(len(edges) - 1) for kind, edges in measures.BINS.items()}}
    figures.distributions(empty, 10, str(tmp_path / "d.png"))
    assert any("no pair of neurons co-fires on 10 tokens or more" in t for t in figs[0][0])
    fire = [analysis.LayerFiring(0, 5000, np.linspace(4200, 1100, 200).astype(np.uint64))]
    figures.rank_frequency(fire, str(tmp_path / "r.png"))
    labels = [t for t in figs[1][1] if t]
    assert "2000" in labels and not any("times" in t or "10^" in t for t in labels), labels


def closed_pipe_run(cmd: list) -> subprocess.CompletedProcess:
    """Run `cmd` with its standard output a pipe nobody reads any more (as `cmd | head -1` after head's line)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([str(c) for c in cmd], stdout=write, stderr=subprocess.PIPE, text=True,
                              env=cli_env(), timeout=300)
    finally:
        os.close(write)


def test_output_piped_to_a_reader_that_stopped_is_dropped_not_an_error(tmp_path):
    """`analysis/firing.py RUN | head -1` failed with 'Broken pipe', exit 2, its figures unwritten, and
    `mpicorr info RUN | head -3` sometimes ended in an internal-error line: the output nobody reads now goes
    to /dev/null and the command finishes (exit 0, nothing on stderr, the figures written)."""
    run = planted_run(str(tmp_path))
    result = closed_pipe_run([sys.executable, os.path.join(ROOT, "analysis", "firing.py"), run])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert is_png(tmp_path / "firing_coverage.png")
    result = closed_pipe_run([sys.executable, "-m", "mpicorr", "info", run])
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_heatmap_all_with_layers_draws_those_layers(tmp_path):
    """heatmap.py --all --layers 1 drew every layer (the --layers was dropped without a word); now --layers picks
    the layers and --all adds their contact sheet."""
    os.makedirs(tmp_path / "run")
    run = planted_run(str(tmp_path / "run"), layers=3)
    result = script("heatmap.py", run, "--all", "--layers", "1", "--pixels", "10", "--out", tmp_path / "fig")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "fig")) == ["heatmap_lift_1.png", "heatmaps_lift.png"]


def test_a_dump_folder_is_pointed_to_predictor_py(tmp_path):
    """A --dump folder given to an analysis script got 'no correlations_block_<L>.zstd files'; it now says what
    the folder is and which script reads it."""
    (tmp_path / "index.json").write_text("{}")
    result = script("firing.py", tmp_path)
    assert result.returncode == 2 and "is a --dump folder" in result.stderr and "predictor.py" in result.stderr
