"""Data chunks, by the convention outside checks rely on.

Read the file as UTF-8, tokenize it whole without special tokens, cut consecutive non-overlapping chunks
of `ctx` tokens, drop the trailing partial chunk, and, when the tokenizer has a BOS token, put it in place
of the first token of every chunk.

A corpus (mpicorr.corpus: shards of documents) follows the same rule over its documents' concatenated tokens
(--chunking concat) or cuts each document alone (--chunking document); scan() finds the chunk layout with
all ranks together, and a ChunkSource on each rank tokenizes only the documents of the chunks it counts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .corpus import Corpus, data_sha256, open_corpus  # noqa: F401 (run.py reads --data through this module)
from .corpus import file_sha256, read_text_file
from .errors import UserError


def read_text(path: str) -> tuple[str, str]:
    """Return (text, sha256 of the file's bytes) of a plain text file."""
    return read_text_file(path), file_sha256(path)


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


def select(n: int, start: int, count: int | None, path: str, ctx: int) -> tuple[int, int]:
    """Validate and return (start, count) of the chunks to process, of `n` available."""
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


# --- Corpora: pass 1 (every rank tokenizes every size-th document to learn its length) gives the chunk layout;
# pass 2 (ChunkSource) tokenizes, on each rank, only the documents that cover the chunks it counts.

CHUNKINGS = ("concat", "document")
ROUND_DOCS = 4096        # documents per pass-1 round at most: one small sum over the ranks each
ROUND_CHARS = 1 << 23    # characters per pass-1 round at most (a round's text is held on every rank)
ENCODE_DOCS = 256        # documents tokenized per call (their token id lists are held until counted)
KEEP_TOKENS = 1 << 24    # token ids a rank keeps from pass 1 for pass 2 (int32: 64 MB at most, overheads included)
KEEP_DOC_COST = 80       # what a kept document costs beyond its ids, in ids (its array, digest, dict entry: ~280 bytes)


@dataclass(frozen=True)
class Layout:
    """Where every chunk comes from; computed identically on every rank from the documents' token counts.

    concat: the documents' tokens one after another, cut every ctx tokens. document: each document alone
    (BOS first when the tokenizer has one) cut every ctx tokens, its remainder (and a document shorter than
    ctx) dropped.
    """

    chunking: str
    ctx: int
    bos_id: int | None
    doc_tokens: np.ndarray    # int64, tokens of each document read (no BOS), in corpus order
    shard_first: np.ndarray   # int64, index of the first document of each shard read
    chunks: int               # chunks available (within --max-tokens)
    complete: bool            # the whole corpus was read (False: pass 1 stopped at --max-tokens)

    @property
    def doc_lengths(self) -> np.ndarray:
        """Tokens each document contributes before cutting (document mode: with its BOS)."""
        extra = 1 if self.chunking == "document" and self.bos_id is not None else 0
        return self.doc_tokens + extra

    @property
    def doc_chunks(self) -> np.ndarray:
        """document mode: how many chunks each document gives."""
        return self.doc_lengths // self.ctx

    def tokens(self) -> int:
        """Tokens of the documents read."""
        return int(self.doc_tokens.sum())

    def skipped(self) -> tuple[int, int]:
        """document mode: (documents shorter than ctx, tokens dropped: those documents and remainders)."""
        lengths = self.doc_lengths
        return int((lengths < self.ctx).sum()), int((lengths % self.ctx).sum())


def available_chunks(chunking: str, lengths: np.ndarray, ctx: int) -> int:
    """Chunks that documents of these lengths give."""
    if chunking == "concat":
        return int(lengths.sum()) // ctx
    return int((lengths // ctx).sum())


class Kept:
    """Token ids of documents this rank tokenized in pass 1, kept for its pass 2 (the earliest documents, up to
    `budget` int32 ids' worth of memory in all, each document's overhead counted as KEEP_DOC_COST ids), so that
    those are not tokenized twice: one rank counting a corpus that fits (a wikitext-2 file) tokenizes it once.
    Pass 2 takes each one out as it uses it.

    Each kept document also keeps a digest of its text: pass 2 still reads every document it uses, and takes the
    ids only if that text is the one pass 1 tokenized. A document rewritten in between is tokenized again, so the
    run counts what it reads now and its length check ("changed while the run read it") fires as it would
    without keeping; otherwise the rank that happened to keep it would count the old text, the others the new."""

    def __init__(self, budget: int = KEEP_TOKENS):
        self.budget, self.ids = budget, OrderedDict()  # in document order: the earliest leave first, in O(1)

    def offer(self, doc: int, ids: list[int], text: str) -> None:
        """Keep document `doc`'s ids (tokenized from `text`) if they fit in what is left of the budget (offered in
        document order)."""
        cost = len(ids) + KEEP_DOC_COST  # a corpus of short documents would otherwise hold ~70x its ids' bytes
        if cost <= self.budget:
            array = np.asarray(ids, dtype=np.int64)
            small = not len(array) or array.max() < 1 << 31
            self.ids[doc] = (array.astype(np.int32) if small else array, text_digest(text))
            self.budget -= cost
        else:
            self.budget = 0  # the earliest only: pass 2 reads forward, so those are used first

    def take(self, doc: int, text: str) -> np.ndarray | None:
        """Document `doc`'s ids (int64), or None if they were not kept or `text` is not the text they came from;
        they and those of every earlier document (which pass 2, reading forward, will not ask for: another
        rank's chunks) are forgotten."""
        while self.ids and next(iter(self.ids)) < doc:
            self.ids.popitem(last=False)
        ids, digest = self.ids.pop(doc, (None, None))
        return None if ids is None or digest != text_digest(text) else ids.astype(np.int64)


def text_digest(text: str) -> bytes:
    """A document's fingerprint: BLAKE2b-128 of its UTF-8 bytes (a small fraction of tokenizing it)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def scan(corpus, tokenizer, ctx: int, chunking: str, max_tokens: int | None, comm, keep: Kept | None = None) -> Layout:
    """Pass 1, on every rank of `comm` together: each rank tokenizes the documents with index % size == rank,
    a sum over the ranks per round of ROUND_DOCS documents gives every rank every count. Stops early once
    --max-tokens worth of chunks is known. `keep`: where this rank keeps the ids it tokenized, for pass 2."""
    bos = tokenizer.bos_token_id
    extra = 1 if chunking == "document" and bos is not None else 0
    want = None if max_tokens is None else max_tokens // ctx
    counts, shard_first, tokens, chunks, done = [], [], 0, 0, False
    docs = _numbered(corpus, shard_first)
    while not done and (want is None or chunks < want):
        first = sum(len(c) for c in counts)
        block, done = comm.checked(lambda: _round(docs, tokenizer, comm.rank, comm.size, first, keep))
        block = comm.allreduce_sum(block)
        counts.append(block)
        tokens += int(block.sum())
        chunks = tokens // ctx if chunking == "concat" else chunks + available_chunks(chunking, block + extra, ctx)
    doc_tokens = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    n = chunks if want is None else min(chunks, want)
    layout = Layout(chunking, ctx, bos, doc_tokens, np.asarray(shard_first, np.int64), n, done)
    if n == 0:
        raise UserError(f"--data {corpus.spec}: too short for one chunk of --ctx {ctx} tokens"
                        f"{' in --chunking document (every document is shorter)' if chunking == 'document' else ''}"
                        f"; lower --ctx or add text")
    return layout


def _numbered(corpus, shard_first: list[int]):
    """The corpus's documents, noting in `shard_first` the index of each shard's first document."""
    index = 0
    for shard in corpus.shards:
        shard_first.append(index)
        for text in corpus.shard_documents(shard):
            yield text
            index += 1


def _round(docs, tokenizer, rank: int, size: int, first: int = 0, keep: Kept | None = None) -> tuple[np.ndarray, bool]:
    """The next ROUND_DOCS documents (fewer when they reach ROUND_CHARS characters; the first is document
    `first`): this rank's token counts of its share (0 elsewhere), and whether the corpus ended. Every rank
    reads the same documents, so all agree on where a round ends. `keep` is offered this rank's ids."""
    texts, chars, ended = [], 0, True
    for text in docs:
        texts.append(text)
        chars += len(text)
        if len(texts) == ROUND_DOCS or chars >= ROUND_CHARS:
            ended = False
            break
    counts = np.zeros(len(texts), np.int64)
    mine = range(rank, len(texts), size)
    for i in range(0, len(mine), ENCODE_DOCS):
        part = mine[i : i + ENCODE_DOCS]
        for j, ids in zip(part, encode(tokenizer, [texts[j] for j in part])):
            counts[j] = len(ids)
            if keep is not None:
                keep.offer(first + j, ids, texts[j])
    return counts, ended


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text alone, no special tokens added (one call: fast tokenizers work in parallel)."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


class ChunkSource:
    """Pass 2 on one rank: the token ids of chunks [b0, b1), read forward through the corpus. Documents before
    the ones needed are read but not tokenized; whole shards before them are not even opened. Asking for an
    earlier chunk than the last reopens the corpus at that chunk's shard (correct, only slower)."""

    def __init__(self, corpus, layout: Layout, tokenizer, kept: Kept | None = None):
        self.corpus, self.layout, self.tokenizer = corpus, layout, tokenizer
        self.kept = kept or Kept(0)                              # ids pass 1 kept on this rank
        self.doc_end = np.cumsum(layout.doc_tokens)              # concat: end offset of each document
        self.doc_chunks = layout.doc_chunks                      # document: chunks of each document
        self.chunk_end = np.cumsum(self.doc_chunks)              # document: end chunk of each document
        self.docs, self.next_doc = None, 0                       # the open document stream, its next index
        self.cached: tuple[int, np.ndarray] | None = None        # the last document tokenized

    def get(self, b0: int, b1: int) -> np.ndarray:
        """[b1 - b0, ctx] int64 token ids of chunks [b0, b1)."""
        if not 0 <= b0 < b1 <= self.layout.chunks:
            raise ValueError(f"chunks [{b0}, {b1}) outside the layout's {self.layout.chunks}")
        if self.layout.chunking == "concat":
            return self._concat(b0, b1)
        return np.stack([self._piece(i) for i in range(b0, b1)])

    def _concat(self, b0: int, b1: int) -> np.ndarray:
        ctx, bos = self.layout.ctx, self.layout.bos_id
        a, b = b0 * ctx, b1 * ctx
        first = int(np.searchsorted(self.doc_end, a, side="right"))
        last = int(np.searchsorted(self.doc_end, b - 1, side="right"))
        pieces = []
        for d, ids in self._ids(first, last):
            start = int(self.doc_end[d]) - len(ids)
            pieces.append(ids[max(a - start, 0) : max(min(b - start, len(ids)), 0)])
        chunks = np.concatenate(pieces).reshape(b1 - b0, ctx)
        if bos is not None:
            chunks[:, 0] = bos
        return chunks

    def _piece(self, i: int) -> np.ndarray:
        ctx, bos = self.layout.ctx, self.layout.bos_id
        d = int(np.searchsorted(self.chunk_end, i, side="right"))
        j = i - (int(self.chunk_end[d]) - int(self.doc_chunks[d]))
        _, ids = next(self._ids(d, d))
        if bos is None:
            return ids[j * ctx : (j + 1) * ctx]
        # the document is [BOS] + ids; its piece j starts with BOS in any case (replacing the token there)
        return np.concatenate([[bos], ids[j * ctx : (j + 1) * ctx - 1]]).astype(np.int64)

    def _ids(self, first: int, last: int):
        """(index, token ids) of documents first..last, tokenized together (those pass 1 kept are not tokenized
        again); the last one is kept, since the next batch often starts inside it."""
        if self.cached is not None and self.cached[0] == first:
            yield self.cached
            first += 1
            if first > last:
                return
        texts = self._texts(first, last)
        kept = [self.kept.take(d, text) for d, text in zip(range(first, last + 1), texts)]
        todo = [text for text, ids in zip(texts, kept) if ids is None]
        fresh = iter(encode(self.tokenizer, todo) if todo else [])
        for d, ids in zip(range(first, last + 1), kept):
            ids = next(fresh) if ids is None else ids
            if len(ids) != self.layout.doc_tokens[d]:
                raise UserError(f"--data {self.corpus.spec}: document {d} changed while the run read it "
                                f"({len(ids)} tokens, {self.layout.doc_tokens[d]} before); rerun on an unchanging "
                                f"corpus")
            self.cached = (d, np.asarray(ids, dtype=np.int64))
            yield self.cached

    def _texts(self, first: int, last: int) -> list[str]:
        if self.docs is None or first < self.next_doc:
            shard = int(np.searchsorted(self.layout.shard_first, first, side="right")) - 1
            self.docs, self.next_doc = self.corpus.documents(shard), int(self.layout.shard_first[shard])
        texts = []
        while self.next_doc <= last:
            text = next(self.docs)
            if self.next_doc >= first:
                texts.append(text)
            self.next_doc += 1
        return texts


def prefetched(batches: Iterable[tuple[int, int]], get: Callable[[int, int], np.ndarray],
               ahead: bool) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """(batch, its token ids) for each batch; with `ahead` (a list of batches known in advance: the static
    schedule), the next batch's ids are read on a thread while the caller works on this one (the tokenizers
    release the GIL), one batch at a time, so a ChunkSource is never used by two threads at once."""
    if not ahead:
        for b0, b1 in batches:
            yield (b0, b1), get(b0, b1)
        return
    todo = list(batches)
    with ThreadPoolExecutor(1, thread_name_prefix="mpicorr-data") as pool:
        pending = pool.submit(get, *todo[0]) if todo else None
        for i, batch in enumerate(todo):
            ids = pending.result()
            pending = pool.submit(get, *todo[i + 1]) if i + 1 < len(todo) else None
            yield batch, ids
