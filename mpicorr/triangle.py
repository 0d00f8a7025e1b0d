"""The packed lower triangle C[i, j], j <= i, row-major, row i at offset i(i+1)/2 (the matrix files'
layout, from mpicorr.layout), and the exact accumulators behind one interface (add / packed / add_packed):

- PanelCounts: fp32 GEMMs over row panels (BLAS); portable, any device.
- DeviceCounts: bfloat16 tensor-core GEMMs into float32 or int16 panels on a GPU, flushed into wide host
  counts.
- BitCounts: the compiled CPU kernels (mpicorr.kernels), bit-packed popcount for dense batches and
  per-token pair updates for sparse ones, chosen per batch by estimated cost.
`pair_counter` picks one; the choice never changes a count.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import kernels
from .layout import diagonal, full_row_blocks, offset, packed_size, rows, rows_at, unpack  # noqa: F401 (the layout)

# Cost of one sparse pair update relative to one popcount kernel step (a pair times 512 tokens), measured
# with `python -m mpicorr bench`; only decides speed, never a count.
SPARSE_COST = 1.0
# Tokens buffered (as bits) before a popcount call: more tokens per call spread the read-modify-write of
# the int counts over more arithmetic. On the 2-core AVX2 machine of the README's table the kernel is
# bound by POPCNT and 512 or 4096 tokens per call run at the same rate; a faster popcount makes it count.
TOKENS_PER_CALL = 4096

# fp32 holds every integer up to 2**24 exactly, so fp32 sums of 0/1 products over at most this many
# tokens are exact counts.
EXACT_TOKENS = 1 << 24
# Elements of one fp32 product panel (64 MiB): bounds the scratch memory of a counting step.
PANEL_ELEMENTS = 1 << 24
# Row panels start at multiples of this many rows (see panels).
ALIGN_ROWS = 64
# Threads adding flushed device counts into the host triangle.
HOST_THREADS = 8
# Share of a GPU's memory that float32 count panels must leave free (for activations); else int16 panels.
DEVICE_RESERVE = 0.25


def panels(width: int, elements: int = PANEL_ELEMENTS) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) whose panel (r1 - r0) x r1 holds at most about `elements` entries. Panels start at
    multiples of ALIGN_ROWS where they are that tall: a GEMM operand starting at column r0 of the firing matrix
    is then 128-byte aligned (on an H100, misaligned bfloat16 operands ran the products 4x slower)."""
    rows = max(1, elements // max(width, 1))
    rows = rows - rows % ALIGN_ROWS if rows >= ALIGN_ROWS else rows
    return [(r0, min(r0 + rows, width)) for r0 in range(0, width, rows)]


def lower_mask(r0: int, r1: int, device: torch.device | str) -> torch.Tensor:
    """Boolean (r1 - r0) x r1 mask of the entries j <= i of rows r0..r1-1; masked order = packed order."""
    i = torch.arange(r0, r1, device=device)[:, None]
    j = torch.arange(r1, device=device)[None, :]
    return j <= i


class PanelCounts:
    """Exact lower-triangle counts kept as fp32 row panels, so that each update is one GEMM (addmm).

    Panel k holds rows r0..r1-1 against columns 0..r1-1 (the few entries above the diagonal inside it are
    ignored). fp32 holds integers up to 2**24 exactly, so after at most EXACT_TOKENS tokens the panels are
    flushed into integer panels of `dtype` (allocated at the first flush only).
    """

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str,
                 elements: int | None = None):
        self.dtype = dtype
        self.spans = panels(width, elements or PANEL_ELEMENTS)
        self.acc = [torch.zeros(r1 - r0, r1, dtype=torch.float32, device=device) for r0, r1 in self.spans]
        self.total: list[torch.Tensor] | None = None
        self.pending = 0

    def add(self, fired: torch.Tensor) -> None:
        """Count a [tokens, width] bool matrix: panel += fired[:, rows].T @ fired[:, :r1] in fp32."""
        fired = fired.to(torch.float32)
        for t0 in range(0, fired.shape[0], EXACT_TOKENS):
            part = fired[t0 : t0 + EXACT_TOKENS]
            if self.pending + part.shape[0] > EXACT_TOKENS:
                self.flush()
            for (r0, r1), acc in zip(self.spans, self.acc):
                acc.addmm_(part[:, r0:r1].T, part[:, :r1])
            self.pending += part.shape[0]

    def flush(self) -> None:
        """Move the fp32 counts into the integer panels."""
        if self.total is None:
            self.total = [torch.zeros(a.shape, dtype=self.dtype, device=a.device) for a in self.acc]
        for total, acc in zip(self.total, self.acc):
            total += acc.to(self.dtype)
            acc.zero_()
        self.pending = 0

    def add_packed(self, packed: np.ndarray) -> None:
        """Add counts given as a packed lower triangle (a checkpoint's) into the integer panels."""
        if self.total is None:
            self.flush()
        for (r0, r1), total in zip(self.spans, self.total):
            part = torch.from_numpy(np.asarray(packed[offset(r0) : offset(r1)]).astype(np.int64))
            mask = lower_mask(r0, r1, total.device)
            total[mask] += part.to(device=total.device, dtype=total.dtype)

    def packed(self) -> np.ndarray:
        """The counts as the packed lower triangle (a new host array)."""
        parts = []
        for k, ((r0, r1), acc) in enumerate(zip(self.spans, self.acc)):
            block = acc.to(self.dtype) if self.total is None else self.total[k] + acc.to(self.dtype)
            parts.append(block[lower_mask(r0, r1, block.device)].cpu().numpy())
        return np.concatenate(parts)

    take = packed  # packed() already builds a new array


class HostCounts:
    """Counts kept as one packed int32/int64 triangle in host memory; subclasses add to `out` and `flush`
    whatever they still hold elsewhere."""

    def __init__(self, width: int, dtype: torch.dtype):
        self.dtype = dtype
        self.out = np.zeros(packed_size(width), dtype=np.int32 if dtype == torch.int32 else np.int64)

    def flush(self) -> None:
        """Move buffered or device-held counts into `out`."""

    def add_packed(self, packed: np.ndarray) -> None:
        """Add counts given as a packed lower triangle (a checkpoint's)."""
        self.out += np.asarray(packed).astype(self.out.dtype)

    def packed(self) -> np.ndarray:
        """The counts as the packed lower triangle (a new host array)."""
        self.flush()
        return self.out.copy()

    def take(self) -> np.ndarray:
        """The counts as the packed lower triangle, handed over without a copy; the counter is spent."""
        self.flush()
        out, self.out = self.out, None
        return out


class DeviceCounts(HostCounts):
    """Exact lower-triangle counts for GPUs: row panels on the device, one tensor-core product per panel and
    batch, flushed into a packed int32/int64 triangle in host memory before a count could leave the panel
    type's exact range.

    The product of the 0/1 matrices runs in bfloat16 (0 and 1 are exact) with float32 accumulation, so every
    sum is an exact integer below 2**24. `panel` float32: the product accumulates into the panels in place
    (least memory traffic, flushed every 2**24 tokens); int16: each product is added into int16 panels (half
    the device memory, flushed every 32767 tokens). On a CPU (the tests) the product is float32.
    """

    LIMITS = {torch.float32: EXACT_TOKENS, torch.int16: (1 << 15) - 1}

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str, panel: torch.dtype = torch.int16,
                 elements: int | None = None, limit: int | None = None):
        super().__init__(width, dtype)
        self.panel = panel
        self.limit = min(limit or self.LIMITS[panel], self.LIMITS[panel])
        self.spans = panels(width, elements or PANEL_ELEMENTS)
        self.acc = [torch.zeros(r1 - r0, r1, dtype=panel, device=device) for r0, r1 in self.spans]
        self.pending = 0
        self.flushed = False  # until the first flush, `out` is all zero

    def add(self, fired: torch.Tensor) -> None:
        """Count a [tokens, width] bool matrix, in parts of at most `limit` tokens."""
        fired = fired.to(product_dtype(fired.device))
        for t0 in range(0, fired.shape[0], self.limit):
            part = fired[t0 : t0 + self.limit]
            if self.pending + part.shape[0] > self.limit:
                self.flush()
            for (r0, r1), acc in zip(self.spans, self.acc):
                accumulate(acc, part[:, r0:r1].T, part[:, :r1])
            self.pending += part.shape[0]

    def flush(self) -> None:
        """Add the device panels into the host triangle and clear them."""
        part = self._gather()
        if part is None:
            return
        if self.flushed:
            host_add(self.out, part)
        else:  # the first flush (the only one of most float32 runs): the counts so far are the panels
            self.out = part.astype(self.out.dtype, copy=False)
        self.flushed, self.pending = True, 0

    def _gather(self) -> np.ndarray | None:
        """The device panels' lower triangles as one host array (int16, or the host width), panels zeroed."""
        if self.pending == 0 and self.flushed:
            return None
        wide = torch.int16 if self.panel == torch.int16 else self.dtype
        # the masks are made per flush (rare): kept, they would take half as much memory as the panels
        parts = [acc[lower_mask(r0, r1, acc.device)].to(wide) for (r0, r1), acc in zip(self.spans, self.acc)]
        host = torch.cat(parts).cpu().numpy()
        for acc in self.acc:
            acc.zero_()
        return host

    def add_packed(self, packed: np.ndarray) -> None:
        """Add counts given as a packed lower triangle (a checkpoint's), after the device's (so that `out` is
        no longer taken to be zero)."""
        self.flush()
        super().add_packed(packed)


def host_add(out: np.ndarray, part: np.ndarray) -> None:
    """out += part, on several threads (numpy releases the GIL; one thread adds about 1 GB/s)."""
    threads = max(1, min(HOST_THREADS, len(os.sched_getaffinity(0)), len(out) // (1 << 20)))
    bounds = np.linspace(0, len(out), threads + 1).astype(np.int64)

    def add(k: int) -> None:
        out[bounds[k] : bounds[k + 1]] += part[bounds[k] : bounds[k + 1]]

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(add, range(threads)))


def product_dtype(device: torch.device) -> torch.dtype:
    """Input type of the 0/1 products: bfloat16 on a GPU that can accumulate it in float32, else float32."""
    return torch.bfloat16 if device.type == "cuda" and cuda_products() != "float32" else torch.float32


def accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for 0/1 matrices a, b (of product_dtype), exactly: in place where acc is float32."""
    if a.dtype == torch.float32:
        if acc.dtype == torch.float32:
            acc.addmm_(a, b)
        else:
            acc += torch.mm(a, b).to(acc.dtype)
    elif acc.dtype == torch.float32 and cuda_products() == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += torch.mm(a, b, out_dtype=torch.float32).to(acc.dtype)


@functools.cache
def cuda_products() -> str:
    """What this torch can do on CUDA, checked once on a small case: 'addmm' (bfloat16 inputs accumulated
    in place into float32), 'mm' (bfloat16 product to float32, then added) or 'float32' (torch < 2.8)."""
    ones = torch.ones(3000, 24, dtype=torch.bfloat16, device="cuda")  # 3000 > 256: a bfloat16 sum would round
    acc = torch.ones(24, 24, dtype=torch.float32, device="cuda")
    try:
        torch.addmm(acc, ones.T, ones, out_dtype=torch.float32, out=acc)
        if bool((acc == 3001).all()):
            return "addmm"
    except (TypeError, RuntimeError):
        pass
    try:
        if bool((torch.mm(ones.T, ones, out_dtype=torch.float32) == 3000).all()):
            return "mm"
    except (TypeError, RuntimeError):
        pass
    return "float32"


def panel_cells(width: int, elements: int = PANEL_ELEMENTS) -> int:
    """Cells of a width's row panels (the lower triangle and the few cells above it inside the panels)."""
    return sum((r1 - r0) * r1 for r0, r1 in panels(width, elements))


def device_panel(cells: int, device: torch.device | str) -> torch.dtype:
    """float32 panels if `cells` of them (every layer counted on this device) leave DEVICE_RESERVE of the
    device's memory for the forward pass, else int16. Decided after the model is loaded, before counting."""
    device = torch.device(device)
    device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated  # cached by torch's allocator: ours to use
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)
    budget = fraction * total
    free = min(free, budget - allocated)
    return torch.float32 if free - 4 * cells >= DEVICE_RESERVE * budget else torch.int16


class BitCounts(HostCounts):
    """Exact lower-triangle counts in the packed host array, added to by the compiled kernels.

    Dense batches are packed 64 tokens per word and buffered until TOKENS_PER_CALL tokens; sparse ones
    (few active pairs) go straight to the pair-update kernel. `kernel` forces one of them.
    """

    def __init__(self, width: int, dtype: torch.dtype, kernel: str = "auto", tokens_per_call: int = TOKENS_PER_CALL):
        if not kernels.AVAILABLE:
            raise RuntimeError("the compiled kernels need numba; pip install numba or use the gemm kernel")
        super().__init__(width, dtype)
        self.width, self.kernel, self.tokens_per_call = width, kernel, tokens_per_call
        self.out.fill(0)  # touch the pages now, not inside the first kernel call
        self.blocks = kernels.row_blocks(width)
        self.words: list[np.ndarray] = []
        self.buffered = 0
        self.used = {"popcount": 0, "sparse": 0}  # tokens counted by each kernel (for bench)

    def add(self, fired: torch.Tensor) -> None:
        """Count a [tokens, width] bool matrix."""
        f = np.ascontiguousarray(fired.cpu().numpy())
        active = None if self.kernel in ("sparse", "popcount") else kernels.active_counts(f)
        if self.kernel == "sparse" or (active is not None and self._sparse_is_cheaper(active)):
            kernels.sparse_add(*kernels.active_lists(f, active), self.out, self.blocks, kernels.threads())
            self.used["sparse"] += f.shape[0]
            return
        self.words.append(kernels.pack_bits(f, group=1))
        self.buffered += f.shape[0]
        self.used["popcount"] += f.shape[0]
        if self.buffered >= self.tokens_per_call:
            self.flush()

    def _sparse_is_cheaper(self, active: np.ndarray) -> bool:
        """Estimated cost of the pair updates against the popcount pass, for tokens with `active` neurons."""
        pairs = float((active * (active + 1) // 2).sum())
        return pairs * SPARSE_COST < len(self.out) * len(active) / 512

    def flush(self) -> None:
        """Run the popcount kernel on the buffered tokens."""
        if not self.words:
            return
        bits = np.concatenate(self.words)
        pad = -len(bits) % 8
        if pad:
            bits = np.concatenate([bits, np.zeros((pad, self.width), dtype=bits.dtype)])
        kernels.popcount_add(bits, self.out, kernels.threads())
        self.words, self.buffered = [], 0


def pair_counter(width: int, dtype: torch.dtype, device: str, kernel: str = "auto", panel: torch.dtype | None = None):
    """The accumulator for `kernel` on `device`: on a CPU, auto is BitCounts (with numba) and gemm is
    PanelCounts; on a GPU, gemm products into DeviceCounts with `panel` panels (None: float32 if this layer's
    fit, see device_panel)."""
    cpu = str(device) == "cpu"
    if kernel in ("popcount", "sparse") or (kernel == "auto" and cpu and kernels.AVAILABLE):
        if not cpu:
            raise ValueError(f"the {kernel} kernel runs on the CPU only")
        return BitCounts(width, dtype, kernel)
    if cpu:
        return PanelCounts(width, dtype, device)
    return DeviceCounts(width, dtype, device, panel or device_panel(panel_cells(width), device))
