"""`info`, `verify` and `sum` for matrix files (mpicorr's and the original tool's).

    python -m mpicorr info runs/a/correlations_block_0.zstd
    python -m mpicorr verify runs/a/*.zstd
    python -m mpicorr sum merged.zstd runs/a/correlations_block_0.zstd runs/b/correlations_block_0.zstd
"""

from __future__ import annotations

import os

import numpy as np

from . import matrixfile, triangle
from .errors import UserError


def info(path: str) -> str:
    """One line describing a matrix file's header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(matrixfile.HEADER.size)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    h = matrixfile.parse_header(head, path)
    kind = "uint32" if h.magic == matrixfile.MAGIC32 else "uint64"
    return (f"{path}: block {h.block}, width {h.width}, trials {h.trials}, {kind} counts, "
            f"{os.path.getsize(path)} bytes")


def verify(path: str) -> None:
    """Read the file fully and check its counts are consistent; raise UserError on the first problem."""
    header, packed = matrixfile.read_matrix(path)
    diag = triangle.diagonal(packed, header.width).astype(np.uint64)
    if (diag > header.trials).any():
        i = int(np.argmax(diag > header.trials))
        raise UserError(f"{path}: neuron {i} fired {diag[i]} times in {header.trials} trials")
    for r0, r1 in triangle.panels(header.width, 1 << 22):
        rows = triangle.rows(packed, r0, r1, header.width).astype(np.uint64)
        bad = (rows > diag[None, :]) | (rows > diag[r0:r1, None])
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise UserError(f"{path}: C[{r0 + i}, {j}] = {rows[i, j]} exceeds a diagonal count "
                            f"({diag[r0 + i]}, {diag[j]})")


def sum_files(out: str, inputs: list[str], force: bool = False) -> str:
    """Add matrix files of one block and width (trials added) into `out`; return a summary line."""
    if os.path.exists(out) and not force:
        raise UserError(f"{out}: exists; choose another output name or add --force")
    total, first, trials = None, None, 0
    for path in inputs:
        header, packed = matrixfile.read_matrix(path)
        if first is None:
            first, total = header, packed.astype(np.uint64)
        elif (header.block, header.width) != (first.block, first.width):
            raise UserError(f"{path}: block {header.block} width {header.width} does not match "
                            f"{inputs[0]} (block {first.block} width {first.width}); sum one block at a time")
        else:
            total += packed
        trials += header.trials
    matrixfile.write_matrix(out, first.block, first.width, trials, total)
    return f"{out}: {len(inputs)} files summed, block {first.block}, width {first.width}, trials {trials}"
