"""Compiled CPU kernels that add exact pair counts into a packed lower triangle (the only numba user).

numba compiles them for the CPU it runs on at first use (AVX-512 VPOPCNTDQ where there is one, scalar
POPCNT or plain bit arithmetic elsewhere) and caches the result. Without numba, `AVAILABLE` is False and
counting falls back to the portable GEMM path (triangle.PanelCounts).

- popcount: tokens packed 64 per word, C[i, j] += popcount(bits_i & bits_j) summed over words; the cost
  is about N^2/2 * tokens/64 whatever the density (zero words of row i are skipped).
- sparse: for each token, every pair of its active neurons, as the original recorder did; the cost is
  the number of active pairs, so it wins only when few neurons fire.
Both split the work by rows (row i ≡ t mod threads, `threads` = numba.get_num_threads(), passed in so
that the compiled code can be cached), so no two threads write the same count.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import njit, prange
    AVAILABLE = True
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    AVAILABLE = False

M1, M2, M4, H01 = (np.uint64(0x5555555555555555), np.uint64(0x3333333333333333),
                   np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0x0101010101010101))


def pack_bits(fired: np.ndarray, group: int = 8) -> np.ndarray:
    """[tokens, N] bool -> [W, N] uint64, bit t of word w of neuron i = token 64 w + t; W is a multiple of
    `group` (tokens padded with zeros, which add nothing). popcount_add needs groups of 8 words."""
    tokens, width = fired.shape
    words = group * -(-tokens // (64 * group))
    padded = np.zeros((words * 64, width), dtype=bool)
    padded[:tokens] = fired
    packed = np.packbits(padded.reshape(words, 64, width), axis=1, bitorder="little")  # [W, 8, N] bytes
    return np.ascontiguousarray(packed.transpose(0, 2, 1)).view("<u8").reshape(words, width)


def threads() -> int:
    """Threads the kernels split rows over."""
    return numba.get_num_threads()


def active_lists(fired: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices): the active neurons of each token, ascending (CSR rows)."""
    tokens, neurons = np.nonzero(fired)
    indptr = np.zeros(fired.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(tokens, minlength=fired.shape[0]), out=indptr[1:])
    return indptr, neurons.astype(np.int64)


if AVAILABLE:
    @njit(inline="always")
    def _popcount(x):
        # The classic bit-twiddling count; LLVM turns it into the CPU's popcount instruction where there is one.
        x = x - ((x >> np.uint64(1)) & M1)
        x = (x & M2) + ((x >> np.uint64(2)) & M2)
        x = (x + (x >> np.uint64(4))) & M4
        return np.int64((x * H01) >> np.uint64(56))

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
                        out[base + j] += (_popcount(a0 & b0[j]) + _popcount(a1 & b1[j]) + _popcount(a2 & b2[j])
                                          + _popcount(a3 & b3[j]) + _popcount(a4 & b4[j]) + _popcount(a5 & b5[j])
                                          + _popcount(a6 & b6[j]) + _popcount(a7 & b7[j]))

    @njit(parallel=True, cache=True, nogil=True)
    def sparse_add(indptr, indices, out, threads):  # pragma: no cover - compiled; tested through its results
        """For every token, out[packed(a, b)] += 1 for each pair b <= a of its active neurons."""
        tokens = indptr.shape[0] - 1
        for t in prange(threads):
            for tok in range(tokens):
                lo, hi = indptr[tok], indptr[tok + 1]
                for x in range(lo, hi):
                    a = indices[x]
                    if a % threads != t:
                        continue
                    base = a * (a + 1) // 2
                    for y in range(lo, x + 1):
                        out[base + indices[y]] += 1
