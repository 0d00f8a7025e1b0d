"""`python -m mpicorr bench`: time a pair-count kernel on synthetic firing, check it exactly, print JSON.

    python -m mpicorr bench --neurons 14336 --tokens 512 --density 0.03
    python -m mpicorr bench --neurons 14336 --tokens 512 --density 0.03 --profile powerlaw --kernel popcount

uniform: every neuron fires on each token independently with probability P. powerlaw: neuron of
frequency rank r fires with probability proportional to r**-1 (Zipf-like, a few hot neurons), scaled so
that the mean is P (capped at 1). The timed part is adding the tokens into the counts (kernel compilation
is done before); the result is then compared with a plain per-row reference on sampled rows.
"""

from __future__ import annotations

import json
import resource
import time

import numpy as np
import torch

from . import triangle
from .config import check_device
from .errors import UserError


def synthetic(neurons: int, tokens: int, density: float, profile: str, seed: int = 0) -> np.ndarray:
    """[tokens, neurons] bool firing with the given mean density."""
    rng = np.random.default_rng(seed)
    if profile == "uniform":
        return rng.random((tokens, neurons)) < density
    freq = 1.0 / np.arange(1, neurons + 1)
    scale = density * neurons / freq.sum()
    for _ in range(50):  # capping hot neurons at 1 lowers the mean: raise the scale until it is met
        capped = np.minimum(freq * scale, 1.0)
        if capped.mean() >= density * (1 - 1e-9) or capped.min() >= 1.0:
            break
        scale *= density / capped.mean()
    return rng.random((tokens, neurons)) < rng.permutation(capped)[None, :]


def reference_rows(fired: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """C[i, 0..i] for each sampled row i, by a plain product of 0/1 columns."""
    f = fired.astype(np.int64)
    return [(f[:, : i + 1] * f[:, i : i + 1]).sum(0) for i in rows]


def check(packed: np.ndarray, fired: np.ndarray, layers: int, samples: int = 64) -> None:
    """Raise if any sampled row differs from the reference (each of `layers` layers got `fired`)."""
    n = fired.shape[1]
    rows = np.unique(np.concatenate([[0, n - 1], np.random.default_rng(1).integers(0, n, samples)]))
    for i, want in zip(rows, reference_rows(fired, rows)):
        got = packed[triangle.offset(int(i)) : triangle.offset(int(i)) + int(i) + 1]
        if not np.array_equal(got, want * layers):
            raise RuntimeError(f"bench: row {i} differs from the reference: the kernel is wrong")


def sync(device: str) -> None:
    """Wait for `device` (cuda:1 included: a bare synchronize() waits for the current device only)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def bench(neurons: int, tokens: int, density: float, profile: str, device: str, layers: int, kernel: str) -> dict:
    """Count `layers` layers of the same synthetic firing; return the JSON record."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")
    fired = synthetic(neurons, tokens, density, profile)
    warm = triangle.pair_counter(64, torch.int32, device, kernel)  # compile / initialise outside the timing
    warm.add(torch.from_numpy(synthetic(64, 600, 0.5, "uniform")).to(device))
    warm.packed()
    counter = triangle.pair_counter(neurons, torch.int32 if tokens * layers < 2**31 else torch.int64, device, kernel)
    x = torch.from_numpy(fired).to(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(layers):
        counter.add(x)
    if hasattr(counter, "flush"):
        counter.flush()
    sync(device)
    seconds = time.perf_counter() - start
    check(counter.packed(), fired, layers)
    active = fired.sum(1, dtype=np.int64)
    record = {
        "kernel": kernel_used(counter), "neurons": neurons, "tokens": tokens, "layers": layers,
        "density": float(active.mean() / neurons), "profile": profile, "device": device,
        "seconds": round(seconds, 6), "tokens_per_s": round(tokens * layers / seconds, 1),  # per layer
        "pair_updates_per_s": round(float((active * (active + 1) // 2).sum()) * layers / seconds, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "exact": True,
    }
    if device.startswith("cuda"):
        record["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return record


def kernel_used(counter) -> str:
    """'gemm', 'popcount', 'sparse' or a mix such as 'popcount+sparse'."""
    used = getattr(counter, "used", None)
    return "gemm" if used is None else "+".join(k for k, v in used.items() if v) or "none"


def main(args) -> None:
    """Run from parsed arguments and print one JSON line."""
    if args.neurons < 1 or args.tokens < 1 or args.layers < 1 or not 0 <= args.density <= 1:
        raise UserError("bench: --neurons, --tokens and --layers must be >= 1 and --density in [0, 1]")
    check_device(args.device, auto=False)  # else torch's error about its device types
    print(json.dumps(bench(args.neurons, args.tokens, args.density, args.profile, args.device, args.layers,
                           args.kernel)), flush=True)
