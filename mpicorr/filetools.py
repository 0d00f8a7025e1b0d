"""`info`, `verify` and `sum` for matrix files (mpicorr's and the original tool's) and run folders.

    python -m mpicorr info runs/a/correlations_block_0.zstd      # or a run folder: every matrix file's header
    python -m mpicorr verify runs/a/*.zstd            # or a run folder: also checks summary.h5's SHA-256s
    python -m mpicorr sum merged.zstd runs/a/correlations_block_0.zstd runs/b/correlations_block_0.zstd
    python -m mpicorr sum runs/all runs/a runs/b      # run folders: every layer and a merged summary.h5
"""

from __future__ import annotations

import os
import re

import numpy as np

from . import __version__, layout, matrixfile, plan, summary
from .config import threshold_folders
from .errors import UserError
from .units import Unit

DUMP_INDEX = "index.json"  # predictor_data.INDEX, named here so that the file tools need not import torch


def is_dump(folder: str) -> bool:
    """Whether a folder holds a --dump, finished (an index) or not (shards only), for `sum`."""
    return os.path.isdir(folder) and any(n == DUMP_INDEX or n.startswith("shard-") for n in os.listdir(folder))


# Root attributes that runs must share to be merged, and the option that sets each.
SAME_RUN = {"model": "--model", "data_sha256": "--data", "ctx": "--ctx", "threshold": "--threshold",
            "site": "site", "site_modules": "--model (its layers)"}


def info(path: str) -> str:
    """One line describing a matrix file's header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(matrixfile.HEADER.size)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    h = matrixfile.parse_header(head, path)
    kind = "uint32" if h.magic == matrixfile.MAGIC32 else "uint64"
    return (f"{path}: block {h.block}, width {h.width}, trials {h.trials}, {kind} counts, "
            f"{os.path.getsize(path)} bytes")


def info_run(folder: str) -> str:
    """info() of every matrix file of a run folder, in block (then expert) order; for a run that counted
    several thresholds, of each threshold-<T> subfolder."""
    names = matrixfile.exists_any(folder)
    if not names and threshold_folders(folder):
        return "\n".join(info_run(part) for part in threshold_folders(folder))
    if not names:
        raise UserError(f"{folder}: no correlations_block_<L>.zstd files; give a run folder or matrix files")
    order = sorted(names, key=lambda name: [int(n) for n in re.findall(r"\d+", name)])
    return "\n".join(info(os.path.join(folder, name)) for name in order)


def verify(path: str, sha256: str | None = None) -> None:
    """Read the file fully and check its counts are consistent (and its SHA-256 when given); raise
    UserError on the first problem."""
    header, packed = matrixfile.read_matrix(path, sha256)
    diag = layout.diagonal(packed, header.width).astype(np.int64)
    if (diag > header.trials).any():
        i = int(np.argmax(diag > header.trials))
        raise UserError(f"{path}: neuron {i} fired {diag[i]} times in {header.trials} trials")
    for r0, r1, rows in layout.full_row_blocks(packed, header.width):
        bad = (rows > diag[None, :]) | (rows > diag[r0:r1, None])
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise UserError(f"{path}: C[{r0 + i}, {j}] = {rows[i, j]} exceeds a diagonal count "
                            f"({diag[r0 + i]}, {diag[j]})")


def sum_files(out: str, inputs: list[str], force: bool = False) -> str:
    """Add matrix files of one block and width (trials added) into `out`; return a summary line."""
    if os.path.exists(out) and not force:
        raise UserError(f"{out}: exists; choose another output name or add --force")
    total, first, trials = None, None, 0
    for path in inputs:
        header, packed = matrixfile.read_matrix(path)
        if first is None:
            first, total = header, packed.astype(np.uint64)
        elif (header.block, header.width) != (first.block, first.width):
            raise UserError(f"{path}: block {header.block} width {header.width} does not match "
                            f"{inputs[0]} (block {first.block} width {first.width}); sum one block at a time")
        else:
            total += packed
        trials += header.trials
    matrixfile.write_matrix(out, first.block, first.width, trials, total)
    return f"{out}: {len(inputs)} files summed, block {first.block}, width {first.width}, trials {trials}"


def verify_run(folder: str) -> str:
    """Verify every matrix file of a run folder and compare it with the SHA-256 recorded in summary.h5
    (each threshold-<T> subfolder of a run that counted several thresholds)."""
    parts = threshold_folders(folder)
    if parts and not summary.exists(folder):
        return "\n".join(verify_run(part) for part in parts)
    root, layers = read_run(folder)
    experts, _ = summary.read_moe(os.path.join(folder, summary.SUMMARY))
    for unit, entry in [*((Unit(k), e) for k, e in layers.items()), *((Unit(*k), e) for k, e in experts.items())]:
        path = os.path.join(folder, matrixfile.matrix_name(unit.layer, unit.expert))
        verify(path, entry["attrs"].get("matrix_sha256"))
    moe = f", {len(experts)} experts" if experts else ""
    return f"{folder}: ok, {len(layers)} layers{moe}, {root['chunks']} chunks"


def read_run(folder: str) -> tuple[dict, dict[int, dict]]:
    """summary.h5 of a run folder, as a UserError-clean read."""
    path = os.path.join(folder, summary.SUMMARY)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no {summary.SUMMARY}; give a run folder written by mpicorr")
    try:
        return summary.read_summary(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc}); the file is damaged") from None


def run_ranges(root: dict) -> list[plan.Batch]:
    """The chunk ranges a run counted."""
    ranges = root.get("chunk_ranges")
    if ranges is None:
        return [(root["chunk_start"], root["chunk_start"] + root["chunks"])]
    return [(int(a), int(b)) for a, b in np.asarray(ranges).reshape(-1, 2)]


# How the data was cut into chunks (issue 15) must match too; runs from before the attribute existed are concat.
SAME_RUN["chunking"] = "--chunking"
SAME_RUN_DEFAULTS = {"chunking": "concat"}
CORPUS_KEYS = ("chunking", "text_field", "data_shards", "data_manifest", "max_tokens")  # kept by a merge


def check_mergeable(inputs: list[str], roots: list[dict]) -> list[plan.Batch]:
    """Refuse runs of different experiments or overlapping chunks; return the merged chunk ranges."""
    for path, root in zip(inputs[1:], roots[1:]):
        for key, option in SAME_RUN.items():
            default = SAME_RUN_DEFAULTS.get(key)
            if _norm(root.get(key, default)) != _norm(roots[0].get(key, default)):
                raise UserError(f"{path}: different {option} from {inputs[0]} ({key} {root.get(key)!r} vs "
                                f"{roots[0].get(key)!r}); only runs of one model, data and threshold add up")
    seen: list[tuple[plan.Batch, str]] = []
    for path, root in zip(inputs, roots):
        if "nll_fixed" not in root:
            raise UserError(f"{path}: summary.h5 lacks the raw sums (written by an older mpicorr); count it again")
        for a, b in run_ranges(root):
            for (c, d), other in seen:
                if a < d and c < b:
                    raise UserError(f"{path}: chunks [{max(a, c)}, {min(b, d)}) were also counted in {other}; "
                                    f"merging would count them twice")
            seen.append(((a, b), path))
    return plan.merge_ranges([r for r, _ in seen])


def _norm(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def sum_runs(out: str, inputs: list[str], force: bool = False, command: str = "python -m mpicorr sum") -> str:
    """Merge run folders into `out`: matrices added, summary.h5 recomputed from the summed raw sums. Runs that
    counted several thresholds are merged per threshold, into OUT/threshold-<T>."""
    names = threshold_names(inputs)
    if names:
        return "\n".join(sum_runs(os.path.join(out, name), [os.path.join(f, name) for f in inputs], force, command)
                         for name in names)
    runs = [read_run(folder) for folder in inputs]
    roots = [root for root, _ in runs]
    ranges = check_mergeable(inputs, roots)
    if (matrixfile.exists_any(out) or summary.exists(out)) and not force:
        raise UserError(f"{out}: already holds outputs; choose another folder or add --force")
    os.makedirs(out, exist_ok=True)
    tokens = sum(int(r["tokens"]) for r in roots)
    moe = [summary.read_moe(os.path.join(folder, summary.SUMMARY)) for folder in inputs]
    with summary.summary_writer(os.path.join(out, summary.SUMMARY)) as h5:
        for layer in runs[0][1]:
            merge_unit(h5, out, Unit(layer), inputs, [layers.get(layer) for _, layers in runs])
        for layer, expert in moe[0][0]:
            merge_unit(h5, out, Unit(layer, expert), inputs, [experts.get((layer, expert)) for experts, _ in moe])
        for layer in moe[0][1]:
            merge_router(h5, Unit(layer, router=True), inputs, [routers.get(layer) for _, routers in moe])
        h5.attrs.update({**merged_attributes(inputs, roots, ranges, tokens), "command": command})
    gaps = [(b, c) for (_, b), (c, _) in zip(ranges, ranges[1:])]  # merged ranges: all neighbours have gaps
    gap_text = "; gap (counted by no input): " + plan.format_ranges(gaps) if gaps else ""
    return (f"{out}: {len(inputs)} runs merged, chunks {plan.format_ranges(ranges)}, {tokens} tokens, "
            f"{len(runs[0][1])} layers{gap_text}")


def threshold_names(inputs: list[str]) -> list[str]:
    """The threshold-<T> subfolder names shared by run folders of several thresholds ([] for plain runs)."""
    found = [[os.path.basename(p) for p in threshold_folders(f)] if not summary.exists(f) else [] for f in inputs]
    for path, names in zip(inputs[1:], found[1:]):
        if names != found[0]:
            raise UserError(f"{path}: thresholds {names or 'of a plain run'} differ from {inputs[0]}'s "
                            f"({found[0] or 'a plain run'}); only runs of the same --threshold add up")
    return found[0]


def merge_unit(h5, out: str, unit: Unit, inputs: list[str], entries: list[dict | None]) -> None:
    """Add one layer's (or expert's) matrix files and raw statistics over the runs and write both."""
    files = [os.path.join(folder, matrixfile.matrix_name(unit.layer, unit.expert)) for folder in inputs]
    width = int(entries[0]["attrs"]["width"])
    total = np.zeros(layout.packed_size(width), dtype=np.uint64)
    stats = {"fire_count": 0, "active_hist": 0, "act_sum": 0, "act_sumsq": 0, "act_hist": 0}
    trials = 0
    for path, entry in zip(files, entries):
        if entry is None or int(entry["attrs"]["width"]) != width:
            raise UserError(f"{path}: {unit.name} is missing or has another width; runs of one model only")
        header, packed = matrixfile.read_matrix(path, entry["attrs"].get("matrix_sha256"))
        if header.width != width or header.trials != int(entry["attrs"]["tokens"]):
            raise UserError(f"{path}: does not match its summary.h5 (width {header.width}, trials "
                            f"{header.trials}); verify the run folder")
        total += packed
        trials += header.trials
        for name, key in (("fire_count", "fire_count"), ("active_hist", "active_hist"),
                          ("act_sum", "act_sum_fixed"), ("act_sumsq", "act_sumsq_fixed"), ("act_hist", "act_hist")):
            stats[name] = stats[name] + entry[key].astype(np.int64)
    sha = matrixfile.write_matrix(os.path.join(out, matrixfile.matrix_name(unit.layer, unit.expert)), unit.layer,
                                  width, trials, total)
    data, attrs = summary.layer_datasets(stats, total, width, trials)
    summary.write_group(h5, summary.group_path(unit), data, {**attrs, "matrix_sha256": sha})


def merge_router(h5, unit: Unit, inputs: list[str], entries: list[dict | None]) -> None:
    """Add one MoE block's router co-selection counts over the runs."""
    if any(entry is None for entry in entries):
        missing = inputs[[entry is None for entry in entries].index(True)]
        raise UserError(f"{missing}: has no router counts for layer {unit.layer}; runs of one model only")
    experts = int(entries[0]["attrs"]["experts"])
    coselect = sum(entry["coselect"].astype(np.uint64) for entry in entries)
    stats = {"fire_count": np.diagonal(coselect).astype(np.int64)}
    tokens = sum(int(entry["attrs"]["tokens"]) for entry in entries)
    packed = coselect[np.tril_indices(experts)]
    summary.write_group(h5, summary.group_path(unit), *summary.router_datasets(stats, packed, experts, tokens))


def merged_attributes(inputs: list[str], roots: list[dict], ranges: list[plan.Batch], tokens: int) -> dict:
    """Root attributes of a merged summary: shared ones from the first run, sums and ranges recomputed."""
    first = roots[0]
    keep = ("model", "data", "data_sha256", "ctx", "threshold", "site", "site_modules", "moe_layers",
            "chunks_available")
    attrs = {key: first[key] for key in keep if key in first}
    attrs.update({key: first[key] for key in CORPUS_KEYS if key in first})
    chunks = sum(b - a for a, b in ranges)
    attrs.update({
        "chunk_start": ranges[0][0], "chunks": chunks, "tokens": tokens,
        "chunk_ranges": np.array(ranges, dtype=np.int64), "merged_from": [os.path.abspath(p) for p in inputs],
        "ranks": sum(int(r.get("ranks", 0)) for r in roots),
        "dtype": ",".join(sorted({str(r.get("dtype")) for r in roots})),
        "mpicorr_version": __version__, "created": summary.now(),
    })
    nll = sum(int(r["nll_fixed"]) for r in roots)
    return {**attrs, **summary.nll_attributes(nll, sum(int(r["predictions"]) for r in roots))}
