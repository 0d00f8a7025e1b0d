"""Offline analysis of a run folder: reads only the files, one layer at a time.

Used by the scripts in analysis/. Works on folders of the original tool too (matrix files, no summary.h5).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import filetools, layout, matrixfile, measures, outputs, summary
from .config import threshold_folders
from .console import protect_stdout
from .progress import fmt_seconds
from .errors import UserError

MATRIX_RE = re.compile(r"correlations_block_(\d+)\.zstd$")
EXPERT_RE = re.compile(r"correlations_block_(\d+)_expert_(\d+)\.zstd$")


@dataclass(frozen=True)
class LayerFiring:
    """Firing counts of one layer."""

    layer: int
    trials: int
    fire_count: np.ndarray


def matrix_paths(run_dir: str, expert: int | None = None) -> dict[int, str]:
    """{block: path} of the matrix files in a run folder (of expert E of each MoE block), in block order."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: not a folder; give a run folder written by mpicorr or the original tool")
    outputs.check_settled(run_dir)
    names = os.listdir(run_dir)
    pattern = MATRIX_RE if expert is None else re.compile(rf"correlations_block_(\d+)_expert_{expert}\.zstd$")
    found = {int(m.group(1)): os.path.join(run_dir, f) for f in names if (m := pattern.match(f))}
    if not found and (parts := threshold_folders(run_dir)):
        raise UserError(f"{run_dir}: holds one run folder per threshold; give one of them, e.g. {parts[0]}")
    if not found and expert is None and any(EXPERT_RE.match(f) for f in names):
        raise UserError(f"{run_dir}: holds only the experts of MoE blocks; choose one with --expert E")
    experts = sorted({int(m.group(2)) for f in names if (m := EXPERT_RE.match(f))})
    if not found and expert is not None and not experts and any(MATRIX_RE.match(f) for f in names):
        raise UserError(f"--expert {expert}: {run_dir} has no mixture-of-experts blocks; leave out --expert")
    if not found and expert is not None and experts:
        raise UserError(f"--expert {expert}: {run_dir} has no correlations_block_<L>_expert_{expert}.zstd files; "
                        f"its MoE blocks have experts {_span(set(experts))}")
    if not found and filetools.is_dump(run_dir):
        raise UserError(f"{run_dir}: is a --dump folder (predictor training data), not a run folder; "
                        f"analysis/predictor.py reads it, the other scripts read the run's --out")
    if not found:
        what = "correlations_block_<L>.zstd" if expert is None else f"correlations_block_<L>_expert_{expert}.zstd"
        raise UserError(f"{run_dir}: no {what} files")
    if summary.exists(run_dir):
        check_layer_list(run_dir, set(found), {l for l, x in summary_units(run_dir) if x == expert}, expert)
    for layer, path in found.items():  # a few bytes per 128 KiB: refused before any layer is analysed
        check_block(layer, path, structure=True)
    return dict(sorted(found.items()))


def check_layer_list(run_dir: str, files: set[int], listed: set[int], expert: int | None = None) -> None:
    """The matrix files must be exactly the layers summary.h5 lists: a deleted file would drop a layer from
    the analysis without a word, and a file summary.h5 does not list belongs to another run."""
    names = lambda layers: ", ".join(matrixfile.matrix_name(l, expert) for l in sorted(layers))  # noqa: E731
    if listed - files:
        raise UserError(f"{run_dir}: {names(listed - files)} missing (summary.h5 lists layers "
                        f"{_span(listed)}); restore the files or count the run again")
    if files - listed:
        raise UserError(f"{run_dir}: {names(files - listed)} not in summary.h5 (which lists layers "
                        f"{_span(listed)}); the files belong to another run: move them out")


def _span(layers: set[int]) -> str:
    return ", ".join(map(str, sorted(layers))) if len(layers) <= 8 else f"{min(layers)}..{max(layers)} ({len(layers)})"


def summary_units(run_dir: str) -> dict[tuple[int, int | None], dict]:
    """{(layer, expert or None): its group's attributes} of a run folder's summary.h5, without reading the
    datasets (megabytes per layer)."""
    import h5py

    path = os.path.join(run_dir, summary.SUMMARY)
    try:
        with h5py.File(path, "r") as h5:
            units = {(int(l), None): dict(g.attrs) for l, g in h5.get("layers", {}).items()}
            units.update({(int(l), int(e)): dict(g.attrs) for l, block in h5.get("experts", {}).items()
                          for e, g in block.items()})
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc}); the file is damaged") from None
    return units


def recorded_sha256(paths) -> dict[str, str]:
    """{matrix path: its SHA-256 as recorded in its run folder's summary.h5} (nothing for folders without)."""
    out = {}
    for folder in {os.path.dirname(path) for path in paths}:
        if summary.exists(folder):
            out.update({os.path.join(folder, matrixfile.matrix_name(l, x)): str(a["matrix_sha256"])
                        for (l, x), a in summary_units(folder).items() if "matrix_sha256" in a})
    return out


def read_checked(layer: int, path: str, sha256: str | None = None) -> tuple[matrixfile.Header, np.ndarray]:
    """A matrix file whose header must give the block its name gives (a renamed or swapped file would be
    analysed under another layer's number), and whose SHA-256 must be `sha256` when given (hashed while
    reading); the block is checked first, as the more telling message."""
    check_block(layer, path)
    return matrixfile.read_matrix(path, sha256)


def check_block(layer: int, path: str, structure: bool = False) -> None:
    """The block in a matrix file's header must be the one in its name; with `structure`, its frame must also
    be whole (matrixfile.check_structure: a file cut short is found before any output is written)."""
    block = (matrixfile.check_structure(path) if structure else matrixfile.read_header(path)).block
    if block != layer:
        raise UserError(f"{path}: its header says block {block}, its name block {layer}; the file was renamed "
                        f"or swapped: give it block {block}'s name or restore it")


def widths(paths: dict[int, str]) -> dict[int, int]:
    """{layer: width} of matrix files, from their headers."""
    return {layer: matrixfile.read_header(path).width for layer, path in paths.items()}


def summary_entries(run_dir: str, expert: int | None = None) -> dict[int, dict]:
    """{block: its summary.h5 entry} (read_summary's layers, or expert E's of each MoE block)."""
    path = os.path.join(run_dir, summary.SUMMARY)
    if expert is None:
        return summary.read_summary(path)[1]
    return {layer: entry for (layer, e), entry in summary.read_moe(path)[0].items() if e == expert}


@dataclass(frozen=True)
class LayerMatrix:
    """One layer's counts as read from its matrix file."""

    layer: int
    width: int
    trials: int
    packed: np.ndarray


def select(paths: dict[int, str], layers: str | None, what: str = "matrix file") -> dict[int, str]:
    """The layers named by a --layers option ("3", "0,4,8", "0-7"; None = all); `what` names what a layer
    lacks when it is not among them."""
    if layers is None:
        return paths
    wanted = set()
    for part in layers.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"--layers {layers}: give layer numbers like 3, 0,4,8 or 0-7") from None
        if last < first:  # an empty range would leave no layer, and the scripts' figures would fail on none
            raise UserError(f"--layers {layers}: the range {part.strip()} holds no layer; give the lower number first")
        wanted.update(range(first, last + 1))
    missing = sorted(wanted - set(paths))
    if missing:
        raise UserError(f"--layers {layers}: no {what} for layer {missing[0]} (have {_span(set(paths))})")
    return {l: p for l, p in paths.items() if l in wanted}


def read_layers(paths: dict[int, str], what: str = "analysing") -> Iterator[LayerMatrix]:
    """Read the layers one at a time (bounded memory), with a progress line per layer on stderr; each file is
    checked against its name and, where its folder has a summary.h5, the SHA-256 recorded there."""
    shas = recorded_sha256(paths.values())
    start = time.monotonic()
    for n, (layer, path) in enumerate(paths.items()):
        elapsed = time.monotonic() - start
        eta = elapsed / n * (len(paths) - n) if n else 0.0
        print(f"{what} layer {layer} ({n + 1}/{len(paths)}), elapsed {fmt_seconds(elapsed)}"
              + (f", ETA {fmt_seconds(eta)}" if n else ""), file=sys.stderr, flush=True)
        header, packed = read_checked(layer, path, shas.get(path))
        yield LayerMatrix(layer, header.width, header.trials, packed)


def metadata(run_dir: str) -> dict:
    """The run's root attributes from summary.h5 ({} for folders of the original tool)."""
    if not summary.exists(run_dir):
        return {}
    attrs, _ = summary.read_summary(os.path.join(run_dir, summary.SUMMARY))
    return attrs


def run_label(run_dir: str, expert: int | None = None) -> str:
    """What the figures' titles add to say which counts they show: the expert, and the firing rule from
    summary.h5 (|x| >= T; a head's output norm for --site heads). The original tool's folders record none."""
    parts = [f"expert {expert}"] if expert is not None else []
    if summary.exists(run_dir):
        import h5py

        with h5py.File(os.path.join(run_dir, summary.SUMMARY), "r") as h5:
            attrs = dict(h5.attrs)
        if "threshold" in attrs:
            what = "head norm" if str(attrs.get("site", "")) == "heads" else "|x|"
            parts.append(f"{what} ≥ {float(attrs['threshold']):g}")
    return ", ".join(parts)


def firing(run_dir: str, layers: str | None = None, expert: int | None = None) -> list[LayerFiring]:
    """Per-layer firing counts (--layers selects; --expert E: that expert's): from summary.h5 when present,
    else the matrix diagonals."""
    paths = select(matrix_paths(run_dir, expert), layers)
    if summary.exists(run_dir):
        found = summary_entries(run_dir, expert)
        return [LayerFiring(l, int(e["attrs"]["tokens"]), e["fire_count"]) for l, e in found.items() if l in paths]
    out = []
    for layer, path in paths.items():
        header, packed = read_checked(layer, path)
        out.append(LayerFiring(layer, header.trials, layout.diagonal(packed, header.width)))
    return out


def activation_histograms(run_dir: str, layers: str | None = None,
                          expert: int | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{layer: (act_hist, act_hist_edges)} from summary.h5 (the original tool's folders have none)."""
    if not summary.exists(run_dir):
        raise UserError(f"{run_dir}: no summary.h5, so no activation histograms (the original tool wrote none)")
    paths = select(matrix_paths(run_dir, expert), layers)
    found = summary_entries(run_dir, expert)
    if any("act_hist" not in e for e in found.values()):
        raise UserError(f"{run_dir}: summary.h5 has no act_hist (written by an older mpicorr); rerun to get one")
    return {l: (e["act_hist"], e["act_hist_edges"]) for l, e in found.items() if l in paths}


@dataclass(frozen=True)
class Router:
    """One MoE block's routing: tokens, per-expert load and co-selection counts (summary.h5 routers/<L>)."""

    layer: int
    tokens: int
    load: np.ndarray       # [E] tokens that chose each expert
    coselect: np.ndarray   # [E, E] tokens that chose both
    top_k: int = 0         # experts each token chooses (summary.h5's selected_per_token; 0: not recorded)

    def random_lift(self) -> float:
        """The lift of every pair when each token chooses its top_k of the E experts at random: (k - 1) E /
        (k (E - 1)), not 1, since exactly k are chosen (4/7 for 2 of 8); 1 where top_k is not recorded."""
        experts = len(self.load)
        if self.top_k < 1 or experts < 2:
            return 1.0
        return (self.top_k - 1) * experts / (self.top_k * (experts - 1))

    def lift(self) -> np.ndarray:
        """P(i and j chosen) / (P(i) P(j)): 1 = independent choices, > 1 chosen together; NaN on the diagonal
        and for unused experts."""
        load = self.load.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = self.coselect.astype(np.float64) * self.tokens / np.outer(load, load)
        lift[~np.isfinite(lift)] = np.nan
        np.fill_diagonal(lift, np.nan)
        return lift


def routers(run_dir: str, layers: str | None = None) -> list[Router]:
    """The routing of each MoE block (--layers selects) from summary.h5."""
    if os.path.isdir(run_dir):
        outputs.check_settled(run_dir)
    if not summary.exists(run_dir):
        raise UserError(f"{run_dir}: no summary.h5; router counts are only in runs written by mpicorr")
    _, found = summary.read_moe(os.path.join(run_dir, summary.SUMMARY))
    if not found:
        raise UserError(f"{run_dir}: no router counts; the run's model has no mixture-of-experts blocks")
    chosen = select({layer: "" for layer in found}, layers, "router (not an MoE block)")
    return [Router(l, int(e["attrs"]["tokens"]), e["load"].astype(np.int64), e["coselect"].astype(np.int64),
                   int(e["attrs"].get("selected_per_token", 0))) for l, e in found.items() if l in chosen]


def powerlaw_exponent(fire_count: np.ndarray) -> float:
    """α of count ∝ rank^-α, a least-squares line through the log-log rank-frequency plot (nonzero counts)."""
    counts = np.sort(fire_count[fire_count > 0].astype(np.float64))[::-1]
    if len(counts) < 2:
        return float("nan")
    ranks = np.arange(1, len(counts) + 1, dtype=np.float64)
    slope = np.polyfit(np.log(ranks), np.log(counts), 1)[0]
    return float(-slope)


def coverage_curve(fire_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share of neurons, share of all firings they make), most frequent neurons first."""
    counts = np.sort(fire_count.astype(np.float64))[::-1]
    total = counts.sum()
    x = np.arange(1, len(counts) + 1) / len(counts)
    y = np.cumsum(counts) / total if total else np.zeros_like(x)
    return x, y


def heatmap(packed: np.ndarray, width: int, trials: int, order: np.ndarray, pixels: int,
            kind: str = "lift") -> np.ndarray:
    """[p, p] image (p = min(width, pixels)) of a measure, neurons in `order`, averaged over square blocks.

    The diagonal (a neuron with itself: lift 1/P(i), cond 1) is left out of the means, so that it does not
    drown the pairs, and so are undefined cells (lift, cond, jaccard of a neuron that never fires; phi of one
    that never or always fires): a pixel with no defined cell (the diagonal at full resolution, a run of
    never-firing neurons) is NaN, which the figures draw as undefined."""
    p = min(width, pixels)
    edges = np.linspace(0, width, p + 1).astype(np.int64)
    diag = layout.diagonal(packed, width).astype(np.float64)[order]
    image = np.zeros((p, p))
    for b in range(p):
        rows = layout.rows_at(packed, order[edges[b] : edges[b + 1]], order)
        block = measures.pair_measure(rows, diag[edges[b] : edges[b + 1], None], diag[None, :], trials, kind)
        block[np.arange(len(block)), np.arange(edges[b], edges[b + 1])] = np.nan
        defined = np.isfinite(block)
        sums = np.add.reduceat(np.where(defined, block, 0.0).sum(0), edges[:-1])
        cells = np.add.reduceat(defined.sum(0), edges[:-1])
        with np.errstate(invalid="ignore", divide="ignore"):
            image[b] = np.where(cells > 0, sums / cells, np.nan)
    return image


def shrink(image: np.ndarray, n: int) -> np.ndarray:
    """A [p, p] heatmap image reduced to [n, n] (n < p) by the means of square blocks of its cells, undefined
    (NaN) cells left out, as heatmap() reduces a layer: drawing more cells than the figure has pixels would
    drop whole rows and columns (nearest-neighbour resampling) rather than average them."""
    p = image.shape[0]
    if n >= p:
        return image
    edges = np.linspace(0, p, n + 1).astype(np.int64)[:-1]
    defined = np.isfinite(image)
    block_sum = lambda a: np.add.reduceat(np.add.reduceat(a, edges, axis=0), edges, axis=1)  # noqa: E731
    sums, cells = block_sum(np.where(defined, image, 0.0)), block_sum(defined.astype(np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cells > 0, sums / cells, np.nan)


def layer_row(layer: int, trials: int, fire_count: np.ndarray) -> dict:
    """Per-layer firing numbers: density, exponent, top-20 % coverage, dead and always-on neurons."""
    width = len(fire_count)
    _, y = coverage_curve(fire_count)
    return {"layer": layer, "width": width, "trials": trials,
            "density": float(fire_count.sum() / max(trials, 1) / max(width, 1)),
            "alpha": powerlaw_exponent(fire_count),
            "coverage20": float(y[max(0, int(np.ceil(0.2 * width)) - 1)]) if width else 0.0,
            "dead": int((fire_count == 0).sum()),
            "always_on": int((fire_count >= trials).sum()) if trials else 0}


def script_parser(doc: str, what: str | None = "outputs", layers: str = "all") -> argparse.ArgumentParser:
    """The arguments analysis scripts share: RUN_DIR, --layers (layers: its default, as --help says) and
    (unless what is None) --out."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder with correlations_block_<L>.zstd (and summary.h5)")
    p.add_argument("--layers", help=f"layers: 3, 0,4,8 or 0-7 (default: {layers})")
    p.add_argument("--expert", type=int, help="MoE models: analyse expert E of each block, from "
                                              "correlations_block_<L>_expert_<E>.zstd (default: the dense blocks)")
    if what is not None:
        p.add_argument("--out", help=f"folder for the {what} (default: RUN_DIR)")
    return p


def script_layers(args: argparse.Namespace) -> dict[int, str]:
    """The selected layers' matrix files; creates the output folder (checked first)."""
    output_folder(args.out)
    paths = select(matrix_paths(args.run_dir, args.expert), args.layers)
    os.makedirs(args.out or args.run_dir, exist_ok=True)
    return paths


def output_name(name: str, expert: int | None) -> str:
    """An analysis file's name; with --expert E, `_expert_<E>` before its extension (as the matrix files have
    it), so that the dense blocks' analysis and each expert's can share a folder without replacing another's."""
    if expert is None:
        return name
    stem, ext = os.path.splitext(name)
    return f"{stem}_expert_{expert}{ext}"


def output_folder(path: str | None, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file (os.makedirs said only '[Errno 17] File
    exists'); a missing one is made later. None: the option was not given."""
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {path}: is a file, not a folder; give a folder (it is made if missing)")


def output_file(path: str | None, option: str) -> None:
    """Refuse, before any work, an output file that is a folder or whose folder does not exist (the write
    would fail only at the end, after the work, naming a temporary file). None: the option was not given."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UserError(f"{option} {path}: is a folder; give a file name")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise UserError(f"{option} {path}: there is no folder {folder}; make it first or give another path")


def run_script(name: str, body) -> int:
    """Run a script's body; a UserError or an unwritable output becomes one line on stderr and exit 2. Output
    piped to a reader that stops early (`| head`) is dropped, not an error: the figures are still written."""
    protect_stdout()
    try:
        return body() or 0
    except (UserError, OSError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2


def frequency_order(packed: np.ndarray, width: int) -> np.ndarray:
    """Neurons by firing count, most frequent first (ties by index)."""
    return np.argsort(-layout.diagonal(packed, width).astype(np.int64), kind="stable")


def threshold_density(act_hist: np.ndarray, edges: np.ndarray, threshold: float) -> float:
    """Share of (token, neuron) values with |x| >= threshold, from a run's act_hist; exact when threshold
    is one of the edges (2**(k/2): 0.25, 0.5, 1, ...), else a UserError naming the nearest edges."""
    k = int(np.searchsorted(edges, np.float32(threshold)))
    if k == len(edges) or edges[k] != np.float32(threshold):
        near = ", ".join(f"{e:g}" for e in edges[max(k - 1, 0) : k + 1])
        raise UserError(f"--thresholds {threshold:g}: not a histogram edge; the nearest are {near}")
    middle = (act_hist.shape[1] - 1) // 2  # the |x| < first-edge bin
    kept = act_hist[:, : middle - k].sum() + act_hist[:, middle + k + 1 :].sum()
    return float(kept / act_hist.sum()) if act_hist.sum() else 0.0
