"""Compiled CPU kernels that add exact pair counts into a packed lower triangle (the only numba user).

numba compiles them for the CPU it runs on at first use (LLVM picks that CPU's popcount instructions,
or plain bit arithmetic where there are none) and caches the result. Without numba, `AVAILABLE` is False and
counting falls back to the portable GEMM path (triangle.PanelCounts).

- popcount: tokens packed 64 per word, C[i, j] += popcount(bits_i & bits_j) summed over words; the cost
  is about N^2/2 * tokens/64 whatever the density (512-token groups where neuron i never fired are skipped).
- sparse: for each token, every pair of its active neurons, as the original recorder did, but in row
  blocks that fit the cache; the cost is the number of active pairs, so it wins when few neurons fire.
Both split the work by rows (popcount: row i ≡ t mod threads, `threads` = numba.get_num_threads(),
passed in so that the compiled code can be cached; sparse: whole row blocks), so no two threads write
the same count.
"""

from __future__ import annotations

import numpy as np

from . import cpus

cpus.restore()  # numba sizes its thread pool from this thread's CPUs as it loads, not the one torch's OpenMP pinned
try:
    import numba
    from numba import njit, prange
    AVAILABLE = True
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    AVAILABLE = False

CACHE_ENTRIES = 1 << 17  # counts per sparse row block: 512 KiB of int32, within a core's L2 cache
M1, M2, M4, H01 = (np.uint64(0x5555555555555555), np.uint64(0x3333333333333333),
                   np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0x0101010101010101))


def pack_bits(fired: np.ndarray, group: int = 8) -> np.ndarray:
    """[tokens, N] bool -> [W, N] uint64, bit t of word w of neuron i = token 64 w + t; W is a multiple of
    `group` (tokens padded with zeros, which add nothing). popcount_add needs groups of 8 words."""
    tokens, width = fired.shape
    bits = np.zeros((group * -(-tokens // (64 * group)), width), dtype=np.uint64)
    _pack(np.ascontiguousarray(fired), bits)
    return bits


def threads() -> int:
    """Threads the kernels split rows over."""
    return numba.get_num_threads()


def row_blocks(width: int, entries: int | None = None) -> np.ndarray:
    """Row boundaries [0, ..., width] such that each block's packed counts hold about `entries` entries."""
    entries = entries or CACHE_ENTRIES
    bounds, r = [0], 0
    while r < width:
        r = min(width, max(r + 1, int((2 * (r * (r + 1) // 2 + entries)) ** 0.5)))
        bounds.append(r)
    return np.array(bounds, dtype=np.int64)


def active_lists(fired: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices): the active neurons of each token, ascending (CSR rows); `counts` if known."""
    fired = np.ascontiguousarray(fired)
    indptr = np.zeros(fired.shape[0] + 1, dtype=np.int64)
    np.cumsum(active_counts(fired) if counts is None else counts, out=indptr[1:])
    indices = np.empty(indptr[-1], dtype=np.int64)
    _fill_active(fired, indptr, indices)
    return indptr, indices


if AVAILABLE:
    @njit(inline="always")
    def _popcount(x):
        # The classic bit-twiddling count; LLVM turns it into the CPU's popcount instruction where there is one.
        x = x - ((x >> np.uint64(1)) & M1)
        x = (x & M2) + ((x >> np.uint64(2)) & M2)
        x = (x + (x >> np.uint64(4))) & M4
        return np.int64((x * H01) >> np.uint64(56))

    @njit(parallel=True, cache=True, nogil=True)
    def _pack(fired, bits):  # pragma: no cover - compiled; tested through its results
        tokens, width = fired.shape
        for w in prange(-(-tokens // 64)):
            for t in range(64 * w, min(64 * w + 64, tokens)):
                shift = np.uint64(t - 64 * w)
                for i in range(width):
                    bits[w, i] |= np.uint64(fired[t, i]) << shift

    @njit(parallel=True, cache=True, nogil=True)
    def active_counts(fired):  # pragma: no cover - compiled; tested through its results
        """Active neurons per token (int64); reads the bools 8 at a time as one 64-bit word."""
        tokens, width = fired.shape
        whole = width // 8 * 8
        counts = np.zeros(tokens, dtype=np.int64)
        for t in prange(tokens):
            words = fired[t, :whole].view(np.uint64)
            c = 0
            for w in words:
                c += np.int64((w * H01) >> np.uint64(56))  # sum of the 8 bytes, each 0 or 1
            for i in range(whole, width):
                c += fired[t, i]
            counts[t] = c
        return counts

    @njit(parallel=True, cache=True, nogil=True)
    def _fill_active(fired, indptr, indices):  # pragma: no cover - compiled; tested through its results
        tokens, width = fired.shape
        whole = width // 8 * 8
        for t in prange(tokens):
            words = fired[t, :whole].view(np.uint64)
            k = indptr[t]
            for w in range(words.shape[0]):
                if words[w] != 0:  # most words are zero when firing is sparse: skip 8 neurons at once
                    for i in range(8 * w, 8 * w + 8):
                        if fired[t, i]:
                            indices[k] = i
                            k += 1
            for i in range(whole, width):
                if fired[t, i]:
                    indices[k] = i
                    k += 1

    @njit(parallel=True, cache=True, nogil=True)
    def popcount_add(bits, out, threads):  # pragma: no cover - compiled; tested through its results
        """out[packed(i, j)] += popcount over words of bits[:, i] & bits[:, j], for all j <= i.

        Words go 8 at a time (512 tokens) with the 8 terms written out, so that the loop over j is a
        straight run over 8 contiguous streams that LLVM vectorizes; pack_bits pads to whole groups.
        """
        words, width = bits.shape
        for t in prange(threads):
            for i in range(t, width, threads):
                base = i * (i + 1) // 2
                for g in range(0, words, 8):
                    a0, a1, a2, a3 = bits[g, i], bits[g + 1, i], bits[g + 2, i], bits[g + 3, i]
                    a4, a5, a6, a7 = bits[g + 4, i], bits[g + 5, i], bits[g + 6, i], bits[g + 7, i]
                    if (a0 | a1 | a2 | a3 | a4 | a5 | a6 | a7) == 0:
                        continue
                    b0, b1, b2, b3 = bits[g], bits[g + 1], bits[g + 2], bits[g + 3]
                    b4, b5, b6, b7 = bits[g + 4], bits[g + 5], bits[g + 6], bits[g + 7]
                    for j in range(i + 1):
                        out[np.uint64(base + j)] += (_popcount(a0 & b0[j]) + _popcount(a1 & b1[j]) + _popcount(a2 & b2[j])
                                          + _popcount(a3 & b3[j]) + _popcount(a4 & b4[j]) + _popcount(a5 & b5[j])
                                          + _popcount(a6 & b6[j]) + _popcount(a7 & b7[j]))

    @njit(parallel=True, cache=True, nogil=True)
    def sparse_add(indptr, indices, out, blocks, threads):  # pragma: no cover - compiled; tested via results
        """For every token, out[packed(a, b)] += 1 for each pair b <= a of its active neurons.

        Rows are taken in blocks [blocks[k], blocks[k + 1]) whose counts fit in the CPU cache, and each
        block walks all tokens, so the updates hit the cache instead of main memory (the original's land
        anywhere in a 411 MB triangle). Each thread owns a run of whole blocks, so no count is shared, and
        keeps one cursor per token into its active list, advanced block by block.
        """
        tokens, nblocks = indptr.shape[0] - 1, blocks.shape[0] - 1
        for t in prange(threads):
            k0, k1 = t * nblocks // threads, (t + 1) * nblocks // threads
            cursor = np.empty(tokens, dtype=np.int64)
            for tok in range(tokens):
                lo, hi = indptr[tok], indptr[tok + 1]
                cursor[tok] = lo + np.searchsorted(indices[lo:hi], blocks[k0])
            for k in range(k0, k1):
                r1 = blocks[k + 1]
                for tok in range(tokens):
                    lo, hi, x = indptr[tok], indptr[tok + 1], cursor[tok]
                    while x < hi and indices[x] < r1:
                        a = indices[x]
                        base = a * (a + 1) // 2
                        for y in range(lo, x + 1):
                            out[np.uint64(base + indices[y])] += 1  # unsigned: no negative-index test
                        x += 1
                    cursor[tok] = x

    @njit(parallel=True, cache=True, nogil=True)
    def fused_stats(x, bits, limits, fired, fire_count, active, act_sum, act_sumsq, act_hist, blocks, bad):  # pragma: no cover
        """One pass over x [T, N] float32 (bits: the same memory as int32) for every per-batch statistic of
        counting.LayerCounts, the CPU twin of mpicorr.fused: fired [M, T, N] bools (zeroed by the caller) at
        the thresholds `limits` (exact values of x's source type); adds into fire_count [M, N], act_sum and
        act_sumsq (fixed point, half to even), act_hist [N * 67]; per-token active counts of neuron block k
        into active [k, M, T] and a bad value (|x| >= 2**20 or not finite) into bad[k]. Threads own blocks of
        neurons (blocks: their boundaries), so no two write one sum.

        Each token's slice of a block goes through three short loops (firing, sums, histogram bins) rather
        than one: the first two have no branch and no scattered store, so LLVM vectorizes them, and the
        histogram's scatter runs over precomputed indices (2.8x faster than one loop doing everything)."""
        tokens, width = x.shape
        for k in prange(blocks.shape[0] - 1):
            lo, hi = blocks[k], blocks[k + 1]
            worst = 0  # the largest float32 exponent seen: |x| >= 2**20 (or inf, nan) is exponent >= 147
            where = np.empty(hi - lo, dtype=np.int64)
            for t in range(tokens):
                for m in range(limits.shape[0]):
                    limit, c = limits[m], 0
                    for n in range(lo, hi):
                        f = abs(x[t, n]) >= limit
                        fired[m, t, n] = f
                        fire_count[m, n] += f
                        c += f
                    active[k, m, t] = c
                for n in range(lo, hi):
                    d = np.float64(x[t, n])
                    act_sum[n] += np.int64(np.rint(d * 16777216.0))
                    act_sumsq[n] += np.int64(np.rint(d * d * 65536.0))
                for n in range(lo, hi):
                    b = bits[t, n]
                    e = (b >> 23) & 0xFF
                    worst = max(worst, e)
                    mag = min(max(e * 2 + ((b & 0x7FFFFF) >= 0x3504F3) - 233, 0), 33)
                    where[n - lo] = n * 67 + 33 + (-mag if b < 0 else mag)
                for i in range(hi - lo):
                    act_hist[where[i]] += 1
            if worst >= 147:
                bad[k] = 1

    @njit(cache=True, nogil=True)
    def top_partner_keys(packed, width, k):  # pragma: no cover - compiled; tested against summary's numpy path
        """[width, k] int64, per neuron the k largest keys count * width + (width - 1 - j) over partners
        j != i with C[i, j] > 0, descending, padded with -1: one pass over the packed triangle in file order,
        each count offered to both of its rows (keys are unique within a row, so the order is irrelevant)."""
        keys = np.full((width, k), -1, dtype=np.int64)
        for i in range(width):
            base = i * (i + 1) // 2
            for j in range(i):
                c = np.int64(packed[base + j])
                if c > 0:
                    _offer(keys, i, c * width + (width - 1 - j), k)
                    _offer(keys, j, c * width + (width - 1 - i), k)
        return keys

    @njit(inline="always")
    def _offer(keys, row, key, k):  # pragma: no cover - compiled
        if key > keys[row, k - 1]:
            p = k - 1
            while p > 0 and keys[row, p - 1] < key:
                keys[row, p] = keys[row, p - 1]
                p -= 1
            keys[row, p] = key
