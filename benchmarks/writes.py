"""Time rank 0's write phase on its own: LAYERS layers of synthetic counts written as a run writes them (the
matrix files through run.UnitWriter, the summary.h5 groups), without a model.

    python benchmarks/writes.py --layers 32 --neurons 14336            # Mistral-7B's 32 x 14336
    python benchmarks/writes.py --layers 32 --neurons 14336 --device cuda:0   # top partners on the GPU

The counts are drawn once (C[i, j] ~ Poisson(T p_i p_j), p Zipf-like with mean --density, the diagonal T p_i)
and handed to every layer, as the reduce hands a finished layer to the writer; what is timed is everything
after that: compression (zstd, multi-threaded), SHA-256, the top-partner search, the per-neuron datasets and
the HDF5 writes, fsync and rename. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpicorr import counting, run, summary, triangle  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32, help="layers written (default: 32)")
    p.add_argument("--neurons", type=int, default=14336, help="layer width (default: 14336)")
    p.add_argument("--tokens", type=int, default=642 * 512, help="tokens the counts stand for (default: 328704)")
    p.add_argument("--density", type=float, default=0.2, help="mean firing rate (default: 0.2)")
    p.add_argument("--device", default=None, help="a GPU for the top-partner search (default: the CPU)")
    p.add_argument("--threads", type=int, default=None, help="writer threads (default: run's choice)")
    p.add_argument("--out", default="/tmp/mpicorr-writes", help="folder written (removed first)")
    args = p.parse_args()
    packed, stats = synthetic(args.neurons, args.tokens, args.density)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    started = time.monotonic()
    with summary.summary_writer(os.path.join(args.out, summary.SUMMARY)) as h5, \
            run.UnitWriter(args.threads, args.device) as writer:
        for layer in range(args.layers):
            writer.submit(h5, args.out, counting.Unit(layer), args.neurons, stats, packed)
        threads, zstd = writer.threads, writer.zstd_threads
    seconds = time.monotonic() - started
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(json.dumps({"layers": args.layers, "neurons": args.neurons, "seconds": round(seconds, 2),
                      "seconds_per_layer": round(seconds / args.layers, 3), "counts_gb": round(
                          args.layers * packed.nbytes / 1e9, 2), "written_gb": round(size / 1e9, 2),
                      "writer_threads": threads, "zstd_threads": zstd, "cpus": len(os.sched_getaffinity(0)),
                      "device": args.device, "peak_rss_bytes": resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


if __name__ == "__main__":
    main()
