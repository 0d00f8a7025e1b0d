"""SHA-256 of files, one or several at once on a few threads: the one hasher of --data's manifest (corpus) and
of the files --stage-model and --stage-data copy (stage). No torch, no MPI. A file that cannot be read raises
the OSError; each caller words its own error.

What hashing costs: one read of the files, at the disk's speed when there are several (a 14 GB model in 8
shards on a local NVMe drive: about 5-10 s), paid by rank 0 on --data's shards and on the sources it stages,
and by each node on its staged copy at every run; small beside loading the model, and the only way to notice
bytes changed in place.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

PIECE = 8 << 20  # bytes read per hash update
THREADS = 8      # files hashed at once (hashlib releases the GIL on large updates)


def sha256_file(path: str) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while piece := fh.read(PIECE):
            digest.update(piece)
    return digest.hexdigest()


def sha256_files(paths: list[str], hasher: Callable[[str], str] = sha256_file) -> list[str]:
    """hasher(path) of each path (default sha256_file; a caller's wrapper words its errors), several files at
    once, in the order given; the first file's error is the one raised."""
    if not paths:
        return []
    with ThreadPoolExecutor(min(THREADS, len(paths))) as pool:
        return list(pool.map(hasher, paths))
