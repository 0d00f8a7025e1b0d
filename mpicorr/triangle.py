"""The packed lower triangle C[i, j], j <= i, row-major, row i at offset i(i+1)/2 (the matrix files'
layout), and PanelCounts, which accumulates it exactly without ever holding an N x N matrix.
"""

from __future__ import annotations

import numpy as np
import torch

# fp32 holds every integer up to 2**24 exactly, so fp32 sums of 0/1 products over at most this many
# tokens are exact counts.
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
        """Count a [tokens, width] 0/1 float32 matrix: panel += fired[:, rows].T @ fired[:, :r1]."""
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
