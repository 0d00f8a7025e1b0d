"""Offline analysis on counts with a planted structure, and the scripts on original-format folders."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cli_env
from mpicorr import analysis, matrixfile, triangle


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


def test_measures_hand_values():
    rows = np.array([[4, 2], [2, 5]])
    diag = np.array([4.0, 5.0])
    assert analysis.measure(rows, diag, diag, 10, "freq").tolist() == [[0.4, 0.2], [0.2, 0.5]]
    assert analysis.measure(rows, diag, diag, 10, "cond").tolist() == [[1.0, 0.5], [0.4, 1.0]]
    assert analysis.measure(rows, diag, diag, 10, "lift")[0, 1] == pytest.approx(2 * 10 / (4 * 5))


def test_heatmap_is_block_mean_of_the_measure(tmp_path):
    planted_run(str(tmp_path), layers=1)
    header, packed = matrixfile.read_matrix(str(tmp_path / matrixfile.matrix_name(0)))
    order = np.random.default_rng(1).permutation(40)
    image = analysis.heatmap(packed, 40, header.trials, order, 8, "freq")
    full = triangle.unpack(packed, 40)[np.ix_(order, order)] / header.trials
    assert image.shape == (8, 8)
    assert np.allclose(image, full.reshape(8, 5, 8, 5).mean(axis=(1, 3)))
    assert analysis.heatmap(packed, 40, header.trials, order, 4096).shape == (40, 40)


def test_scripts_run_on_original_format_folder(tmp_path):
    run = planted_run(str(tmp_path))
    for script, args in (("firing.py", []), ("heatmap.py", ["--layer", "1", "--pixels", "20"])):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", script), run, *args],
                                capture_output=True, text=True, env=cli_env(), timeout=120)
        assert result.returncode == 0, result.stderr
    for name in ("firing_rank_frequency.png", "firing_coverage.png", "firing_depth.png", "heatmap_lift_1.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    assert imread(str(tmp_path / "heatmap_lift_1.png")).shape[:2] == (700, 800)
    lines = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "firing.py"), run],
                           capture_output=True, text=True, env=cli_env()).stdout.splitlines()
    assert lines[1].split()[:2] == ["0", "40"]


def test_script_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "analysis", "heatmap.py"), str(tmp_path)],
                            capture_output=True, text=True, env=cli_env())
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "no correlations_block" in result.stderr
