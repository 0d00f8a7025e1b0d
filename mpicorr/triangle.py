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
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from . import fused, kernels
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


def panels(width: int, elements: int = PANEL_ELEMENTS, multiple: int = 1) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) whose panel (r1 - r0) x r1 holds at most about `elements` entries (at least
    `multiple` rows, every start a multiple of it). Panels start at multiples of ALIGN_ROWS where they are that
    tall: a GEMM operand starting at column r0 of the firing matrix is then 128-byte aligned (on an H100,
    misaligned bfloat16 operands ran the products 4x slower)."""
    rows = max(multiple, elements // max(width, 1))
    rows = rows - rows % ALIGN_ROWS if rows >= ALIGN_ROWS else rows - rows % multiple
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

    def add(self, fired: torch.Tensor, active: np.ndarray | None = None) -> None:
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

    The 0/1 operand is the firing matrix transposed, F' [N', T'] (neurons x tokens, zero-padded to multiples
    of PAD), in the element type of the fastest exact product this device offers (`product_kind`, measured):
    panel rows r0..r1 get F'[r0:r1] @ F'[:r1]^T, a row-major times a column-major view of one tensor, which is
    the layout the fp8 and int8 tensor-core GEMMs want. Every product sum is an integer below 2**24 (at most
    the tokens of one call), exact in each product's output type. `panel` float32 means wide panels (float32,
    or int32 for int8 products; flushed every 2**24 tokens, in practice only at the end); int16 means narrow
    panels (half the memory), whose counts wrap modulo 2**16 and are read back as uint16, exact up to 65535
    tokens between flushes (with tensor-core products the limit is a multiple of PAD, 65504, and each batch
    counts as its padded tokens); those flushes are packed on the device and added into the host triangle by a
    background thread (`Flusher`) while counting goes on. On a CPU (the tests) the product is float32.
    """

    LIMITS = {torch.float32: EXACT_TOKENS, torch.int32: (1 << 31) - 1, torch.int16: (1 << 16) - 1}

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str, panel: torch.dtype = torch.int16,
                 elements: int | None = None, limit: int | None = None, product: str | None = None):
        super().__init__(width, dtype)
        self.width, self.device = width, torch.device(device)
        self.product = product or product_kind(self.device)
        self.panel = ACCUMULATORS[self.product] if panel == torch.float32 else panel
        self.limit = min(limit or self.LIMITS[self.panel], self.LIMITS[self.panel])
        if self.product != "fp32":  # tensor-core GEMMs take token counts in multiples of PAD
            self.limit = max(PAD, self.limit - self.limit % PAD)
        self.padded = round_up(width, PAD)
        self.spans = panels(self.padded, elements or PANEL_ELEMENTS, PAD)  # GEMM sizes: multiples of PAD
        self.acc = [torch.zeros(r1 - r0, r1, dtype=self.panel, device=device) for r0, r1 in self.spans]
        self.pending = 0
        self.flushed = False  # until the first flush, `out` is all zero
        self.flushing: list[Future] = []  # narrow panels' flushes still being added into `out`

    def operand(self, thresholds: int, tokens: int) -> tuple[torch.Tensor, int]:
        """(an uninitialised [thresholds, N', T'] buffer of the operand's storage type, the bits of a 1 in it):
        what fused.stats fills; add_transposed takes one [N', T'] slice of it."""
        storage, one, _ = OPERANDS[self.product]
        return torch.empty(thresholds, self.padded, round_up(tokens, PAD), dtype=storage, device=self.device), one

    def add(self, fired: torch.Tensor, active: np.ndarray | None = None) -> None:
        """Count a [tokens, width] bool matrix (`active` is not needed here)."""
        tokens = fired.shape[0]
        op = torch.zeros(self.padded, round_up(tokens, PAD), dtype=OPERANDS[self.product][2], device=self.device)
        op[: self.width, :tokens] = fired.T
        self.add_transposed(op)

    def add_transposed(self, op: torch.Tensor) -> None:
        """Count the tokens of F' [N', T'] (padding columns are zero), in parts of at most `limit` tokens."""
        op = op.view(OPERANDS[self.product][2])
        for t0 in range(0, op.shape[1], self.limit):
            part = op if op.shape[1] <= self.limit else op[:, t0 : t0 + self.limit].contiguous()
            if self.pending + part.shape[1] > self.limit:
                self._flush(wait=False)
            for (r0, r1), acc in zip(self.spans, self.acc):
                accumulate(acc, self.product, part[r0:r1], part[:r1].T)
            self.pending += part.shape[1]

    def flush(self) -> None:
        """Add the device panels into the host triangle, clear them, and wait until `out` holds everything."""
        self._flush(wait=True)

    def _flush(self, wait: bool) -> None:
        if self.pending or not self.flushed:
            packed = self._pack()
            if self.panel == torch.int16:  # wrapped int16 counts are uint16 bits; added by a background thread
                self.flushing.append(flusher(packed.device).submit(packed, self.out))  # (an indexed device)
            elif self.flushed:
                host_add(self.out, to_host(packed))
            else:  # the first flush (the only one of most wide-panel runs): the counts so far are the panels
                self.out = to_host(packed).astype(self.out.dtype, copy=False)
            self.flushed, self.pending = True, 0
        if wait:
            self.wait()

    def wait(self) -> None:
        """Wait until every flush handed to the Flusher so far has been added into `out` (a timing that stops
        its clock before would leave out their copies and host adds)."""
        while self.flushing:
            self.flushing.pop(0).result()

    def _pack(self) -> torch.Tensor:
        """The panels' lower triangles as one packed device tensor (int16 bits, or the host width); panels
        zeroed."""
        packed = torch.empty(packed_size(self.width), dtype=torch.int16 if self.panel == torch.int16 else self.dtype,
                             device=self.device)
        for (r0, r1), acc in zip(self.spans, self.acc):
            if r0 < self.width:
                pack_panel(acc, r0, self.width, packed)
        for acc in self.acc:
            acc.zero_()
        return packed

    def add_packed(self, packed: np.ndarray) -> None:
        """Add counts given as a packed lower triangle (a checkpoint's), after the device's (so that `out` is
        no longer taken to be zero)."""
        self.flush()
        super().add_packed(packed)


class Flusher:
    """Adds packed narrow panels (int16 bits of uint16 counts) into host triangles on a background thread: the
    copy to pinned memory on its own CUDA stream, after the packing on the counting stream, then a threaded
    add; at most `pending` flushes in flight (each holds a packed copy on the device), so a burst of flushes
    (every layer reaches the limit in the same batch) waits instead of filling the GPU."""

    def __init__(self, device: torch.device, pending: int = 4):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mpicorr-flush")
        self.slots = threading.BoundedSemaphore(pending)

    def submit(self, packed: torch.Tensor, out: np.ndarray) -> Future:
        """Queue out += packed (as uint16); returns the future to wait on before reading `out`."""
        self.slots.acquire()
        try:
            ready = None
            if self.stream is not None:
                with fused.on_device(packed):  # the event marks the packing on its GPU's current stream
                    ready = torch.cuda.Event()
                    ready.record()
                packed.record_stream(self.stream)  # not reused by the allocator before the copy is done
            return self.pool.submit(self._add, packed, ready, out)
        except BaseException:
            self.slots.release()
            raise

    def _add(self, packed: torch.Tensor, ready, out: np.ndarray) -> None:
        try:
            if self.stream is None:
                host = packed.numpy()
            else:
                with fused.on_device(packed), torch.cuda.stream(self.stream):  # a new thread starts on cuda:0
                    self.stream.wait_event(ready)
                    pinned = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
                    pinned.copy_(packed, non_blocking=True)
                    self.stream.synchronize()
                host = pinned.numpy()
            del packed
            host_add(out, host.view(np.uint16))
        finally:
            self.slots.release()


_FLUSHERS: dict[str, Flusher] = {}
_FLUSHERS_LOCK = threading.Lock()


def flusher(device: torch.device) -> Flusher:
    """The one Flusher of a device."""
    with _FLUSHERS_LOCK:
        if str(device) not in _FLUSHERS:
            _FLUSHERS[str(device)] = Flusher(device)
        return _FLUSHERS[str(device)]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_panel(acc: torch.Tensor, r0: int, width: int, packed: torch.Tensor) -> None:
    """packed[offset(r0) ...] <- the lower triangle of panel `acc` (rows r0.., below `width`), converted."""
    if fused.AVAILABLE and acc.device.type == "cuda":
        fused.pack_rows(acc, r0, width, packed)
        return
    r1 = min(r0 + acc.shape[0], width)
    rows = acc[: r1 - r0, :r1]
    packed[offset(r0) : offset(r1)] = rows[lower_mask(r0, r1, acc.device)].to(packed.dtype)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A device tensor as a host numpy array, copied through pinned memory (about twice as fast)."""
    if tensor.device.type != "cuda":
        return tensor.numpy()
    with fused.on_device(tensor):  # the pinned buffer and the copy belong to the tensor's GPU
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor)
    return host.numpy()


def host_add(out: np.ndarray, part: np.ndarray) -> None:
    """out += part, on several threads (numpy releases the GIL; one thread adds about 1 GB/s)."""
    threads = max(1, min(HOST_THREADS, len(os.sched_getaffinity(0)), len(out) // (1 << 20)))
    bounds = np.linspace(0, len(out), threads + 1).astype(np.int64)

    def add(k: int) -> None:
        out[bounds[k] : bounds[k + 1]] += part[bounds[k] : bounds[k + 1]]

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(add, range(threads)))


# Pair-count products and their operands: (storage type, bits of a 1 in it, the type the GEMM reads).
OPERANDS = {"fp8": (torch.uint8, 0x38, torch.float8_e4m3fn), "int8": (torch.int8, 1, torch.int8),
            "bf16": (torch.int16, 0x3F80, torch.bfloat16), "fp32": (torch.float32, 1, torch.float32)}
# The wide panel type each product accumulates into (int8 products are int32: no 2**24 limit).
ACCUMULATORS = {"fp8": torch.float32, "int8": torch.int32, "bf16": torch.float32, "fp32": torch.float32}
# Operand rows and token columns are padded to multiples of this: fp8 GEMMs need 16, torch._int_mm more
# than 16 rows, and aligned operands keep the tensor cores at full rate.
PAD = 32


def product(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 0/1 operands of `kind` (a row-major, b column-major): float32, or int32 for int8."""
    if kind == "fp8":
        one = _unit_scale(a.device)
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
    if kind == "int8":
        return torch._int_mm(a, b)
    if kind == "bf16":
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b)


def accumulate(acc: torch.Tensor, kind: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b exactly: in the GEMM itself where the types allow (float32 panels of bf16 or float32
    products), else through the product's float32/int32 result."""
    if acc.dtype == torch.float32 and kind == "fp32":
        acc.addmm_(a, b)
    elif acc.dtype == torch.float32 and kind == "bf16" and bf16_addmm(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        part = product(kind, a, b)
        if part.dtype == acc.dtype:
            acc += part
        elif fused.AVAILABLE and acc.device.type == "cuda":
            fused.add_into(acc, part)  # int16 panels: no converted copy of the product
        else:
            acc += part.to(torch.int32).to(acc.dtype)  # int16 panels wrap (read back as uint16)


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32, device=device)


@functools.cache
def bf16_addmm(device: torch.device) -> bool:
    """Whether this torch adds a bfloat16 product into a float32 tensor in place (torch >= 2.8)."""
    ones = torch.ones(3000, 24, dtype=torch.bfloat16, device=device)  # 3000 > 256: a bfloat16 sum would round
    acc = torch.ones(24, 24, dtype=torch.float32, device=device)
    try:
        torch.addmm(acc, ones.T, ones, out_dtype=torch.float32, out=acc)
        return bool((acc == 3001).all())
    except (TypeError, RuntimeError):
        return False


_KINDS: dict[str, str] = {}


def product_kind(device: torch.device | str) -> str:
    """The fastest exact 0/1 product on this device, measured once per process: fp8 (torch._scaled_mm, compute
    capability >= 8.9), int8 (torch._int_mm), bf16 (float32 output, torch >= 2.8) or float32. Each candidate
    must reproduce an exact reference product first; the choice changes speed only, never a count."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    if str(device) not in _KINDS:
        _KINDS[str(device)] = min(exact_products(device), key=lambda kind: _time_product(kind, device))
    return _KINDS[str(device)]


def exact_products(device: torch.device) -> list[str]:
    """The product kinds that run on this device and give the exact counts of a random 0/1 case."""
    fired = torch.rand(PAD * 40, 2 * PAD * 20, device=device) < 0.3  # [neurons, tokens]: sums up to 1280
    want = fired.double() @ fired.double().T
    kinds = []
    for kind in ("fp8", "int8", "bf16", "fp32"):
        try:
            op = fired.to(OPERANDS[kind][2])
            if torch.equal(product(kind, op, op.T).double(), want):
                kinds.append(kind)
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):
            continue  # not supported by this torch or GPU
    return kinds


def _time_product(kind: str, device: torch.device) -> float:
    """Milliseconds for accumulating one panel of a representative size (1024 rows x 4096 columns over 8192
    tokens) into that product's wide panel type, as a run does per layer and batch."""
    op = (torch.rand(4096, 8192, device=device) < 0.1).to(OPERANDS[kind][2])
    acc = torch.zeros(1024, 4096, dtype=ACCUMULATORS[kind], device=device)
    with fused.on_device(acc):  # the events record on the current device's stream: make it acc's
        for _ in range(2):
            accumulate(acc, kind, op[:1024], op.T)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            accumulate(acc, kind, op[:1024], op.T)
        end.record()
        end.synchronize()
    return start.elapsed_time(end)


def panel_cells(width: int, elements: int = PANEL_ELEMENTS, pad: int = PAD) -> int:
    """Cells of a width's device row panels (the lower triangle and the few cells above it inside the panels,
    the width padded as DeviceCounts pads it)."""
    return sum((r1 - r0) * r1 for r0, r1 in panels(round_up(width, pad), elements, pad))


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

    def add(self, fired: torch.Tensor, active: np.ndarray | None = None) -> None:
        """Count a [tokens, width] bool matrix (`active`: its per-token counts of firing neurons, if known)."""
        f = np.ascontiguousarray(fired.cpu().numpy())
        if active is None and self.kernel not in ("sparse", "popcount"):
            active = kernels.active_counts(f)
        if self.kernel == "sparse" or (self.kernel not in ("sparse", "popcount") and self._sparse_is_cheaper(active)):
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
    if cpu and panel is None:
        return PanelCounts(width, dtype, device)
    return DeviceCounts(width, dtype, device, panel or device_panel(panel_cells(width), device))
