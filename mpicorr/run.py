"""One counting run: prepare (rank 0) -> plan -> load model -> count my chunks -> reduce -> write (rank 0).

This is the one place where ranks take different branches.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from . import __version__, data, matrixfile, models, plan, summary
from .config import Config
from .counting import NLL_BITS, LayerCounts, chunk_nll, count_dtype, split_stats
from .dist import Comm
from .errors import UserError
from .hooks import recording
from .progress import Progress

SITE = "ffn"


@dataclass(frozen=True)
class Job:
    """What rank 0 works out before any model is loaded, broadcast to all ranks."""

    chunks: np.ndarray            # [count, ctx] token ids of the processed chunks
    chunk_start: int
    available: int                # chunks the data file holds
    data_sha256: str
    plan: list[plan.Assignment]


def load_chunks(cfg: Config) -> tuple[np.ndarray, str, int, int]:
    """(all chunks of the data file, its sha256, first chunk, chunk count) with the model's tokenizer."""
    models.check_model(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    text, sha = data.read_text(cfg.data)
    all_chunks = data.make_chunks(data.tokenize(text, tokenizer), cfg.ctx, tokenizer.bos_token_id)
    start, count = data.select(all_chunks, cfg.chunk_start, cfg.chunks, cfg.data, cfg.ctx)
    return all_chunks, sha, start, count


def prepare(cfg: Config, hosts: list[str]) -> Job:
    """Validate inputs, cut the data into chunks and split them over the ranks (runs on rank 0)."""
    all_chunks, sha, start, count = load_chunks(cfg)
    weights = hostfile_weights(cfg.hostfile, hosts)
    check_out(cfg.out, cfg.force)
    work = plan.make_plan(start, count, cfg.batch_size, hosts, weights)
    return Job(all_chunks[start : start + count], start, len(all_chunks), sha, work)


def dry_plan(cfg: Config, ranks: int) -> str:
    """The plan table for `ranks` ranks placed by slot over the hostfile (Open MPI's default), no model loaded."""
    all_chunks, _, start, count = load_chunks(cfg)
    if cfg.hostfile is None:
        hosts, weights, devices = ["-"] * ranks, [1.0] * ranks, ["auto"] * ranks
    else:
        slots = plan.by_slot(read_hostfile(cfg.hostfile), ranks, cfg.hostfile)
        hosts = [line.host for line, _ in slots]
        weights = [line.weight for line, _ in slots]
        devices = [f"gpu {local}" for _, local in slots]
    work = plan.make_plan(start, count, cfg.batch_size, hosts, weights)
    head = (f"{cfg.data}: {len(all_chunks)} chunks of {cfg.ctx} tokens; processing {count} "
            f"[{start}, {start + count}) in batches of {cfg.batch_size} on {ranks} rank(s)")
    return head + "\n" + plan.format_plan(work, devices)


def read_hostfile(path: str) -> list[plan.HostLine]:
    """The parsed hostfile."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--hostfile {path}: cannot read ({exc}); fix the path or leave it out") from None
    return plan.parse_hostfile(text, path)


def hostfile_weights(path: str | None, hosts: list[str]) -> list[float]:
    """Per-rank weights from the hostfile, or equal weights without one."""
    if path is None:
        return [1.0] * len(hosts)
    return plan.rank_weights(read_hostfile(path), hosts, path)


def check_out(out: str, force: bool) -> None:
    """Create the output folder; refuse to overwrite a previous run's outputs unless forced."""
    if not force and (matrixfile.exists_any(out) or summary.exists(out)):
        raise UserError(f"--out {out}: already holds outputs of a run; choose another folder or add --force")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"--out {out}: folder is not writable; choose another --out")


def count_chunks(model, sites, chunks: np.ndarray, cfg: Config, total_tokens: int, device: str,
                 progress: Progress | None) -> tuple[list[LayerCounts], int, int]:
    """Forward `chunks` in batches while counting; returns (counts per layer, fixed-point NLL, predictions)."""
    dtype = count_dtype(total_tokens)
    counts = [LayerCounts(s.layer, s.width, cfg.threshold, dtype, device) for s in sites]
    causal = models.is_causal_lm(model)
    nll, predictions = 0, 0
    with torch.inference_mode(), recording(sites, counts):
        for b0 in range(0, len(chunks), cfg.batch_size):
            ids = torch.from_numpy(chunks[b0 : b0 + cfg.batch_size]).to(device)
            out = model(input_ids=ids, use_cache=False)
            if causal:
                part, n = chunk_nll(out.logits, ids)
                nll, predictions = nll + part, predictions + n
            if progress:
                progress.update(len(ids))
    return counts, nll, predictions


def run(cfg: Config, comm: Comm) -> None:
    """Count, reduce and write one run; every rank calls this."""
    hosts = comm.allgather(comm.host)
    device = comm.checked(lambda: models.resolve_device(cfg.device, comm.local_rank))
    devices = comm.allgather(device)
    job = comm.checked(lambda: prepare(cfg, hosts), root_only=True)
    mine = job.plan[comm.rank]
    total_tokens = len(job.chunks) * cfg.ctx
    if comm.rank == 0:
        print(f"mpicorr {__version__}: {len(job.chunks)} chunks [{job.chunk_start}, "
              f"{job.chunk_start + len(job.chunks)}) of {job.available} x {cfg.ctx} tokens on {comm.size} rank(s)")
        print(plan.format_plan(job.plan, devices), flush=True)
    model = comm.checked(lambda: models.load_model(cfg.model, models.resolve_dtype(cfg.dtype, device), device))
    sites = models.find_sites(model)
    mine_chunks = job.chunks[mine.start - job.chunk_start : mine.stop - job.chunk_start]
    progress = Progress(len(mine_chunks), cfg.ctx) if comm.rank == 0 else None
    started = time.monotonic()
    counts, nll, predictions = count_chunks(model, sites, mine_chunks, cfg, total_tokens, device, progress)
    del model
    reduce_and_write(cfg, comm, job, sites, counts, nll, predictions, time.monotonic() - started)


def reduce_and_write(cfg: Config, comm: Comm, job: Job, sites, counts: list[LayerCounts], nll: int,
                     predictions: int, seconds: float) -> None:
    """Sum every layer onto rank 0, one layer at a time, and write the outputs there."""
    tokens = len(job.chunks) * cfg.ctx
    path = os.path.join(cfg.out, summary.SUMMARY)
    with summary.summary_writer(path) if comm.rank == 0 else nullcontext() as h5:
        for site, lc in zip(sites, counts):
            pairs = comm.reduce_sum(lc.pairs.packed())
            stats = comm.reduce_sum(lc.stats())
            lc.pairs = None  # free this rank's copy before the next layer
            if comm.rank == 0:
                matrixfile.write_matrix(os.path.join(cfg.out, matrixfile.matrix_name(site.layer)),
                                        site.layer, site.width, tokens, pairs)
                summary.write_layer(h5, site.layer, *summary.layer_datasets(
                    split_stats(stats, site.width), pairs, site.width, tokens))
        totals = comm.reduce_sum(np.array([nll, predictions], dtype=np.int64))
        if comm.rank == 0:
            h5.attrs.update(root_attributes(cfg, comm, job, sites, totals))
    if comm.rank == 0:
        report(cfg, perplexity(totals), tokens, len(sites), seconds)


def perplexity(totals: np.ndarray) -> float | None:
    """Perplexity from the summed fixed-point NLL and the number of predictions (None if no LM head)."""
    nll, predictions = int(totals[0]), int(totals[1])
    return math.exp(nll / float(1 << NLL_BITS) / predictions) if predictions else None


def root_attributes(cfg: Config, comm: Comm, job: Job, sites, totals: np.ndarray) -> dict:
    """Root attributes of summary.h5."""
    attrs = {
        "model": cfg.model, "data": cfg.data, "data_sha256": job.data_sha256, "ctx": cfg.ctx,
        "chunk_start": job.chunk_start, "chunks": len(job.chunks), "chunks_available": job.available,
        "tokens": len(job.chunks) * cfg.ctx, "threshold": cfg.threshold, "site": SITE,
        "site_modules": [s.name for s in sites], "ranks": comm.size, "batch_size": cfg.batch_size,
        "dtype": cfg.dtype, "mpicorr_version": __version__, "command": cfg.command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nll_sum": int(totals[0]) / float(1 << NLL_BITS), "predictions": int(totals[1]),
    }
    ppl = perplexity(totals)
    if ppl is not None:
        attrs["perplexity"] = ppl
    return attrs


def report(cfg: Config, ppl: float | None, tokens: int, layers: int, seconds: float) -> None:
    """The closing lines on rank 0."""
    if ppl is not None:
        print(f"mpicorr: perplexity {ppl:.4f} over {tokens} tokens")
    print(f"mpicorr: counted {layers} layers in {seconds:.1f} s; outputs in {os.path.abspath(cfg.out)}", flush=True)
