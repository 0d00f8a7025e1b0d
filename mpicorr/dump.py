"""--dump: training data for activation predictors, written by the counting pass itself.

    python -m mpicorr run --model M --data wiki.test.raw --dump runs/dump --dump-tokens 400000

Tokens are sampled by a hash of their global position (chunk * ctx + offset), so a run dumps the same tokens
for any number of ranks, either schedule, any resume and any --part split. For each sampled token and layer,
each rank keeps the hidden state entering the block's MLP (models.MLP_INPUTS, in the run's dtype) and the
firing mask at every threshold, bit-packed, computed by counting.fired from the very tensor the counts see
(optionally that tensor itself, --dump-values). Each rank writes its own shards, atomically, whenever a
checkpoint is written (so a resume knows which shards its checkpoints cover) and every SHARD_BYTES; rank 0
writes index.json once every shard is on disk. Format: README, "Predictor training data"; the one reader is
mpicorr.predictor_data.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

from . import __version__, filetools, models, outputs, plan, predictor_data, summary
from .config import Config
from .counting import fired
from .errors import UserError
from .files import atomic_path, atomic_write, temporary

INDEX, FORMAT, SHARD_FORMAT = predictor_data.INDEX, predictor_data.FORMAT, predictor_data.SHARD_FORMAT
ALL = 1 << 64          # a bound above every key: every token is dumped
BLOCK = 1 << 22        # positions hashed at a time while drawing the sample (32 MB of keys)
SHARD_BYTES = 1 << 30  # a rank writes a shard once it holds this much (host memory), or at each checkpoint
FILES = r"index\.json|shard-[\w-]+\.safetensors"  # a dump's files; OURS adds their temporaries
OURS = re.compile(rf"{FILES}|{temporary(FILES)}")
GB = 1e9


def keys(positions: np.ndarray) -> np.ndarray:
    """splitmix64 of each position (uint64). A bijection of 64-bit integers: distinct positions never tie."""
    z = positions.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def chosen(lo: int, hi: int, bound: int) -> np.ndarray:
    """The dumped positions in [lo, hi), ascending (int64): those whose key is below `bound`."""
    if hi - lo > BLOCK:
        return np.concatenate([chosen(a, min(a + BLOCK, hi), bound) for a in range(lo, hi, BLOCK)])
    positions = np.arange(lo, hi, dtype=np.int64)
    return positions if bound >= ALL else positions[keys(positions) < np.uint64(bound)]


def count_chosen(lo: int, hi: int, bound: int) -> int:
    """How many positions of [lo, hi) are dumped, hashed a block at a time."""
    return sum(len(chosen(a, min(a + BLOCK, hi), bound)) for a in range(lo, hi, BLOCK))


def bound_for(tokens: int | None, rate: float | None, lo: int, hi: int) -> int:
    """The key bound of a sample of [lo, hi): R * 2**64 for a rate, else one above the `tokens`-th smallest key
    (every position when there are no more than `tokens`)."""
    if rate is not None:
        return min(ALL, int(rate * 2.0**64))
    if tokens >= hi - lo:
        return ALL
    best = np.empty(0, dtype=np.uint64)
    for a in range(lo, hi, BLOCK):
        found = np.concatenate([best, keys(np.arange(a, min(a + BLOCK, hi), dtype=np.int64))])
        best = np.partition(found, tokens - 1)[:tokens] if len(found) > tokens else found
    return int(best.max()) + 1


@dataclass(frozen=True)
class LayerSpec:
    """One dumped layer: its MLP input (`hidden` wide, the input of `input_module`) and its `width` neurons
    (the recorded tensor of `site_module`)."""

    layer: int
    hidden: int
    width: int
    input_module: str
    site_module: str


@dataclass(frozen=True)
class Sample:
    """What rank 0 decides before the run, broadcast in the Job: which tokens are dumped, and where."""

    folder: str
    tokens: int | None             # --dump-tokens
    rate: float | None             # --dump-rate
    universe: tuple[int, int]      # the chunk range the sample is drawn from (before --part)
    bound: int                     # position p is dumped iff keys(p) < bound
    count: int                     # tokens this run dumps (its chunks only)
    values: bool
    family: str                    # config.model_type
    layers: tuple[LayerSpec, ...]
    kept: tuple[dict, ...] = ()    # index entries of shards an interrupted attempt wrote, kept on --resume


def layer_specs(model: torch.nn.Module, site: str) -> tuple[LayerSpec, ...]:
    """Each block's MLP input and recorded site; a family without an MLP_INPUTS entry is a UserError."""
    inputs = models.find_mlp_inputs(model)
    sites = models.find_sites(model, None, site)
    hidden = model.config.hidden_size
    return tuple(LayerSpec(s.layer, hidden, s.width, inputs[s.layer][0], s.name) for s in sites)


def run_dtype(cfg: Config) -> str:
    """The dtype the run will have on rank 0's device (--dtype auto: 2 bytes on a GPU, float32 on a CPU)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if cfg.device != "cpu" and torch.cuda.is_available() else "float32"


def token_bytes(layers: tuple[LayerSpec, ...], itemsize: int, thresholds: int, values: bool) -> dict[str, int]:
    """Bytes one dumped token takes, by part."""
    return {"inputs": sum(s.hidden for s in layers) * itemsize,
            "masks": sum(thresholds * math.ceil(s.width / 8) for s in layers),
            "values": sum(s.width for s in layers) * itemsize if values else 0, "positions": 8}


def describe(sample: Sample, cfg: Config, dtype: str) -> tuple[str, int]:
    """(one line on the dump's size, its total in bytes) for `plan` and the budget check."""
    parts = token_bytes(sample.layers, torch.finfo(getattr(torch, dtype)).bits // 8, len(cfg.threshold),
                        sample.values)
    total = sample.count * sum(parts.values())
    shown = ", ".join(f"{k} {human(sample.count * v)}" for k, v in parts.items() if v and k != "positions")
    return (f"{sample.count:,} tokens x {len(sample.layers)} layers into {sample.folder}: "
            f"{human(total)} at {dtype} ({shown})"), total


def human(size: float) -> str:
    """A byte count as 127.8 GB, 3.1 MB, 21.7 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} bytes"


def plan_sample(cfg: Config, available: int, start: int, count: int) -> Sample:
    """Rank 0, before the run: draw the sample and check the registry, the folder and the budget. Writes
    nothing."""
    sample = draw(cfg, available, start, count)
    check_sample(cfg, sample)
    return sample


def draw(cfg: Config, available: int, start: int, count: int) -> Sample:
    """The sample of a run over chunks [start, start + count) (after --part) of a data file of `available`
    chunks, and the layers' shapes (a family without an MLP_INPUTS entry is a UserError)."""
    first = cfg.chunk_start
    universe = (first, first + (cfg.chunks if cfg.chunks is not None else available - first))
    bound = bound_for(cfg.dump_tokens, cfg.dump_rate, universe[0] * cfg.ctx, universe[1] * cfg.ctx)
    model = models.meta_model(cfg.model)
    sample = Sample(cfg.dump, cfg.dump_tokens, cfg.dump_rate, universe, bound,
                    count_chosen(start * cfg.ctx, (start + count) * cfg.ctx, bound), cfg.dump_values,
                    model.config.model_type, layer_specs(model, cfg.site))
    return sample


def check_sample(cfg: Config, sample: Sample) -> None:
    """The budget (--dump-max-gb), the folder and the free space on its filesystem."""
    line, size = describe(sample, cfg, run_dtype(cfg))
    if cfg.dump_max_gb is not None and size > cfg.dump_max_gb * GB:
        raise UserError(f"--dump-max-gb {cfg.dump_max_gb:g}: the dump would exceed it ({line}); lower "
                        f"--dump-tokens/--dump-rate, leave out --dump-values, or raise the budget")
    check_folder(cfg.dump, cfg.force, cfg.resume)
    free = shutil.disk_usage(existing_parent(cfg.dump)).free
    if os.path.isdir(cfg.dump):  # shards there now are kept (--resume) or replaced (--force)
        free += sum(os.path.getsize(os.path.join(cfg.dump, n)) for n in os.listdir(cfg.dump))
    if size > free:
        raise UserError(f"--dump {cfg.dump}: the dump needs more than the {human(free)} free on its filesystem "
                        f"({line}); free space, choose another folder or dump fewer tokens")


def existing_parent(path: str) -> str:
    """`path` or its nearest existing ancestor (whose filesystem the dump will use)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_folder(folder: str, force: bool, resume: bool, merging: bool = False) -> None:
    """Refuse a dump folder that holds files, unless --force (replace a dump) or --resume (continue one), and
    a folder with files mpicorr did not write in any case. `merging`: the folder is `sum`'s output (the lines
    name `sum FOLDER`, and offer no --resume)."""
    label = f"sum {folder}" if merging else f"--dump {folder}"
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{label}: exists and is not a folder; choose a new folder")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    names = [n for n in names if not filetools.STAGING_NAME.fullmatch(n)]  # a sum's staging folder: not a file
    foreign = sorted(n for n in names if not OURS.fullmatch(n))
    if foreign:
        raise UserError(f"{label}: holds files that are not a dump ({', '.join(foreign[:3])}); choose an "
                        f"empty or new folder")
    if names and not force and not resume:
        resume_hint = "" if merging else ", or --resume to continue its run"
        raise UserError(f"{label}: already holds a dump; choose another folder, add --force to replace "
                        f"it{resume_hint}")


def open_folder(sample: Sample, ctx: int, resume: bool, finished: list[plan.Batch],
                held: ExitStack | None = None) -> Sample:
    """Rank 0, once every check has passed: create the folder and lock it until `held` closes (another run
    dumping there now is refused), emptied of an earlier dump, or on --resume keep the shards the live
    checkpoints cover (`finished`) and delete the rest. The sample with the kept shards."""
    made = outputs.make_folder(sample.folder, "--dump")
    if not os.access(sample.folder, os.W_OK):
        raise UserError(f"--dump {sample.folder}: folder is not writable; choose another folder")
    if held is not None:
        held.enter_context(outputs.locked(sample.folder, "--dump"))
        held.enter_context(outputs.removed_if_failed(made))  # a run that fails before dumping leaves none
    if resume and not finished and os.path.exists(os.path.join(sample.folder, INDEX)):
        raise UserError(f"--dump {sample.folder}: holds a finished dump, and no checkpoint of an interrupted "
                        f"run in --out covers it; choose another folder, or --force to replace it")
    kept = []
    for name in sorted(os.listdir(sample.folder)):
        path = os.path.join(sample.folder, name)
        if resume and name.startswith("shard-"):
            entry = predictor_data.shard_entry(path)
            inside = sum(b - a for a, b in entry["chunk_ranges"]) == overlap(entry["chunk_ranges"], finished)
            if inside:
                kept.append(entry)
                continue
            if overlap(entry["chunk_ranges"], finished):
                raise UserError(f"{path}: holds chunks both finished and not; start over with --force")
        os.remove(path)  # an unfinished attempt's shard, the index, a temporary file, or --force
    check_kept(sample, ctx, kept, finished)
    return replace(sample, kept=tuple(kept))


def overlap(ranges: list[plan.Batch], finished: list[plan.Batch]) -> int:
    """Chunks of `ranges` that `finished` covers."""
    return sum(max(0, min(b, d) - max(a, c)) for a, b in ranges for c, d in plan.merge_ranges(finished))


def check_kept(sample: Sample, ctx: int, kept: list[dict], finished: list[plan.Batch]) -> None:
    """The kept shards must hold exactly the sampled tokens of the finished chunks."""
    want = [chosen(a * ctx, b * ctx, sample.bound) for a, b in plan.merge_ranges(finished)]
    want = np.concatenate(want) if want else np.empty(0, np.int64)
    got = [predictor_data.shard_positions(os.path.join(sample.folder, e["file"])) for e in kept]
    got = np.sort(np.concatenate(got)) if got else np.empty(0, np.int64)
    if not np.array_equal(want, got):
        raise UserError(f"--dump {sample.folder}: holds {len(got)} tokens of the finished chunks, expected "
                        f"{len(want)}; its shards were changed or deleted: start over with --force")


class Dumper:
    """One rank's dump: the hooks hand it each layer's MLP input and recorded tensor within `batch`; it keeps
    the sampled rows in host memory and writes them as a shard on `flush`."""

    def __init__(self, sample: Sample, ctx: int, thresholds: tuple[float, ...], rank: int, generation: int,
                 dtype: torch.dtype):
        self.sample, self.ctx, self.thresholds, self.dtype = sample, ctx, thresholds, dtype
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.prefix = f"shard-g{generation}-r{rank}"
        self.written: list[dict] = []
        self.rows: torch.Tensor | None = None
        self._empty()

    def _empty(self) -> None:
        self.positions: list[np.ndarray] = []
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.covered: list[plan.Batch] = []
        self.held = 0

    @contextmanager
    def batch(self, b0: int, b1: int) -> Iterator[None]:
        """Around one forward pass of chunks [b0, b1): the hooks fill in every layer's sampled rows."""
        positions = chosen(b0 * self.ctx, b1 * self.ctx, self.sample.bound)
        self.rows, self.tokens, self.seen = torch.from_numpy(positions - b0 * self.ctx), (b1 - b0) * self.ctx, set()
        yield
        if len(positions):
            missing = {k for s in self.sample.layers for k in (f"layer_{s.layer}.input", f"layer_{s.layer}.mask")}
            if missing - self.seen:
                raise RuntimeError(f"--dump: no {sorted(missing - self.seen)[0]} in this forward pass")
            self.positions.append(positions)
        self.covered.append((b0, b1))
        self.rows = None
        if self.held >= SHARD_BYTES:
            self.flush()

    def _rows(self, x: torch.Tensor, width: int) -> torch.Tensor:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape != (self.tokens, width):
            raise RuntimeError(f"--dump: a hooked tensor has shape {tuple(x.shape)}, expected ({self.tokens}, "
                               f"{width}) (one row per token)")
        return x[self.rows.to(x.device)]

    def _keep(self, name: str, value: torch.Tensor) -> None:
        if name in self.seen:
            raise RuntimeError(f"--dump: {name} recorded twice in one forward pass")
        self.seen.add(name)
        self.parts.setdefault(name, []).append(value)
        self.held += value.numel() * value.element_size()

    def add_input(self, spec: LayerSpec, x: torch.Tensor) -> None:
        """A layer's MLP input [..., hidden] for this batch."""
        if self.rows is not None and len(self.rows):
            self._keep(f"layer_{spec.layer}.input", self._rows(x, spec.hidden).to("cpu", self.dtype))

    def add_fired(self, spec: LayerSpec, x: torch.Tensor) -> None:
        """A layer's recorded tensor [..., width], the one its counts were given: the masks (and values)."""
        if self.rows is None or not len(self.rows):
            return
        x = self._rows(x, spec.width)
        mask = torch.stack([fired(x, t) for t in self.thresholds], 1).cpu().numpy()
        self._keep(f"layer_{spec.layer}.mask", torch.from_numpy(np.packbits(mask, axis=-1, bitorder="little")))
        if self.sample.values:
            self._keep(f"layer_{spec.layer}.values", x.cpu())

    def flush(self) -> None:
        """Write the rows held so far as one shard (none if no token was sampled)."""
        if self.positions:
            from safetensors.torch import save

            name = f"{self.prefix}-{len(self.written):04d}.safetensors"
            ranges = plan.merge_ranges(self.covered)
            tensors = {"positions": torch.from_numpy(np.concatenate(self.positions))}
            tensors.update({k: torch.cat(v).contiguous() for k, v in self.parts.items()})
            meta = {"format": SHARD_FORMAT, "chunk_ranges": json.dumps(ranges)}
            # Serialized here and written under mpicorr's own temporary name: safetensors' save_file writes a
            # .tmpXXXXXX of its own beside the file, which a rank killed meanwhile left, and --resume then refused
            # the folder as holding files that are not a dump. (Briefly holds the shard's bytes once more.)
            data = save(tensors, metadata=meta)
            try:
                with atomic_write(os.path.join(self.sample.folder, name)) as fh:
                    fh.write(data)
            except OSError as exc:
                raise UserError(f"--dump {self.sample.folder}: cannot write {name} ({exc}); free space or "
                                f"choose another folder, then --resume") from None
            self.written.append({"file": name, "tokens": len(tensors["positions"]), "chunk_ranges": ranges})
        self._empty()

    def finish(self) -> list[dict]:
        """Write what is left; the index entries of every shard this rank wrote."""
        self.flush()
        return self.written


class Tee:
    """Gives a site's tensor to its counts and then to the dump: the dumped mask is the counts' firing."""

    def __init__(self, counts, dumper: Dumper, spec: LayerSpec):
        self.counts, self.dumper, self.spec = counts, dumper, spec

    def add(self, x: torch.Tensor) -> None:
        self.counts.add(x)
        self.dumper.add_fired(self.spec, x)


def sinks(counts: list, dumper: Dumper | None) -> list:
    """What the site hooks feed: the counts, each teed into the dump when there is one."""
    if dumper is None:
        return counts
    return [Tee(c, dumper, spec) for c, spec in zip(counts, dumper.sample.layers, strict=True)]


def input_modules(model: torch.nn.Module, dumper: Dumper | None) -> tuple[list, list]:
    """(modules whose input is each layer's MLP input, the receiving calls) for hooks.feeding."""
    if dumper is None:
        return [], []
    found = dict(models.find_mlp_inputs(model))
    specs = dumper.sample.layers
    return [found[s.input_module] for s in specs], [lambda x, s=s: dumper.add_input(s, x) for s in specs]


def check_dtypes(folder: str, dtypes: list[str]) -> None:
    """Every rank must run the same dtype: the index records one."""
    if len(set(dtypes)) > 1:
        raise UserError(f"--dump {folder}: ranks run different dtypes ({', '.join(sorted(set(dtypes)))}, from "
                        f"--dtype auto on mixed devices); give --dtype bfloat16 or float32")


def write_index(cfg: Config, sample: Sample, data_sha256: str, chunks: plan.Batch, dtype: str,
                shards: list[dict]) -> str:
    """Rank 0, once every shard is written: index.json; returns the closing line."""
    shards = sorted([*sample.kept, *shards], key=lambda e: e["file"])
    tokens = sum(e["tokens"] for e in shards)
    if tokens != sample.count:
        raise RuntimeError(f"--dump: {tokens} tokens written, {sample.count} sampled")
    index = {
        "format": FORMAT, "mpicorr_version": __version__, "created": summary.now(), "command": cfg.command,
        "model": cfg.model, "model_type": sample.family, "data": cfg.data,
        "data_sha256": data_sha256, "ctx": cfg.ctx, "chunk_ranges": [list(chunks)], "site": cfg.site,
        "thresholds": list(cfg.threshold), "dtype": dtype, "values": sample.values, "tokens": tokens,
        "sample": {"tokens": sample.tokens, "rate": sample.rate, "universe": list(sample.universe),
                   "bound": sample.bound, "rule": predictor_data.RULE},
        "layers": [vars(s) for s in sample.layers], "shards": shards,
    }
    save_index(sample.folder, index)
    size = sum(os.path.getsize(os.path.join(sample.folder, e["file"])) for e in shards)
    return (f"mpicorr: dumped {tokens:,} tokens x {len(sample.layers)} layers ({human(size)} in {len(shards)} "
            f"shard file(s)) into {os.path.abspath(sample.folder)}")


def save_index(folder: str, index: dict) -> None:
    """The one writer of index.json."""
    with atomic_write(os.path.join(folder, INDEX)) as fh:
        fh.write(json.dumps(index, indent=1).encode())


# Fields that dumps must share to be merged by `sum`.
SAME_DUMP = ("model", "data_sha256", "ctx", "site", "thresholds", "dtype", "values", "sample", "layers")


def sum_dumps(out: str, inputs: list[str], force: bool = False, command: str = "") -> str:
    """Merge dumps of disjoint chunk ranges (--part shares, --chunk-start/--chunks jobs) into the folder `out`:
    shards hard-linked (copied across filesystems), one index; as if one run had dumped them all. Staged and
    locked as filetools.sum_runs is: a failed merge leaves `out` as it was."""
    indexes = [predictor_data.read_index(folder) for folder in inputs]
    for path, index in zip(inputs[1:], indexes[1:]):
        for key in SAME_DUMP:
            if index[key] != indexes[0][key] and not (key == "model" and filetools.same_model_folder(
                    index[key], indexes[0][key])):  # one model folder, spelt two ways
                raise UserError(f"{path}: different {key} from {inputs[0]}; only dumps of one model, data and "
                                f"sample add up")
    ranges = [tuple(r) for index in indexes for r in index["chunk_ranges"]]
    merged = plan.merge_ranges(ranges)
    if sum(b - a for a, b in merged) != sum(b - a for a, b in ranges):
        raise UserError(f"sum: the dumps {', '.join(inputs)} share chunks; merge only disjoint chunk ranges")
    check_folder(out, force, False, merging=True)
    # Written into a hidden folder beside `out`, moved into place at the end (as `sum` of run folders does):
    # a merge that fails leaves `out` as it was; `out` is locked meanwhile, as a run locks its --dump folder.
    with filetools.staged_folder(out, clear_dump, INDEX) as tmp:
        check_folder(out, force, False, merging=True)  # again, holding the lock
        return _merge_dumps(tmp, out, inputs, indexes, merged, command)


def clear_dump(folder: str) -> None:
    """Delete a dump's files (and their temporaries) in `folder`: what a merge with --force replaces."""
    outputs.remove(folder, FILES)


def _merge_dumps(tmp: str, out: str, inputs: list[str], indexes: list[dict], merged: list[plan.Batch],
                 command: str) -> str:
    """sum_dumps writing into `tmp` (`out` is the name its line gives)."""
    shards = []
    for k, (folder, index) in enumerate(zip(inputs, indexes)):
        for entry in index["shards"]:
            name = f"shard-m{k}-{entry['file'][len('shard-'):]}"
            link_or_copy(os.path.join(folder, entry["file"]), os.path.join(tmp, name))
            shards.append({**entry, "file": name})
    index = {**indexes[0], "model": filetools.merged_model(indexes), "chunk_ranges": [list(r) for r in merged],
             "tokens": sum(e["tokens"] for e in shards),
             "shards": shards, "merged_from": [os.path.abspath(p) for p in inputs], "command": command,
             "mpicorr_version": __version__, "created": summary.now()}
    save_index(tmp, index)
    return (f"{out}: {len(inputs)} dumps merged, chunks {plan.format_ranges(merged)}, {index['tokens']} tokens, "
            f"{len(shards)} shards")


def link_or_copy(src: str, dst: str) -> None:
    """A hard link (no space used), or a copy where the filesystems differ."""
    try:
        os.link(src, dst)
    except OSError:
        try:
            with atomic_path(dst) as tmp:  # a full disk or a folder not writable: a UserError naming dst
                shutil.copyfile(src, tmp)
        except OSError as exc:
            if exc.filename != src:
                raise
            raise UserError(f"{src}: cannot read ({exc.strerror}); the dump's index lists this shard: restore "
                            f"it or dump again") from None
