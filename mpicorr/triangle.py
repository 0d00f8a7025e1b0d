"""The packed lower triangle: C[i, j] for j <= i, row-major, row i at offset i(i+1)/2.

This is the layout of the matrix files, so counts are accumulated in it directly: no N x N copy.
"""

from __future__ import annotations

import numpy as np
import torch

# fp32 holds every integer up to 2**24 exactly, so a product of 0/1 matrices over at most this many
# tokens is an exact count.
EXACT_TOKENS = 1 << 24
# Elements of one fp32 product panel (64 MiB): bounds the scratch memory of a counting step.
PANEL_ELEMENTS = 1 << 24


def packed_size(width: int) -> int:
    """Number of entries of the lower triangle (diagonal included)."""
    return width * (width + 1) // 2


def offset(row: int) -> int:
    """Index of C[row, 0] in the packed triangle."""
    return row * (row + 1) // 2


def panels(width: int, elements: int = PANEL_ELEMENTS) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) whose panel (r1 - r0) x r1 holds at most about `elements` entries."""
    rows = max(1, elements // max(width, 1))
    return [(r0, min(r0 + rows, width)) for r0 in range(0, width, rows)]


def lower_mask(r0: int, r1: int, device: torch.device | str) -> torch.Tensor:
    """Boolean (r1 - r0) x r1 mask of the entries j <= i of rows r0..r1-1; masked order = packed order."""
    i = torch.arange(r0, r1, device=device)[:, None]
    j = torch.arange(r1, device=device)[None, :]
    return j <= i


def accumulate(packed: torch.Tensor, fired: torch.Tensor) -> None:
    """packed += lower triangle of fired.T @ fired, for a [tokens, width] 0/1 float32 matrix. Exact."""
    width = fired.shape[1]
    for t0 in range(0, fired.shape[0], EXACT_TOKENS):
        part = fired[t0 : t0 + EXACT_TOKENS]
        for r0, r1 in panels(width):
            prod = part[:, r0:r1].T @ part[:, :r1]
            packed[offset(r0) : offset(r1)] += prod[lower_mask(r0, r1, prod.device)].to(packed.dtype)


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
