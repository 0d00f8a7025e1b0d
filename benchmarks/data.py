"""The data path of a run alone (no model): a generated jsonl corpus streamed through pass 1 (data.scan, shared
over the ranks) and pass 2 (each rank's data.ChunkSource over its static share of the batches), under mpirun.

    python benchmarks/data.py --tokens 5e6,5e7 --ranks 2              # one corpus and one mpirun per size

Per size it prints one JSON line: tokens, pass-1 seconds, time to the first batch, pass-2 tokens/s and peak
RSS per rank. The tokenizer is mpicorr.tiny's (byte-level BPE, trained offline on the sample text); the
corpus is random words of the sample text in documents of 50 to 2000 words, written once into --work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpicorr import corpus, data  # noqa: E402

CTX, BATCH = 512, 8


def make_corpus(path: str, tokens: int, tokenizer) -> None:
    """A jsonl of documents of random words, about `tokens` tokens (measured on the first documents)."""
    from mpicorr import tiny

    words = tiny.sample_text().split()
    rng = random.Random(0)
    per_char, written = None, 0
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        while per_char is None or written * per_char < tokens:
            doc = " ".join(rng.choice(words) for _ in range(rng.randint(50, 2000)))
            if per_char is None:
                per_char = len(tokenizer(doc, add_special_tokens=False)["input_ids"]) / len(doc)
            fh.write(json.dumps({"text": doc}) + "\n")
            written += len(doc)
    os.replace(path + ".tmp", path)


def worker(args) -> None:
    """One rank: pass 1 with the others, then this rank's contiguous share of the batches."""
    from transformers import PreTrainedTokenizerFast

    from mpicorr import dist

    comm = dist.world()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    started = time.monotonic()
    source = corpus.open_corpus(args.worker)
    kept = data.Kept()  # as a run keeps its pass-1 ids for pass 2
    layout = data.scan(source, tokenizer, CTX, "concat", None, comm, kept)
    scanned = time.monotonic()
    share = -(-layout.chunks // comm.size)
    first, last = comm.rank * share, min(layout.chunks, (comm.rank + 1) * share)
    chunks = data.ChunkSource(source, layout, tokenizer, kept)
    first_batch, checksum = None, 0
    for b0 in range(first, last, BATCH):
        ids = chunks.get(b0, min(b0 + BATCH, last))
        checksum += int(ids.sum())
        first_batch = first_batch or time.monotonic()
    done = time.monotonic()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = comm.allgather({"rank": comm.rank, "pass1_s": round(scanned - started, 2),
                           "first_batch_s": round((first_batch or done) - started, 2),
                           "pass2_tokens_per_s": round((last - first) * CTX / max(done - scanned, 1e-9)),
                           "peak_rss_mb": round(rss, 1), "checksum": checksum})
    if comm.rank == 0:
        print(json.dumps({"corpus_tokens": layout.tokens(), "documents": len(layout.doc_tokens),
                          "chunks": layout.chunks, "ranks": comm.size, "total_s": round(done - started, 2),
                          "tokens_per_s": round(layout.tokens() / (done - started)), "per_rank": rows}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="5e6,5e7", help="corpus sizes in tokens, comma-separated")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of each mpirun (default: 2)")
    parser.add_argument("--work", default="/tmp/mpicorr-data-bench", help="folder for the corpora and tokenizer")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from mpicorr import tiny

    os.makedirs(args.work, exist_ok=True)
    tok_dir = os.path.join(args.work, "tokenizer")
    tokenizer = tiny.build_tokenizer(tiny.sample_text())
    tokenizer.save_pretrained(tok_dir)
    for size in (int(float(t)) for t in args.tokens.split(",")):
        path = os.path.join(args.work, f"corpus-{size}.jsonl")
        if not os.path.exists(path):
            make_corpus(path, size, tokenizer)
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        subprocess.run(["mpirun", "--oversubscribe", "-n", str(args.ranks), sys.executable, os.path.abspath(__file__),
                        "--worker", path, "--tokenizer", tok_dir], check=True, env=env)


if __name__ == "__main__":
    main()
