"""`summary.h5`: run metadata and per-layer firing statistics (one writer, one reader).

Root attributes describe the run; group `layers/<L>` holds the per-neuron datasets and per-layer
attributes listed in the README.
"""

from __future__ import annotations

import datetime
import math
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import h5py
import numpy as np

from . import layout
from .files import atomic_write
from .units import ACT_SUM_BITS, ACT_SUMSQ_BITS, HIST_BINS, NLL_BITS, hist_edges

SUMMARY = "summary.h5"
TOP_PARTNERS = 16
# Narrower layers find their top partners with numpy (about 0.05 s each; 0.7 s at 2048): numba's start-up
# (about 2 s) would cost a small `sum` more than it saves.
COMPILED_WIDTH = 512


def top_partners(packed: np.ndarray, width: int, k: int = TOP_PARTNERS) -> tuple[np.ndarray, np.ndarray]:
    """For each neuron the k others with the largest C[i, j] > 0 (ties: lower index first), padded -1 / 0.
    Layers of COMPILED_WIDTH neurons or more take the compiled search, narrower ones the numpy path (the
    same arrays)."""
    if width < COMPILED_WIDTH:
        return top_partners_numpy(packed, width, k)
    return top_partners_compiled(packed, width, k)


def top_partners_compiled(packed: np.ndarray, width: int, k: int = TOP_PARTNERS) -> tuple[np.ndarray, np.ndarray]:
    """top_partners in one compiled pass over the triangle (a 14336-wide layer: about 0.5 s instead of 5)."""
    from . import kernels  # here, not at the top: numba takes a second to import, and info/verify never need it

    if not kernels.AVAILABLE:
        return top_partners_numpy(packed, width, k)
    keys = kernels.top_partner_keys(packed, width, k)
    valid = keys >= 0
    return np.where(valid, width - 1 - keys % width, -1), np.where(valid, keys // width, 0).astype(np.uint64)


def top_partners_numpy(packed: np.ndarray, width: int, k: int = TOP_PARTNERS) -> tuple[np.ndarray, np.ndarray]:
    """top_partners without numba, over blocks of full rows."""
    partners = np.full((width, k), -1, dtype=np.int64)
    counts = np.zeros((width, k), dtype=np.uint64)
    j = np.arange(width, dtype=np.int64)
    for r0, r1, block in layout.full_row_blocks(packed, width):
        # Unique keys make the choice deterministic: larger count first, then lower index.
        keys = block * width + (width - 1 - j)[None, :]
        keys[block == 0] = -1
        keys[np.arange(r1 - r0), np.arange(r0, r1)] = -1
        take = min(k, width)
        top = np.argpartition(-keys, take - 1, axis=1)[:, :take] if take < width else np.tile(j, (r1 - r0, 1))
        order = np.argsort(-np.take_along_axis(keys, top, 1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        valid = np.take_along_axis(keys, top, 1) >= 0
        partners[r0:r1, :take] = np.where(valid, top, -1)
        counts[r0:r1, :take] = np.where(valid, np.take_along_axis(block, top, 1), 0)
    return partners, counts


def coverage(fire_count: np.ndarray, share: float) -> float:
    """Share of all firings made by the most frequent `share` of neurons."""
    total = int(fire_count.sum())
    if total == 0:
        return 0.0
    top = max(1, int(np.ceil(share * len(fire_count))))
    return float(np.sort(fire_count)[::-1][:top].sum() / total)


def layer_datasets(stats: dict[str, np.ndarray], packed: np.ndarray, width: int, tokens: int):
    """(datasets, attributes) of one layer group, from reduced raw sums and the packed counts."""
    fire_count = stats["fire_count"].astype(np.uint64)
    partners, partner_counts = top_partners(packed, width)
    data = {
        "fire_count": fire_count,
        "fire_freq": fire_count / max(tokens, 1),
        "active_hist": stats["active_hist"].astype(np.uint64),
        "act_sum": stats["act_sum"] / float(1 << ACT_SUM_BITS),
        "act_sumsq": stats["act_sumsq"] / float(1 << ACT_SUMSQ_BITS),
        "act_sum_fixed": stats["act_sum"].astype(np.int64),      # raw sums: merging runs is exact addition
        "act_sumsq_fixed": stats["act_sumsq"].astype(np.int64),
        "act_hist": stats["act_hist"].astype(np.uint64).reshape(width, HIST_BINS),
        "act_hist_edges": hist_edges(),  # the magnitude edges, the same for every layer and run
        "top_partners": partners,
        "top_partner_counts": partner_counts,
    }
    mean_active = float(fire_count.sum()) / max(tokens, 1)
    attrs = {
        "tokens": tokens,
        "width": width,
        "mean_active": mean_active,
        "density": mean_active / width,
        "dead": int((fire_count == 0).sum()),
        "always_on": int((fire_count == tokens).sum()) if tokens else 0,
        "coverage_top10": coverage(fire_count, 0.10),
        "coverage_top20": coverage(fire_count, 0.20),
    }
    return data, attrs


def perplexity(nll_fixed: int, predictions: int) -> float | None:
    """Perplexity from the fixed-point NLL sum and the number of predictions (None without an LM head)."""
    return math.exp(nll_fixed / float(1 << NLL_BITS) / predictions) if predictions else None


def nll_attributes(nll_fixed: int, predictions: int) -> dict:
    """Root attributes for the log-likelihood: raw fixed-point sum (for merging) and what follows from it."""
    attrs = {"nll_sum": nll_fixed / float(1 << NLL_BITS), "nll_fixed": nll_fixed, "predictions": predictions}
    ppl = perplexity(nll_fixed, predictions)
    return attrs if ppl is None else {**attrs, "perplexity": ppl}


def now() -> str:
    """UTC time stamp for `created`."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextmanager
def summary_writer(path: str) -> Iterator[h5py.File]:
    """An HDF5 file that appears at `path` only when the block ends without error. It is built in memory and
    its image written at the end (files.atomic_write, the bytes HDF5 would have written): HDF5 never writes
    to the disk itself, as it crashes the process when the disk is full."""
    with h5py.File(path, "w", driver="core", backing_store=False) as h5:  # backing_store=False: never opens `path`
        yield h5
        h5.flush()
        image = h5.id.get_file_image()
    with atomic_write(path) as fh:
        fh.write(image)


def router_datasets(stats: dict[str, np.ndarray], packed: np.ndarray, experts: int, tokens: int):
    """(datasets, attributes) of an MoE block's router group, from its reduced sums and packed co-selection."""
    coselect = layout.unpack(packed, experts).astype(np.uint64)
    load = stats["fire_count"].astype(np.uint64)
    return {"coselect": coselect, "load": load}, {
        "tokens": tokens, "experts": experts,
        "selected_per_token": float(load.sum()) / max(tokens, 1),
    }


def group_path(unit) -> str:
    """Where a counting.Unit's group lives: layers/<L>, experts/<L>/<E> or routers/<L>."""
    if unit.router:
        return f"routers/{unit.layer}"
    return f"layers/{unit.layer}" if unit.expert is None else f"experts/{unit.layer}/{unit.expert}"


GZIP_LEVEL = 4  # datasets: HDF5's shuffle then deflate filters, one chunk each


@dataclass(frozen=True)
class Compressed:
    """A dataset already passed through the shuffle and deflate filters (by `compress`, on any thread), for
    HDF5 to store as its one chunk: the file is as if HDF5 had filtered it, without holding h5py's lock."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: bytes


def compress(value: np.ndarray) -> Compressed:
    """The one chunk of a dataset as HDF5's shuffle (bytes grouped by their position in an element) and deflate
    filters write it."""
    value = np.ascontiguousarray(value)
    shuffled = value.view(np.uint8).reshape(-1, value.dtype.itemsize).T.tobytes()
    return Compressed(value.shape, value.dtype, zlib.compress(shuffled, GZIP_LEVEL))


def compress_all(data: dict[str, np.ndarray]) -> dict[str, Compressed | np.ndarray]:
    """`data` with every non-empty array compressed ahead (see Compressed)."""
    return {name: compress(v) if np.size(v) else v for name, v in data.items()}


def write_group(h5: h5py.File, path: str, data: dict[str, np.ndarray | Compressed], attrs: dict) -> None:
    """Add the group at `path` (group_path) with its datasets and attributes."""
    group = h5.create_group(path)
    for name, value in data.items():
        if isinstance(value, Compressed):
            dataset = group.create_dataset(name, shape=value.shape, dtype=value.dtype, chunks=value.shape,
                                           compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True)
            dataset.id.write_direct_chunk((0,) * len(value.shape), value.chunk)
        else:
            group.create_dataset(name, data=value, compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True)
    group.attrs.update(attrs)


def read_summary(path: str) -> tuple[dict, dict[int, dict]]:
    """(root attributes, {layer: {dataset name: array, "attrs": {...}}})."""
    with h5py.File(path, "r") as h5:
        root = {k: _plain(v) for k, v in h5.attrs.items()}
        layers = {int(name): _entry(group) for name, group in h5.get("layers", {}).items()}
    return root, dict(sorted(layers.items()))


def read_moe(path: str) -> tuple[dict[tuple[int, int], dict], dict[int, dict]]:
    """({(layer, expert): entry}, {layer: router entry}) of a summary.h5, entries as read_summary's; empty
    for models without experts."""
    with h5py.File(path, "r") as h5:
        experts = {(int(layer), int(e)): _entry(g) for layer, block in h5.get("experts", {}).items()
                   for e, g in block.items()}
        routers = {int(layer): _entry(g) for layer, g in h5.get("routers", {}).items()}
    return dict(sorted(experts.items())), dict(sorted(routers.items()))


def _entry(group) -> dict:
    """One group's datasets by name, and its attributes under "attrs"."""
    entry = {k: group[k][()] for k in group}
    entry["attrs"] = {k: _plain(v) for k, v in group.attrs.items()}
    return entry


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def exists(folder: str) -> bool:
    """True when `folder` already holds a summary."""
    return os.path.exists(os.path.join(folder, SUMMARY))
