"""Data chunks, by the convention outside checks rely on.

Read the file as UTF-8, tokenize it whole without special tokens, cut consecutive non-overlapping chunks
of `ctx` tokens, drop the trailing partial chunk, and, when the tokenizer has a BOS token, put it in place
of the first token of every chunk.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .errors import UserError


def read_text(path: str) -> tuple[str, str]:
    """Return (text, sha256 of the file's bytes)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UserError(f"--data {path}: cannot read ({exc.strerror}); give a readable text file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--data {path}: not UTF-8 (byte {exc.start}); convert the file to UTF-8") from None
    if not text.strip():
        raise UserError(f"--data {path}: the file is empty; give a text file with at least one chunk of text")
    return text, hashlib.sha256(raw).hexdigest()


def tokenize(text: str, tokenizer) -> np.ndarray:
    """Token ids of the whole text, no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def make_chunks(ids: np.ndarray, ctx: int, bos_id: int | None) -> np.ndarray:
    """[n_chunks, ctx] array of consecutive chunks, the trailing partial one dropped, BOS first if any."""
    n = len(ids) // ctx
    chunks = ids[: n * ctx].reshape(n, ctx).copy()
    if bos_id is not None and n:
        chunks[:, 0] = bos_id
    return chunks


def select(chunks: np.ndarray, start: int, count: int | None, path: str, ctx: int) -> tuple[int, int]:
    """Validate and return (start, count) of the chunks to process."""
    n = len(chunks)
    if n == 0:
        raise UserError(f"--data {path}: too short for one chunk of --ctx {ctx} tokens; lower --ctx or add text")
    if start >= n:
        raise UserError(f"--chunk-start {start}: {path} has only {n} chunks of {ctx} tokens (0..{n - 1})")
    if count is None:
        return start, n - start
    if start + count > n:
        raise UserError(f"--chunks {count}: {path} has {n} chunks of {ctx} tokens, "
                        f"so at most {n - start} from --chunk-start {start}")
    return start, count
