"""Reproduce the README's speed table: mpicorr's CPU counting against the original pair loop, same run.

    python benchmarks/compare.py                       # N = 14336, both profiles, p = 0.5 % .. 50 %
    python benchmarks/compare.py --neurons 4096 --densities 0.01,0.1

Both count the same synthetic firing (mpicorr.bench.synthetic). The pair loop (benchmarks/pairloop.c,
compiled here with OpenMP and -march=native) is timed on enough tokens for a stable rate; mpicorr's
`auto` kernel on --tokens tokens (a run buffers 4096 tokens per popcount call). The counts are compared on
the tokens the pair loop counted: all of them, or at high densities its first tokens, which mpicorr then
counts once more, untimed. Different checksums stop the script. Prints a Markdown table; ratio = mpicorr
tokens/s / pair loop tokens/s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# mpicorr before torch (as benchmarks/overhead.py): numba sizes its pool before torch's OpenMP pins this thread
from mpicorr import bench, kernels, triangle  # noqa: E402

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {("uniform", 0.01): 2, ("uniform", 0.03): 5, ("uniform", 0.1): 20, ("uniform", 0.3): 80,
           ("powerlaw", 0.03): 5}
PAIR_BUDGET = 3e9  # pair updates given to the pair loop per measurement (its rate does not depend on tokens)


def build_pairloop(workdir: str, cc: str) -> str:
    """Compile pairloop.c; return the executable's path."""
    exe = os.path.join(workdir, "pairloop")
    subprocess.run([cc, "-O3", "-march=native", "-fopenmp", os.path.join(HERE, "pairloop.c"), "-o", exe], check=True)
    return exe


def write_active(path: str, fired: np.ndarray) -> None:
    """The CSR file pairloop.c reads."""
    indptr, indices = kernels.active_lists(fired)
    np.concatenate([[fired.shape[0]], indptr, indices]).astype("<i8").tofile(path)


def checksum(packed: np.ndarray) -> int:
    """The checksum pairloop.c prints."""
    weights = np.arange(len(packed), dtype=np.uint64) % np.uint64(1000003) + np.uint64(1)
    return int((packed.astype(np.uint64) * weights).sum(dtype=np.uint64))


def time_pairloop(exe: str, workdir: str, fired: np.ndarray, repeats: int) -> tuple[float, int, int]:
    """(tokens/s, checksum, tokens timed) of the pair loop."""
    active = fired.sum(1, dtype=np.int64)
    per_token = float((active * (active + 1) // 2).mean()) or 1.0
    tokens = int(min(len(fired), max(16, PAIR_BUDGET // per_token)))
    path = os.path.join(workdir, "active.bin")
    write_active(path, fired[:tokens])
    out = subprocess.run([exe, path, str(fired.shape[1]), str(repeats)], check=True, capture_output=True, text=True)
    seconds, check = out.stdout.split()
    return tokens / float(seconds), int(check), tokens


def time_mpicorr(fired: np.ndarray, repeats: int) -> tuple[float, int, str]:
    """(tokens/s, checksum, kernel) of mpicorr's auto kernel: best of `repeats` fresh counters."""
    x = torch.from_numpy(fired)
    best, packed, used = float("inf"), None, ""
    for _ in range(repeats):
        counter = triangle.pair_counter(fired.shape[1], torch.int32, "cpu", "auto")
        start = time.perf_counter()
        counter.add(x)
        counter.flush()
        best = min(best, time.perf_counter() - start)
        packed, used = counter.packed(), bench.kernel_used(counter)
    return len(fired) / best, checksum(packed), used


def subset_checksum(fired: np.ndarray, tokens: int) -> int:
    """mpicorr's checksum of the first `tokens` tokens (those the pair loop counted), untimed."""
    counter = triangle.pair_counter(fired.shape[1], torch.int32, "cpu", "auto")
    counter.add(torch.from_numpy(np.ascontiguousarray(fired[:tokens])))
    counter.flush()
    return checksum(counter.packed())


def check_counts(label: str, fired: np.ndarray, loop_check: int, loop_tokens: int, our_check: int) -> None:
    """Stop unless both counted the same pairs on the tokens the pair loop timed."""
    expected = our_check if loop_tokens == len(fired) else subset_checksum(fired, loop_tokens)
    if loop_check != expected:
        raise SystemExit(f"checksums differ at {label} on {loop_tokens} tokens: the counts are not the same")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--neurons", type=int, default=14336, help="layer width N (default: 14336)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens mpicorr counts per measurement (default: 4096)")
    p.add_argument("--densities", default="0.005,0.01,0.03,0.1,0.3,0.5", help="comma-separated mean densities")
    p.add_argument("--profiles", default="uniform,powerlaw", help="comma-separated: uniform, powerlaw")
    p.add_argument("--repeats", type=int, default=2, help="best of this many timings (default: 2)")
    p.add_argument("--cc", default=os.environ.get("CC", "cc"), help="C compiler with OpenMP (default: $CC or cc)")
    args = p.parse_args(argv)
    kernels.popcount_add(kernels.pack_bits(np.ones((8, 64), bool)), np.zeros(64 * 65 // 2, np.int32), 1)  # compile
    print(f"N = {args.neurons}, {os.cpu_count()} CPU threads, numba threads {kernels.threads()}\n")
    print("| profile | density | pair loop tokens/s | mpicorr tokens/s | kernel | ratio | target |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as workdir:
        exe = build_pairloop(workdir, args.cc)
        for profile in args.profiles.split(","):
            for density in (float(d) for d in args.densities.split(",")):
                fired = bench.synthetic(args.neurons, args.tokens, density, profile)
                loop_rate, loop_check, loop_tokens = time_pairloop(exe, workdir, fired, args.repeats)
                ours, our_check, used = time_mpicorr(fired, args.repeats)
                check_counts(f"{profile} {density}", fired, loop_check, loop_tokens, our_check)
                target = TARGETS.get((profile, density), 1)
                print(f"| {profile} | {density:g} | {loop_rate:,.0f} | {ours:,.0f} | {used} | {ours / loop_rate:.1f}x "
                      f"| {target}x |", flush=True)


if __name__ == "__main__":
    main()
