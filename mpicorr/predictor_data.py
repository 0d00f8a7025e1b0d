"""The one reader of --dump folders (predictor training data): the index, the shards, a Dataset per layer.

    from mpicorr.predictor_data import LayerData
    data = LayerData("runs/dump", layer=5)      # memory-mapped; item i: (MLP input [d], fired [N] bool)
    x, fired = data.take(range(1024))           # a batch: [1024, d] in the run's dtype, [1024, N] bool

Tokens come in the order of their global position (chunk * ctx + offset), whatever ranks or shards wrote
them, so two dumps of the same tokens read the same. The format (README, "Predictor training data") needs
no mpicorr: index.json, and safetensors shards holding `positions` and per layer `layer_<L>.input`,
`layer_<L>.mask` (bits little-endian within each byte: neuron i is bit i % 8 of byte i // 8) and optionally
`layer_<L>.values`.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch

from .errors import UserError
from .filetools import DUMP_INDEX as INDEX, is_dump  # noqa: F401  (torch-free: `sum` asks before torch)

FORMAT = "mpicorr-dump-1"
SHARD_FORMAT = "mpicorr-dump-shard-1"
RULE = "position p = chunk * ctx + offset is dumped iff splitmix64(p) < bound"
# safetensors dtype -> (numpy dtype the bytes are mapped as, torch dtype they are); bfloat16 as raw uint16
DTYPES = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16),
          "F32": (np.float32, torch.float32), "U8": (np.uint8, torch.uint8), "I64": (np.int64, torch.int64)}
KEYS = ("format", "model", "data_sha256", "ctx", "chunk_ranges", "thresholds", "dtype", "values", "tokens",
        "sample", "layers", "shards")


def read_index(folder: str) -> dict:
    """The index of a dump folder; UserError if it is missing or not a dump's."""
    path = os.path.join(folder, INDEX)
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{folder}: no {INDEX}; give a folder written by 'mpicorr run --dump' that finished "
                        f"(an interrupted run writes its index on --resume)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc}); the file is damaged") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or any(k not in index for k in KEYS):
        raise UserError(f"{path}: not a dump index ({FORMAT}); give a folder written by 'mpicorr run --dump'")
    return index


def shard_header(path: str) -> tuple[dict, dict, int]:
    """(tensor specs, metadata, offset of the data) of a safetensors shard."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > os.path.getsize(path) - 8:
                raise ValueError("header length exceeds the file")
            head = json.loads(fh.read(n))
        meta = head.pop("__metadata__", {})
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"not a {SHARD_FORMAT} shard")
        return head, meta, 8 + n
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"{path}: cannot read this dump shard ({exc}); it is damaged or missing: dump again") from None


def shard_array(path: str, name: str) -> tuple[np.ndarray, torch.dtype]:
    """One tensor of a shard, memory-mapped (bfloat16 as its raw uint16 bits), and its torch dtype."""
    head, _, start = shard_header(path)
    if name not in head:
        raise UserError(f"{path}: no tensor '{name}'; the shard does not match its index: dump again")
    spec = head[name]
    begin, end = spec["data_offsets"]
    if spec["dtype"] not in DTYPES:
        raise UserError(f"{path}: tensor '{name}' has dtype {spec['dtype']}, which a dump never holds")
    dtype, kind = np.dtype(DTYPES[spec["dtype"]][0]), DTYPES[spec["dtype"]][1]
    if end - begin != int(np.prod(spec["shape"])) * dtype.itemsize or start + end > os.path.getsize(path):
        raise UserError(f"{path}: tensor '{name}' is truncated; dump again")
    if end == begin:
        return np.empty(spec["shape"], dtype), kind
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=tuple(spec["shape"])), kind


def shard_entry(path: str) -> dict:
    """The index entry of a shard: file name, tokens, the chunk ranges it covers."""
    head, meta, _ = shard_header(path)
    ranges = [tuple(r) for r in json.loads(meta.get("chunk_ranges", "[]"))]
    return {"file": os.path.basename(path), "tokens": int(head["positions"]["shape"][0]), "chunk_ranges": ranges}


def shard_positions(path: str) -> np.ndarray:
    """The global positions of a shard's tokens."""
    return np.asarray(shard_array(path, "positions")[0])


class LayerData(torch.utils.data.Dataset):
    """One layer of a dump, memory-mapped: item i is (MLP input [hidden] in the run's dtype, fired [width]
    bool at `threshold`) of the i-th dumped token by position, plus its recorded values [width] with
    `values=True` (dumps made with --dump-values)."""

    def __init__(self, folder: str, layer: int, threshold: float | None = None, values: bool = False):
        self.index = index = read_index(folder)
        specs = {s["layer"]: s for s in index["layers"]}
        if layer not in specs:
            raise UserError(f"{folder}: no layer {layer} (layers {min(specs)}-{max(specs)})")
        thresholds = index["thresholds"]
        if threshold is not None and threshold not in thresholds:
            raise UserError(f"{folder}: no threshold {threshold} (thresholds: {', '.join(map(str, thresholds))})")
        if values and not index["values"]:
            raise UserError(f"{folder}: made without --dump-values; no values to read")
        self.layer, self.hidden, self.width = layer, specs[layer]["hidden"], specs[layer]["width"]
        self.threshold = thresholds[0] if threshold is None else threshold
        self.slot, self.values = thresholds.index(self.threshold), values
        self.dtype = getattr(torch, index["dtype"])
        self.shards = [self._open(os.path.join(folder, e["file"]), e["tokens"]) for e in index["shards"]]
        positions = np.concatenate([s["positions"] for s in self.shards]) if self.shards else np.empty(0, np.int64)
        order = np.argsort(positions, kind="stable")
        self.positions = positions[order]
        which = np.concatenate([np.full(len(s["positions"]), k) for k, s in enumerate(self.shards)]) \
            if self.shards else np.empty(0, np.int64)
        rows = np.concatenate([np.arange(len(s["positions"])) for s in self.shards]) if self.shards else which
        self.shard_of, self.row_of = which[order], rows[order]

    def _open(self, path: str, tokens: int) -> dict:
        names = {"positions": "positions", "input": f"layer_{self.layer}.input", "mask": f"layer_{self.layer}.mask"}
        if self.values:
            names["values"] = f"layer_{self.layer}.values"
        found = {k: shard_array(path, v) for k, v in names.items()}
        arrays = {k: array for k, (array, _) in found.items()}
        self.dtypes = {k: kind for k, (_, kind) in found.items()}  # the same in every shard of a dump
        want = {"positions": (tokens,), "input": (tokens, self.hidden),
                "mask": (tokens, len(self.index["thresholds"]), -(-self.width // 8)), "values": (tokens, self.width)}
        for key, array in arrays.items():
            if array.shape != want[key]:
                raise UserError(f"{path}: {names[key]} has shape {array.shape}, the index says {want[key]}")
        return arrays

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[0] for t in self.take([i]))

    def take(self, indices) -> tuple[torch.Tensor, ...]:
        """A batch of items: inputs [k, hidden], fired [k, width] bool (and values [k, width])."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shard, row = self.shard_of[idx], self.row_of[idx]
        parts = ["input", "mask", *(["values"] if self.values else [])]
        out = {p: None for p in parts}
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            for p in parts:
                got = self.shards[k][p][row[sel]] if p != "mask" else self.shards[k][p][row[sel], self.slot]
                if out[p] is None:
                    out[p] = np.empty((len(idx), *got.shape[1:]), got.dtype)
                out[p][sel] = got
        if out["input"] is None:  # no items
            return (torch.empty(0, self.hidden, dtype=self.dtype), torch.empty(0, self.width, dtype=torch.bool),
                    *([torch.empty(0, self.width, dtype=self.dtype)] if self.values else []))
        fired = np.unpackbits(out["mask"], axis=-1, count=self.width, bitorder="little").astype(bool)
        result = [self._tensor(out["input"], "input"), torch.from_numpy(fired)]
        if self.values:
            result.append(self._tensor(out["values"], "values"))
        return tuple(result)

    def _tensor(self, array: np.ndarray, part: str) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.view(torch.bfloat16) if self.dtypes[part] == torch.bfloat16 else tensor
