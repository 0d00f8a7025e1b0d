"""The packed lower triangle C[i, j], j <= i, row-major, row i at offset i(i+1)/2: the matrix files' layout.

    from mpicorr import layout
    layout.diagonal(packed, width)          # C[i, i], each neuron's firing count, of packed counts

Numpy only, so that the file tools (info, verify, sum) and the readers start without torch; the
accumulators that fill a triangle live in mpicorr.triangle, which re-exports these names.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

# Cells per block of whole rows in full_row_blocks: 32 MB as int64.
ROW_BLOCK_ELEMENTS = 1 << 22


def packed_size(width: int) -> int:
    """Number of entries of the lower triangle (diagonal included)."""
    return width * (width + 1) // 2


def offset(row: int) -> int:
    """Index of C[row, 0] in the packed triangle."""
    return row * (row + 1) // 2


def full_row_blocks(packed: np.ndarray, width: int, elements: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """(r0, r1, C[r0:r1, :] as int64) over blocks of whole rows of about `elements` cells (default
    ROW_BLOCK_ELEMENTS), so that a pass over a 14336-wide layer never holds the full matrix."""
    step = max(1, (elements or ROW_BLOCK_ELEMENTS) // max(width, 1))
    for r0 in range(0, width, step):
        r1 = min(r0 + step, width)
        yield r0, r1, rows(packed, r0, r1, width).astype(np.int64)


def diagonal(packed: np.ndarray, width: int) -> np.ndarray:
    """C[i, i] for all i."""
    idx = np.arange(width, dtype=np.int64)
    return packed[idx * (idx + 1) // 2 + idx]


def rows(packed: np.ndarray, r0: int, r1: int, width: int) -> np.ndarray:
    """Full symmetric rows C[r0:r1, 0:width] gathered from the packed triangle."""
    return rows_at(packed, np.arange(r0, r1), np.arange(width))


def rows_at(packed: np.ndarray, rows_idx: np.ndarray, cols_idx: np.ndarray) -> np.ndarray:
    """C[rows_idx][:, cols_idx] of the symmetric matrix, gathered from the packed triangle."""
    i = np.asarray(rows_idx, dtype=np.int64)[:, None]
    j = np.asarray(cols_idx, dtype=np.int64)[None, :]
    return packed[np.where(j <= i, i * (i + 1) // 2 + j, j * (j + 1) // 2 + i)]


def unpack(packed: np.ndarray, width: int) -> np.ndarray:
    """The full symmetric width x width matrix (for small widths and tests)."""
    return rows(packed, 0, width, width)
