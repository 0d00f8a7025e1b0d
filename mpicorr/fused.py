"""One pass over a batch of activations on the GPU (Triton): everything a layer counts, in one kernel.

For x of shape [tokens, N] the kernel `_stats` reads each value once and produces
- the 0/1 firing matrix of each threshold, transposed ([N', T'] neurons x tokens, zero-padded to the
  product's alignment) and already in the element type of the pair-count product (fp8, int8, bf16 or
  fp32 ones), so the tensor cores read it without a conversion (triangle.DeviceCounts.add_transposed);
- per-neuron fire counts and per-token active counts for each threshold;
- the fixed-point act_sum and act_sumsq (x rounded to 2**-24, x*x to 2**-16, half to even, as torch.round);
- the act_hist bins, as per-tile byte counters (below), summed by `hist_words_add`;
- a flag for values with |x| >= 2**20 or not finite.
The integers are exactly those of counting.LayerCounts' torch path (the reference in the tests).

Histogram: a neuron's 67 bins need one counter each; per GROUP * BT <= 255 tokens the counters are bytes,
four to an int32 word (bin b in byte b % 4 of word b // 4), so a value costs 17 selects instead of 67
comparisons; each thread keeps its neuron's 17 words in registers and stores them once per 128 tokens.

Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) runs the same kernel source on
CPU tensors: that is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:  # no Triton (CPU-only torch without it): counting uses the torch reference path
    AVAILABLE = False

ACT_LIMIT = float(1 << 20)  # counting.ACT_LIMIT (kept here so that counting can import this module)
HIST_WORDS = 17             # ceil(67 bins / 4 bytes)
BT = 16                     # tokens per tile
BN = 128                    # neurons per program: one per thread of 4 warps
GROUP = 8                   # tiles per row of byte counters (GROUP * BT <= 255 tokens)
GROUPS = 8                  # rows per program: per-neuron sums go to memory once per 1024 tokens


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make `tensor`'s GPU the current CUDA device for the block (a no-op for CPU tensors). Triton launches,
    torch.cuda.Event.record and the current stream all use the current device, not the tensors': with
    --gpus-per-rank a layer's counts live on cuda:1 while cuda:0 is current, and an unguarded launch runs on the
    wrong GPU or faults."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def tile_count(tokens: int) -> int:
    """Rows of the histogram scratch for a batch (GROUP * BT tokens each)."""
    return -(-tokens // (GROUP * BT))


if AVAILABLE:
    @triton.jit
    def _rint32(v):
        # Round half to even in float32 arithmetic, exact for any |v|: values >= 2**23 are integers already.
        a = tl.abs(v)
        a = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
        return tl.where(v < 0, -a, a)

    @triton.jit
    def _rint64(v):
        a = tl.abs(v)
        a = tl.where(a < 4503599627370496.0, (a + 4503599627370496.0) - 4503599627370496.0, a)
        return tl.where(v < 0, -a, a)

    @triton.jit(do_not_specialize=["x_col"])
    def _stats(x_ptr, x_stride, x_col, T, N, thr_ptr, ft_ptr, ft_stride_m, ft_stride_n, T_pad, N_pad,
               fire_ptr, active_ptr, sum_ptr, sumsq_ptr, words_ptr, flag_ptr,
               M: tl.constexpr, MP: tl.constexpr, ONE: tl.constexpr, WIDE: tl.constexpr, BF16: tl.constexpr,
               BT: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr, GROUPS: tl.constexpr):
        # Each thread owns one neuron column: x_col (the column stride, 1) is not specialised, so Triton does not
        # vectorise the loads along the neurons and keeps lanes and warps along them; every sum over tokens then
        # stays in a thread's registers (no shuffles), and selecting a row of a small accumulator by a constant
        # index compiles to one add. Tokens come in tiles of BT, GROUP tiles (<= 255 tokens) per row of byte
        # counters in `words`.
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_in = n < N
        rows = tl.arange(0, MP)
        wrows = tl.arange(0, 32)
        fire_acc = tl.zeros([MP, BN], dtype=tl.int32)
        sum_acc = tl.zeros([BN], dtype=tl.int64)
        sq_acc = tl.zeros([BN], dtype=tl.int64)
        bad = tl.zeros([BN], dtype=tl.int32)
        for g in range(GROUPS):
            row = tl.program_id(0) * GROUPS + g
            words = tl.zeros([32, BN], dtype=tl.int32)
            for k in range(GROUP):
                t = row * (GROUP * BT) + k * BT + tl.arange(0, BT)
                valid = (t < T)[:, None] & n_in[None, :]
                x = tl.load(x_ptr + t[:, None].to(tl.int64) * x_stride + n[None, :] * x_col, mask=valid, other=0)
                if BF16:  # bfloat16 bits (int16) widened by a shift: exact for every value, where the interpreter's
                    xf = (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)  # cast turns subnormals into others
                else:
                    xf = x.to(tl.float32)
                ax = tl.abs(xf)
                bits = xf.to(tl.int32, bitcast=True)
                # |x| >= 2**20, inf or NaN, on the bits (2**20 is 0x49800000): Triton compiles with NoNaNsFPMath,
                # under which a float comparison such as ~(ax < 2**20) may come out false for NaN
                bad = tl.maximum(bad, tl.max(tl.where(valid & ((bits & 0x7FFFFFFF) >= 0x49800000), 1, 0), axis=0))
                # Fired matrices, stored transposed in the product's element type; padding gets zeros.
                store = (t < T_pad)[:, None] & (n < N_pad)[None, :]
                for m in tl.static_range(M):
                    fired = valid & (ax >= tl.load(thr_ptr + m))
                    ones = tl.where(fired, 1, 0)
                    out = ft_ptr + m * ft_stride_m + n[None, :].to(tl.int64) * ft_stride_n + t[:, None]
                    tl.store(out, tl.where(fired, ONE, 0).to(ft_ptr.dtype.element_ty), mask=store)
                    fire_acc += tl.where(rows[:, None] == m, tl.sum(ones, axis=0)[None, :], 0)
                    tl.atomic_add(active_ptr + m * T + t, tl.sum(ones, axis=1), mask=t < T)
                # Fixed point: x * 2**24 is exact in float32, as are bf16/fp16 squares; float32 squares in fp64.
                sum_acc += tl.sum(tl.where(valid, _rint32(xf * 16777216.0).to(tl.int64), 0), axis=0)
                if WIDE:
                    xd = xf.to(tl.float64)
                    sq = _rint64(xd * xd * 65536.0).to(tl.int64)
                else:
                    sq = _rint32(xf * xf * 65536.0).to(tl.int64)
                sq_acc += tl.sum(tl.where(valid, sq, 0), axis=0)
                # act_hist bin from the float32 bits (counting.hist_bins): 2 log2|x| classes, mirrored for x < 0.
                step = ((bits >> 23) & 0xFF) * 2 + tl.where((bits & 0x7FFFFF) >= 0x3504F3, 1, 0)
                magnitude = tl.minimum(tl.maximum(step - 233, 0), 33)
                b = tl.where(bits < 0, 33 - magnitude, 33 + magnitude)
                inc = tl.where(valid, 1 << ((b & 3) * 8), 0)
                word = b >> 2
                for w in tl.static_range(17):
                    words += tl.where(wrows[:, None] == w, tl.sum(tl.where(word == w, inc, 0), axis=0)[None, :], 0)
            keep = (wrows < 17)[:, None] & (n_in & (n * 0 + row * (GROUP * BT) < T))[None, :]
            tl.store(words_ptr + row.to(tl.int64) * (17 * N) + wrows[:, None] * N + n[None, :], words, mask=keep)
        for m in tl.static_range(M):
            part = tl.sum(tl.where(rows[:, None] == m, fire_acc, 0), axis=0)
            tl.atomic_add(fire_ptr + m * N + n, part.to(tl.int64), mask=n_in)
        tl.atomic_add(sum_ptr + n, sum_acc, mask=n_in)
        tl.atomic_add(sumsq_ptr + n, sq_acc, mask=n_in)
        tl.atomic_max(flag_ptr, tl.max(bad, axis=0))

    @triton.jit
    def _pack_rows(acc_ptr, acc_stride, r0, N, out_ptr, BC: tl.constexpr):
        """Row i = r0 + program of a panel -> its run in the packed triangle, out[i(i+1)/2 ...] (columns 0..i)."""
        i = r0 + tl.program_id(0)
        j = tl.program_id(1) * BC + tl.arange(0, BC)
        keep = (j <= i) & (j * 0 + i < N)
        value = tl.load(acc_ptr + tl.program_id(0).to(tl.int64) * acc_stride + j, mask=keep, other=0)
        tl.store(out_ptr + i.to(tl.int64) * (i + 1) // 2 + j, value.to(out_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _add_into(acc_ptr, part_ptr, count, BLOCK: tl.constexpr):
        """acc += part, elementwise, in acc's type (int16 panels += float32 or int32 products, wrapping)."""
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = k < count
        part = tl.load(part_ptr + k, mask=keep).to(tl.int32).to(acc_ptr.dtype.element_ty)  # int16: wraps
        total = tl.load(acc_ptr + k, mask=keep) + part
        tl.store(acc_ptr + k, total, mask=keep)


def stats(x: torch.Tensor, thresholds: torch.Tensor, ft: torch.Tensor, one: int, fire_count: torch.Tensor,
          active: torch.Tensor, act_sum: torch.Tensor, act_sumsq: torch.Tensor, words: torch.Tensor,
          flag: torch.Tensor) -> None:
    """Run `_stats` on x [T, N] (rows contiguous). Adds into fire_count [M, N], active [M, T] (int32, zeroed by
    the caller), act_sum, act_sumsq (int64 [N]), writes ft [M, N', T'] and words [tile_count(T), 17, N], and
    raises flag[0] to 1 on a value with |x| >= 2**20 or not finite. `thresholds`: float32 [M], each exactly
    representable in x's dtype (counting.exact_threshold). A batch of no tokens (an MoE expert no token was
    routed to) adds nothing and launches nothing: Triton refuses a grid of 0 programs."""
    tokens, width = x.shape
    if tokens == 0:
        return
    wide, bf16 = x.dtype == torch.float32, x.dtype == torch.bfloat16
    data = x.view(torch.int16) if bf16 else x  # bfloat16 goes in as its bits (see _stats)
    m = thresholds.numel()
    groups = min(GROUPS, triton.next_power_of_2(tile_count(tokens)))  # small batches: no idle loop rounds
    grid = (-(-tile_count(tokens) // groups), -(-max(width, ft.shape[1]) // BN))
    with on_device(x):
        _stats[grid](data, x.stride(0), x.stride(1), tokens, width, thresholds, ft, ft.stride(0), ft.stride(1),
                     ft.shape[2], ft.shape[1], fire_count, active, act_sum, act_sumsq, words, flag, M=m,
                     MP=triton.next_power_of_2(m), ONE=one, WIDE=wide, BF16=bf16, BT=BT, BN=BN,
                     GROUP=GROUP, GROUPS=groups)


def hist_words_add(act_hist: torch.Tensor, words: torch.Tensor, width: int, bins: int) -> None:
    """act_hist [width * bins] += the byte counters of `words` [tiles, 17, width] summed over tiles."""
    counts = words.view(torch.uint8).view(words.shape[0], HIST_WORDS, width, 4).sum(0, dtype=torch.int64)
    act_hist.view(width, bins).add_(counts.permute(1, 0, 2).reshape(width, 4 * HIST_WORDS)[:, :bins])


def pack_rows(acc: torch.Tensor, r0: int, width: int, out: torch.Tensor) -> None:
    """out[offset(r0) ...] <- the lower triangle of panel `acc` (rows r0.., columns 0..), rows < width."""
    rows = min(acc.shape[0], width - r0)
    if rows <= 0:
        return
    block = 1024
    with on_device(acc):
        _pack_rows[(rows, -(-min(acc.shape[1], width) // block))](acc, acc.stride(0), r0, width, out, BC=block)


def add_into(acc: torch.Tensor, part: torch.Tensor) -> None:
    """acc += part for contiguous tensors of one shape, converting part to acc's type (exact for counts)."""
    block = 4096
    with on_device(acc):
        _add_into[(-(-acc.numel() // block),)](acc, part, acc.numel(), BLOCK=block)
