"""Time the write phase on its own: LAYERS layers of synthetic counts written as a run writes them (the
matrix files through writing.UnitWriter, the summary.h5 groups), without a model.

    python benchmarks/writes.py --layers 32 --neurons 14336            # Mistral-7B's 32 x 14336
    python benchmarks/writes.py --profile --levels 1,3 --out /dev/shm/w      # each step alone; levels; tmpfs
    python benchmarks/writes.py --memory --threads 8 --layers 16 --neurons 4096  # rank 0's peak, in layers
    mpirun --bind-to core -n 2 python benchmarks/writes.py --reduce --layers 8 --neurons 8192  # ranks share it

--reduce (under mpirun): every rank holds the layers' counts and the whole write phase runs as in a run
(writing.reduce_and_write_units): first with rank 0 compressing every unit (every reduce to rank 0, as before
the ranks shared the work), then over the ranks a run chooses (rank 0 and each rank with cores of its own:
`--bind-to core` on one host stands for several hosts), in turn --repeat times; rank 0 prints both, the ratio,
each rank's peak memory, and whether both wrote the same bytes.

--levels: the zstd levels to write the layers at (default: the files' own level, matrixfile.ZSTD_LEVEL = 1).
--profile: first time each step of one layer's write alone: zstd on every CPU at each of --levels, zstd with
one worker at the files' level, and SHA-256, the per-neuron datasets, deflate, write and fsync of that frame.

The counts are drawn once (C[i, j] ~ Poisson(T p_i p_j), p Zipf-like with mean --density, the diagonal T p_i)
and handed to every layer, as the reduce hands a finished layer to the writer; what is timed is everything
after that: compression (zstd, multi-threaded), SHA-256, the top-partner search, the per-neuron datasets and
the HDF5 writes, fsync and rename. Prints one JSON line per folder and level (after the --profile line).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpicorr import counting, dist, matrixfile, summary, triangle, writing  # noqa: E402


def synthetic(neurons: int, tokens: int, density: float, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(packed int32 counts, the stats dict of one threshold) of one plausible layer."""
    rng = np.random.default_rng(seed)
    rate = np.arange(1, neurons + 1, dtype=np.float64) ** -0.8
    p = np.minimum(0.9, density * neurons * rate / rate.sum())[rng.permutation(neurons)]
    packed = np.empty(triangle.packed_size(neurons), dtype=np.int32)
    for i in range(neurons):
        row = rng.poisson(tokens * p[i] * p[: i + 1])
        row[i] = round(tokens * p[i])
        packed[triangle.offset(i) : triangle.offset(i) + i + 1] = row
    fire = triangle.diagonal(packed, neurons).astype(np.int64)
    active = np.bincount(rng.binomial(neurons, density, tokens), minlength=neurons + 1).astype(np.int64)
    hist = rng.multinomial(tokens, np.full(counting.HIST_BINS, 1 / counting.HIST_BINS), neurons).astype(np.int64)
    stats = {"fire_count": fire, "active_hist": active, "act_sum": rng.integers(-2**40, 2**40, neurons),
             "act_sumsq": rng.integers(0, 2**40, neurons), "act_hist": hist.reshape(-1)}
    return packed, stats


def write_all(args, packed: np.ndarray, stats: dict, out: str, threads: int | None) -> dict:
    """Write the layers into `out` as a run's rank 0 does; the JSON fields."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    started = time.monotonic()
    if args.memory:  # compile the top-partner search first: numba's one-off memory is not the write's
        width = summary.COMPILED_WIDTH
        summary.top_partners(np.ones(triangle.packed_size(width), dtype=np.int32), width)
    base = reset_peak()
    with summary.summary_writer(os.path.join(out, summary.SUMMARY)) as h5, \
            writing.UnitWriter(threads) as writer:
        for layer in range(args.layers):
            # --memory: each layer its own array, as the reduce hands rank 0 a new one per layer
            writer.submit(h5, out, counting.Unit(layer), args.neurons, stats, packed.copy() if args.memory else packed)
        used = writer.threads, writer.zstd_threads
    seconds = time.monotonic() - started
    grown = peak_rss() - base if base is not None else None
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    shutil.rmtree(out, ignore_errors=True)
    return {"layers": args.layers, "neurons": args.neurons, "out": out, "zstd_level": matrixfile.ZSTD_LEVEL,
            "seconds": round(seconds, 2), "seconds_per_layer": round(seconds / args.layers, 3),
            "counts_gb": round(args.layers * packed.nbytes / 1e9, 2), "written_gb": round(size / 1e9, 2),
            "writer_threads": used[0], "zstd_threads": used[1], "cpus": len(os.sched_getaffinity(0)),
            **({"write_peak_bytes": grown, "write_peak_layers": round(grown / packed.nbytes, 2)}
               if args.memory and grown is not None else {})}


class Held:
    """A rank's counts of one layer as the write phase takes them (counting.LayerCounts' unit, width, stats()
    and pairs[0].take())."""

    def __init__(self, layer: int, packed: np.ndarray, stats: dict):
        self.unit, self.width = counting.Unit(layer), len(stats["fire_count"])
        self.flat = np.concatenate([stats[k] for k in ("fire_count", "active_hist", "act_sum", "act_sumsq",
                                                       "act_hist")]).astype(np.int64)
        self.pairs = [self]
        self.packed = packed.copy()

    def stats(self) -> np.ndarray:
        return self.flat

    def take(self) -> np.ndarray:
        return self.packed


def reduce_once(args, comm: dist.Comm, packed: np.ndarray, stats: dict, out: str, ranks: list[int]) -> float:
    """Seconds of one whole write phase on every rank (from a barrier to rank 0's last file)."""
    held = [Held(layer, packed, stats) for layer in range(args.layers)]
    if comm.rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
    comm.allgather(None)
    started = time.monotonic()
    with writing.summary_writers([out], comm.rank == 0) as files, writing.UnitWriter(args.threads) as writer:
        writing.reduce_and_write_units(comm, held, [out], files, writer, ranks)
    seconds = time.monotonic() - started
    return max(comm.allgather(seconds))


def matrix_bytes(out: str) -> dict[str, str]:
    """SHA-256 of each matrix file in `out`."""
    digests = {}
    for name in sorted(n for n in os.listdir(out) if n.endswith(".zstd")):
        with open(os.path.join(out, name), "rb") as fh:
            digests[name] = hashlib.sha256(fh.read()).hexdigest()
    return digests


def reduce_compare(args, packed: np.ndarray, stats: dict) -> None:
    """--reduce: the write phase with rank 0 compressing every unit, then with the ranks a run chooses
    (writing.compressing_ranks), in turn; rank 0 prints one JSON line."""
    comm = dist.world()
    hosts = comm.allgather(comm.host)
    spread = writing.compressing_ranks(hosts, comm.allgather(sorted(os.sched_getaffinity(0))))
    times: dict[str, list[float]] = {"rank0_only_s": [], "spread_s": []}
    digests = {}
    for _ in range(args.repeat):
        for key, ranks in (("rank0_only_s", [0]), ("spread_s", spread)):
            times[key].append(reduce_once(args, comm, packed, stats, args.out, ranks))
            if comm.rank == 0:
                digests[key] = matrix_bytes(args.out)
    peaks = comm.allgather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if comm.rank == 0:
        shutil.rmtree(args.out, ignore_errors=True)
        best = {k: min(v) for k, v in times.items()}
        print(json.dumps({"ranks": comm.size, "hosts": len(set(hosts)), "compressing_ranks": spread,
                          "cpus_per_rank": len(os.sched_getaffinity(0)), "layers": args.layers,
                          "neurons": args.neurons, "counts_gb_per_rank": round(args.layers * packed.nbytes / 1e9, 2),
                          **{k: [round(x, 2) for x in v] for k, v in times.items()},
                          "speedup": round(best["rank0_only_s"] / best["spread_s"], 2),
                          "same_bytes": digests["rank0_only_s"] == digests["spread_s"],
                          "peak_rss_gb_per_rank": [round(x / 1e9, 2) for x in peaks]}), flush=True)


def reset_peak() -> int | None:
    """Reset this process's peak resident memory (Linux: /proc/self/clear_refs) and return the current
    resident memory; None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status("VmRSS:")
    except OSError:
        return None


def peak_rss() -> int:
    """Peak resident memory since reset_peak (VmHWM)."""
    return _status("VmHWM:")


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))


def zstd_seconds(args, packed: np.ndarray, level: int, workers: int, frame: io.BytesIO) -> float:
    """Seconds to compress one layer's payload into `frame` at `level` with `workers` zstd workers."""
    files_level, matrixfile.ZSTD_LEVEL = matrixfile.ZSTD_LEVEL, level
    try:
        t = time.monotonic()
        matrixfile._compress(matrixfile.payload(args.tokens, packed), frame, workers)
        return time.monotonic() - t
    finally:
        matrixfile.ZSTD_LEVEL = files_level


def profile(args, packed: np.ndarray, stats: dict, levels: list[int]) -> dict:
    """Seconds of each step of one layer's write, alone: zstd on every CPU at each of `levels` and with one
    worker at the files' level (keys name the level and the workers), then the steps after compression, on
    the files' frame."""
    cpus, files_level = len(os.sched_getaffinity(0)), matrixfile.ZSTD_LEVEL
    frame = io.BytesIO()
    steps = {f"zstd_level{files_level}_{cpus}_workers": zstd_seconds(args, packed, files_level, cpus, frame)}
    for level in levels:
        if level != files_level:
            steps[f"zstd_level{level}_{cpus}_workers"] = zstd_seconds(args, packed, level, cpus, io.BytesIO())
    steps[f"zstd_level{files_level}_1_worker"] = zstd_seconds(args, packed, files_level, 1, io.BytesIO())
    t = time.monotonic()
    hashlib.sha256(frame.getvalue()).hexdigest()
    steps["sha256"] = time.monotonic() - t
    t = time.monotonic()
    data, _ = summary.layer_datasets(stats, packed, args.neurons, args.tokens)
    steps["datasets_and_top_partners"] = time.monotonic() - t
    t = time.monotonic()
    summary.compress_all(data)
    steps["deflate_datasets"] = time.monotonic() - t
    path = os.path.join(args.out + "-profile", "frame")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = time.monotonic()
    with open(path, "wb") as fh:
        fh.write(frame.getvalue())
        os.fsync(fh.fileno())
    steps["write_and_fsync"] = time.monotonic() - t
    shutil.rmtree(os.path.dirname(path))
    return {"profile_one_layer_s": {k: round(v, 3) for k, v in steps.items()}, "files_zstd_level": files_level,
            "frame_mb": round(len(frame.getvalue()) / 1e6, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32, help="layers written (default: 32)")
    p.add_argument("--neurons", type=int, default=14336, help="layer width (default: 14336)")
    p.add_argument("--tokens", type=int, default=642 * 512, help="tokens the counts stand for (default: 328704)")
    p.add_argument("--density", type=float, default=0.2, help="mean firing rate (default: 0.2)")
    p.add_argument("--threads", type=int, default=None, help="writer threads (default: run's choice)")
    p.add_argument("--memory", action="store_true",
                   help="hand each layer its own array, as a run's reduce does, and report the write's peak resident "
                        "memory above what was held before it (write_peak_bytes, and in layers' counts)")
    p.add_argument("--out", default="/tmp/mpicorr-writes",
                   help="folder written (removed first and after); several, comma-separated, are tried in turn")
    p.add_argument("--levels", default=str(matrixfile.ZSTD_LEVEL),
                   help=f"zstd levels to write the layers at, comma-separated, each in turn (default: the files' "
                        f"level, {matrixfile.ZSTD_LEVEL})")
    p.add_argument("--profile", action="store_true",
                   help=f"first time each step of one layer's write alone: zstd on every CPU at each of --levels, "
                        f"zstd with one worker at the files' level ({matrixfile.ZSTD_LEVEL}), SHA-256, datasets, "
                        f"deflate, write and fsync")
    p.add_argument("--reduce", action="store_true",
                   help="under mpirun: the whole write phase, reduce included, with rank 0 owning every unit and "
                        "then spread over the ranks, in turn; prints both and the ratio")
    p.add_argument("--repeat", type=int, default=3, help="--reduce: pairs of measurements (default: 3; best shown)")
    args = p.parse_args()
    packed, stats = synthetic(args.neurons, args.tokens, args.density)
    if args.reduce:
        reduce_compare(args, packed, stats)
        return
    outs, levels = args.out.split(","), [int(v) for v in args.levels.split(",")]
    args.out = outs[0]
    if args.profile:
        print(json.dumps(profile(args, packed, stats, levels)), flush=True)
    files_level = matrixfile.ZSTD_LEVEL
    try:
        for out in outs:
            for level in levels:
                matrixfile.ZSTD_LEVEL = level
                print(json.dumps({**write_all(args, packed, stats, out, args.threads), "peak_rss_bytes":
                                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
    finally:
        matrixfile.ZSTD_LEVEL = files_level


if __name__ == "__main__":
    main()
