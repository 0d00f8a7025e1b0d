"""One counting run: read the corpus's layout (all ranks) -> prepare (rank 0) -> plan -> load model -> count my
chunks (each rank tokenizing its own) -> reduce -> write (rank 0).

This is the one place where ranks take different branches.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from . import __version__, checkpoint, cpus, data, inputs, models, outputs, plan, schedule, stage, summary, triangle
from . import writing
from . import dump as dumping
from .config import Config, hostfile_label, output_folders, parse_part
from .counting import (LayerCounts, MoeCounts, check_all, check_fixed_total, chunk_nll, count_dtype, fixed_maxima,
                       units)
from .dist import Comm, Service
from .errors import SharedError, Terminated, UserError
from .hooks import feeding, recording
from .progress import JobProgress

CHECKPOINT_SECONDS = 600.0   # default checkpoint interval: a crash loses at most about ten minutes
FINAL_CHECKPOINT_SECONDS = 60.0  # before the reduce, save unsaved work older than this
MANIFEST_ATTR_BYTES = 60_000  # HDF5 attributes stay under 64 KiB: a longer shard list is left out (data_sha256
# still hashes it)
TERM_WAIT_S = 10.0  # after a SIGTERM, how long a rank that saved waits for the others to save too


class Stop:
    """While counting, SIGTERM (SLURM's notice before it kills a job, see --signal) asks this rank to finish
    its batch, save a checkpoint and end; outside counting it keeps its default (end at once: nothing to
    save before, and the checkpoints are written before the reduce)."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self) -> "Stop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def _note(self, *_) -> None:
        self.requested = True

    def __exit__(self, *_) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


@dataclass(frozen=True)
class Job:
    """What rank 0 works out before any model is loaded, broadcast to all ranks."""

    chunks: range                 # the chunk numbers processed (read by each rank from --data as it counts them)
    chunk_start: int
    available: int                # chunks the data holds (within --max-tokens)
    data_sha256: str              # a text file's own hash, or the manifest's (data.data_sha256)
    data_attrs: dict              # summary.h5 root attributes about the data (chunking, manifest, skipped)
    plan: list[plan.Assignment]   # the chunks still to count
    identity: dict                # what a resume must match (checkpoint.IDENTITY)
    resumed: list[checkpoint.Checkpoint]  # live checkpoints taken over (headers only)
    generation: int               # run attempt, names this attempt's checkpoint files
    dump: dumping.Sample | None = None  # --dump: the sampled tokens, and where they go


@dataclass
class Tally:
    """This rank's raw sums so far and the chunk ranges they cover."""

    counts: list[LayerCounts | MoeCounts]   # one per site (hooks feed these)
    nll: int = 0
    predictions: int = 0
    finished: list[plan.Batch] = field(default_factory=list)


@dataclass
class Data:
    """Every rank's view of --data after pass 1: the corpus (with --stage-data, its staged copy), its chunk layout
    and the tokenizer; on rank 0 also the shard manifest (hashed on threads while pass 1 runs, or by staging)."""

    corpus: data.Corpus
    layout: data.Layout
    tokenizer: object
    manifest: "Background | None" = None
    kept: data.Kept | None = None  # this rank's token ids from pass 1, for the first source()

    def source(self) -> data.ChunkSource:
        """A forward cursor over the chunks, for one rank's batches. The first one gets the kept ids, and only
        it holds them: ids it never asked for (documents after this rank's last chunk) go with it, not at
        the end of the run (through the reduce and the writing)."""
        kept, self.kept = self.kept, None
        return data.ChunkSource(self.corpus, self.layout, self.tokenizer, kept)


class Background:
    """fn() on a daemon thread (an error exit does not wait for it); result() waits and re-raises."""

    def __init__(self, fn):
        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), name="mpicorr-manifest", daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to result()
            self.error = exc

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def model_tokenizer(cfg: Config):
    """The model's tokenizer, once --model is checked (rank 0; the others get it over MPI, since with
    --stage-model only rank 0 may read --model)."""
    models.check_model(cfg.model, cfg.site_module, cfg.site)
    models.check_loadable(cfg.model, cfg.site_module, cfg.site, cfg.ctx)
    return models.load_tokenizer(cfg.model)


def read_data(cfg: Config, comm: Comm, counting: bool = True) -> Data:
    """Every rank of `comm`: rank 0 resolves --data; for a run (`counting`) with --stage-data its shards are
    copied to every node first; every rank checks it can open rank 0's shards (check_shards); then pass 1
    together (data.scan) gives the chunk layout, while rank 0 hashes the shards for a run (staging hashed them
    already). `plan` (counting False) reads rank 0's --data alone."""
    tokenizer = comm.checked(lambda: model_tokenizer(cfg), root_only=True)
    models.quiet_transformers()
    source = comm.checked(lambda: data.open_corpus(cfg.data, cfg.text_field), root_only=True)
    manifest = None
    listed = None
    if counting and cfg.stage_data and cfg.stage_model:
        comm.checked(lambda: stage.check_apart(cfg.model, cfg.stage_model, cfg.data, cfg.stage_data), root_only=True)
    if counting and cfg.stage_data:
        source, listed = stage.stage_corpus(source, cfg.stage_data, comm)
    elif counting and comm.rank == 0 and cfg.max_tokens is None:
        manifest = Background(source.manifest)  # hashed while pass 1 reads
    check_shards(cfg, source, comm)
    kept = data.Kept() if counting else None
    layout = data.scan(source, tokenizer, cfg.ctx, cfg.chunking, cfg.max_tokens, comm, kept)
    read = None if cfg.max_tokens is None else len(layout.shard_first)
    if counting and comm.rank == 0 and listed is not None:
        manifest = Background(lambda: listed[:read])  # staging hashed every shard; --max-tokens: those read
    elif counting and comm.rank == 0 and manifest is None:
        # --max-tokens: the identity is the shards pass 1 opened; the rest is never read, not even hashed.
        manifest = Background(lambda: source.manifest(read))
    return Data(source, layout, tokenizer, manifest, kept)


def check_shards(cfg: Config, corpus: data.Corpus, comm: Comm) -> None:
    """Every rank opens every shard of rank 0's corpus and finds rank 0's sizes (a stat each, no read): pass 1
    reads every document on every rank. A rank that cannot stops all ranks with one line naming it."""
    problems = comm.allgather((comm.host, corpus.unreadable()))
    for rank, (host, problem) in enumerate(problems):
        if problem is None:
            continue
        fix = ("give --stage-data a folder that every rank of a node can read (an absolute path)" if cfg.stage_data
               else "put the corpus at the same path on every node (a shared filesystem) or add --stage-data DIR")
        raise SharedError(f"--data {cfg.data}: rank {rank} on {host} {problem}; {fix}")


def select_chunks(cfg: Config, layout: data.Layout) -> tuple[int, int]:
    """(first chunk, chunk count) of this run: --chunk-start, --chunks, then --part."""
    # With --max-tokens the chunks counted are those it leaves, not the corpus's: the message says which.
    where = cfg.data if cfg.max_tokens is None else f"{cfg.data} within --max-tokens {cfg.max_tokens}"
    start, count = data.select(layout.chunks, cfg.chunk_start, cfg.chunks, where, cfg.ctx)
    if cfg.part is not None:
        start, count = plan.part(start, count, cfg.batch_size, *parse_part(cfg.part))
    return start, count


def data_attributes(cfg: Config, src: Data, manifest: list[dict]) -> dict:
    """summary.h5 root attributes about the data beyond data_sha256 (a plain text file in concat mode, read
    whole, gets exactly the ones it always had plus chunking)."""
    attrs = {"chunking": cfg.chunking}
    if not src.corpus.plain:
        attrs.update(text_field=cfg.text_field, data_shards=len(manifest), documents=len(src.layout.doc_tokens))
        listing = json.dumps(manifest)
        if len(listing) <= MANIFEST_ATTR_BYTES:
            attrs["data_manifest"] = listing
    if cfg.max_tokens is not None:
        attrs["max_tokens"] = cfg.max_tokens
    if cfg.chunking == "document":
        attrs["documents_skipped"], attrs["tokens_dropped"] = src.layout.skipped()
    return attrs


def prepare(cfg: Config, hosts: list[str], src: Data, held: ExitStack) -> Job:
    """Validate inputs, choose the chunks and split them over the ranks (runs on rank 0); lock --out until
    `held` closes."""
    start, count = select_chunks(cfg, src.layout)
    manifest = src.manifest.result()
    sha = data.data_sha256(src.corpus, manifest)
    weights = hostfile_weights(cfg.hostfile, hosts)
    sample = dumping.plan_sample(cfg, src.layout.chunks, start, count) if cfg.dump else None
    made = check_out(cfg.out, cfg.force, cfg.resume, cfg.threshold)  # makes --out, so that it can be locked
    held.enter_context(outputs.locked(cfg.out))
    held.enter_context(outputs.removed_if_failed(made))  # a run that fails before writing leaves no empty --out
    outputs.check_no_sum_writing(cfg.out, "--out")  # a sum of matrix files that began writing --out as a file
    check_out(cfg.out, cfg.force, cfg.resume, cfg.threshold)  # again: a run or sum that ended in between is seen
    work = plan.batches(start, count, cfg.batch_size)
    ident = identity(cfg, sha, start, count, None if src.corpus.plain else cfg.text_field)
    resumed, generation = [], 1
    if cfg.resume:
        state = checkpoint.resume(cfg.out, ident, work)
        resumed, generation, work = state.live, state.generation, state.todo
    if sample:
        sample = dumping.open_folder(sample, cfg.ctx, cfg.resume, [r for ck in resumed for r in ck.finished], held)
    return Job(range(start, start + count), start, src.layout.chunks, sha, data_attributes(cfg, src, manifest),
               plan.make_plan(work, hosts, weights), ident, resumed, generation, sample)


def identity(cfg: Config, data_sha256: str, start: int, count: int, text_field: str | None = None) -> dict:
    """The options a checkpoint belongs to (JSON values, as stored in checkpoint headers); `text_field`: a
    corpus's --text-field (None for a plain text file, where it means nothing)."""
    return {"model": cfg.model, "data_sha256": data_sha256, "ctx": cfg.ctx, "chunk_start": start,
            "chunks": count, "threshold": list(cfg.threshold), "batch_size": cfg.batch_size, "dtype": cfg.dtype,
            "site": cfg.site, "site_module": cfg.site_module, "chunking": cfg.chunking,
            "text_field": text_field, "dump": cfg.dump and {"dir": cfg.dump, "tokens": cfg.dump_tokens, "rate": cfg.dump_rate,
                                  "values": cfg.dump_values}}


def read_hostfile(path: str) -> list[plan.HostLine]:
    """The parsed hostfile."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--hostfile {hostfile_label(path)}: cannot read ({exc}); fix the path or give "
                        f"--hostfile none") from None
    return plan.parse_hostfile(text, hostfile_label(path))


def hostfile_weights(path: str | None, hosts: list[str]) -> list[float]:
    """Per-rank weights from the hostfile, or equal weights without one."""
    if path is None:
        return [1.0] * len(hosts)
    return plan.rank_weights(read_hostfile(path), hosts, hostfile_label(path))


def check_out(out: str, force: bool, resume: bool = False, thresholds: tuple[float, ...] = (0.5,)) -> list[str]:
    """Create the output folder; refuse to overwrite another run's outputs or checkpoints unless told to.
    Matrix files without summary.h5 (written last) are a run that failed while writing, not a finished one.
    A file where the run puts a folder (checkpoints/, threshold-<T>/) is refused now, not after counting.
    Returns the folders it made (outputs.make_folder)."""
    foreign = outputs.foreign(out)
    if foreign:  # a run writes a file by this name there, and --force deletes mpicorr's: never a user's file
        raise UserError(f"--out {out}: {foreign}: not written by mpicorr (a run writes its own "
                        f"{os.path.basename(foreign)} there); move it away or choose another --out")
    done, finished = outputs.present(out), outputs.finished(out)
    unfinished = bool(outputs.checkpoints(out))
    incomplete = f"--out {out}: holds matrix files without {summary.SUMMARY} (a run that failed while writing " \
                 f"its outputs)"
    if force:
        pass  # start_out deletes the checkpoints once every check passed; the outputs go just before writing
    elif resume and done and not unfinished:
        raise UserError(f"--out {out}: holds a finished run and no checkpoint; nothing to resume" if finished else
                        f"{incomplete} and no checkpoint to resume from; start over with --force")
    elif not resume and unfinished:
        raise UserError(f"--out {out}: holds checkpoints of an unfinished run; add --resume to continue it "
                        f"or --force to start over")
    elif not resume and done:
        raise UserError(f"--out {out}: already holds outputs of a run; choose another folder or add --force"
                        if finished else f"{incomplete}; add --force to start over")
    made = outputs.make_folder(out, "--out")
    if not os.access(out, os.W_OK):
        raise UserError(f"--out {out}: folder is not writable; choose another --out")
    for folder in [checkpoint.folder(out), *output_folders(out, thresholds), *outputs.holding(out)]:
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise UserError(f"--out {out}: {folder} is not a folder (mpicorr writes one there); move it away or "
                            f"choose another --out")
        if os.path.isdir(folder) and not os.access(folder, os.W_OK):  # written, or its old outputs deleted
            raise UserError(f"--out {out}: {folder}: folder is not writable; make it writable or choose "
                            f"another --out")
    return made


def start_out(cfg: Config, needed: int) -> None:
    """Rank 0, once the model is loaded and every check but this one passed, before counting: delete the
    temporaries that killed processes left in --out, refuse a run whose outputs may not fit there, and with
    --force delete the earlier run's checkpoints (its outputs stay until this run writes its own: make_room).
    Only files by mpicorr's names (outputs.py), never the user's."""
    outputs.clear_temporaries(cfg.out)
    check_space(cfg, needed)
    if cfg.force:
        outputs.clear_checkpoints(cfg.out)


def output_bytes(cfg: Config, tally: Tally, tokens: int) -> int:
    """Upper bound of the bytes this run's outputs take (see outputs.need)."""
    return outputs.need([(lc.width, lc.unit.router) for lc in units(tally.counts)], len(cfg.threshold), tokens)


def check_space(cfg: Config, needed: int) -> None:
    """Rank 0: refuse a run whose outputs may not fit on --out's disk (the previous run's outputs there, which
    make_room deletes, counted as free)."""
    outputs.check_space(cfg.out, f"--out {cfg.out}", needed, outputs.reclaimable(cfg.out))


def make_room(cfg: Config, needed: int) -> None:
    """Rank 0, before writing: check the space again (checkpoints now take some), delete the previous run's
    outputs (--force: another model may leave other layers and thresholds), create the output folders."""
    check_space(cfg, needed)
    outputs.clear_outputs(cfg.out)
    for folder in output_folders(cfg.out, cfg.threshold):
        os.makedirs(folder, exist_ok=True)


class Saver:
    """Writes this rank's checkpoint when due: every `every` chunks, or every `seconds` when `every` is None."""

    def __init__(self, path: str, ident: dict, absorbs: list[str], every: int | None,
                 seconds: float = CHECKPOINT_SECONDS, before=None):
        self.path, self.identity, self.absorbs, self.before = path, ident, absorbs, before
        self.every, self.seconds = every, seconds
        self.last, self.pending, self.saved = time.monotonic(), 0, False

    def after_batch(self, tally: Tally, chunks: int) -> None:
        """Note `chunks` more finished chunks; save if due."""
        self.pending += chunks
        if self.every == 0:
            return
        due = self.pending >= self.every if self.every else time.monotonic() - self.last >= self.seconds
        if due:
            self.save(tally)

    def finish(self, tally: Tally) -> None:
        """Before the reduce: save work that would be costly to redo if writing the outputs fails."""
        old = time.monotonic() - self.last >= min(self.seconds, FINAL_CHECKPOINT_SECONDS)
        if self.pending and (self.every or (self.every is None and old)):
            self.save(tally)

    def save(self, tally: Tally) -> None:
        """Write the checkpoint (after `before`: the dump's shard of the same chunks), then delete the older
        files it supersedes."""
        if self.before:
            self.before()
        layers = [(lc.unit.name, lc.width) for lc in units(tally.counts)]
        dtype = "<i4" if units(tally.counts)[0].pairs[0].dtype == torch.int32 else "<i8"  # count_dtype's widths
        ck = checkpoint.Checkpoint(self.path, self.identity, plan.merge_ranges(tally.finished), tally.nll,
                                   tally.predictions, layers, dtype, self.absorbs)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        checkpoint.write(self.path, ck, ((lc.packed(), lc.stats()) for lc in units(tally.counts)))
        if not self.saved:
            for name in self.absorbs:
                old = os.path.join(os.path.dirname(self.path), name)
                if os.path.exists(old):
                    os.remove(old)
        self.last, self.pending, self.saved = time.monotonic(), 0, True


def absorb(tally: Tally, files: list[checkpoint.Checkpoint]) -> None:
    """Add the raw sums of checkpoints taken over by this rank."""
    layers = [(lc.unit.name, lc.width) for lc in units(tally.counts)]
    for ck in files:
        if ck.layers != layers:
            raise UserError(f"--resume: {ck.path} holds layers {ck.layers[:3]}... of another model shape than "
                            f"--model's; rerun with the same model, or start over with --force")
        for lc, (pairs, stats) in zip(units(tally.counts), checkpoint.read_layers(ck)):
            lc.load(pairs, stats)
        tally.nll += ck.nll
        tally.predictions += ck.predictions
        tally.finished += ck.finished


def new_counts(sites: list[models.Site], places: list[str], cfg: Config, dtype: torch.dtype) -> list:
    """Empty counts for each site, on its device. On a GPU, float32 count panels if all of that GPU's fit
    beside the model with room for the forward pass, else int16 (half the memory, flushed to the host)."""
    cells: dict[str, int] = defaultdict(int)
    for site, place in zip(sites, places):
        cells[place] += (site.experts or 1) * len(cfg.threshold) * triangle.panel_cells(site.width)
    panel = {p: triangle.device_panel(c, p) for p, c in cells.items() if p != "cpu"}
    return [MoeCounts(s.layer, s.experts, s.width, cfg.threshold, dtype, p, cfg.kernel, panel.get(p)) if s.experts
            else LayerCounts(s.layer, s.width, cfg.threshold, dtype, p, cfg.kernel, panel.get(p))
            for s, p in zip(sites, places)]


def count_chunks(model, sites, source: data.ChunkSource, batches: Iterable[plan.Batch], tally: Tally, device: str,
                 saver: Saver, service: Service, dumper: dumping.Dumper | None = None,
                 stop: Stop | None = None) -> tuple[int, float]:
    """Forward each batch while counting into `tally` (and dumping), checkpointing as the saver decides (and
    at once when `stop` is requested: then raise Terminated) and reporting each batch to rank 0; (chunks,
    seconds busy)."""
    causal = models.is_causal_lm(model)
    first = models.input_device(model)
    chunks, busy = 0, 0.0
    with (torch.inference_mode(), recording(sites, dumping.sinks(tally.counts, dumper)),
          feeding(*dumping.input_modules(model, dumper))):
        for (b0, b1), chunk_ids in data.prefetched(batches, source.get, ahead=isinstance(batches, (list, tuple))):
            started = time.monotonic()
            ids = torch.from_numpy(chunk_ids).to(first)
            with dumper.batch(b0, b1) if dumper else nullcontext():
                out = model(input_ids=ids, use_cache=False)
            check_all(tally.counts)  # the one wait for the device per batch: bad values end the run here
            if causal:
                part, n = chunk_nll(out.logits, ids)
                tally.nll, tally.predictions = tally.nll + part, tally.predictions + n
            tally.finished.append((b0, b1))
            saver.after_batch(tally, b1 - b0)
            if stop is not None and stop.requested:
                saver.save(tally)
                finished = sum(b - a for a, b in tally.finished)
                raise Terminated(f"terminated (SIGTERM): saved a checkpoint of {finished} chunks in "
                                 f"{os.path.dirname(saver.path)}; rerun with --resume to continue")
            spent = time.monotonic() - started
            chunks, busy = chunks + b1 - b0, busy + spent
            service.tell(("done", b1 - b0))
    return chunks, busy


def asked(service: Service) -> Iterator[plan.Batch]:
    """--schedule dynamic: batches from rank 0's queue until it is empty."""
    while (batch := service.ask(("next",))) is not None:
        yield batch


def check_gpu_sharing(option: str, hosts: list[str], devices: list[str], gpus: list[list[str | None]]) -> None:
    """With --device auto, refuse two ranks on one physical GPU (`gpus`: each rank's GPU UUIDs): usually
    more ranks per node than GPUs."""
    if option != "auto":
        return  # an explicit cuda:N is taken as meant
    seen: dict[tuple[str, str], int] = {}
    for rank, host, gpu in ((r, h, g) for r, (h, owned) in enumerate(zip(hosts, gpus)) for g in owned):
        if gpu is None:
            continue
        if (host, gpu) in seen and seen[host, gpu] != rank:
            raise UserError(f"--device auto: ranks {seen[host, gpu]} and {rank} on {host} would share GPU "
                            f"{devices[rank]}; start one rank per GPU (mpirun --map-by ppr:G:node, srun "
                            "--gpus-per-task=1), or pass --device cuda:N to share on purpose or --device cpu")
        seen[host, gpu] = rank


def run(cfg: Config, comm: Comm, live: bool = False) -> None:
    """Count, reduce and write one run; every rank calls this. `live`: redraw rank 0's progress in place."""
    with ExitStack() as held:  # rank 0's lock on --out, from prepare to the end
        run_locked(cfg, comm, held, live)


@dataclass(frozen=True)
class Placement:
    """Where each rank runs: every rank's host and device label, this rank's devices, and who compresses the
    outputs (writing.compressing_ranks), here on every logical CPU this rank may use."""

    hosts: list[str]
    mine: list[str]
    devices: list[str]
    writers: list[int]
    write_cpus: int


def place(cfg: Config, comm: Comm) -> Placement:
    """Each rank sets its CPU threads to its share of its host (mpicorr.cpus), takes its GPU(s), makes the first
    current, and rank 0 refuses two ranks on one GPU."""
    hosts = comm.allgather(comm.host)
    cpus.restore()  # before reading the CPU set: OpenMP may have pinned this thread when torch loaded
    every = comm.allgather(cpus.found())
    cpus.apply(cpus.share(*every[comm.rank], hosts.count(comm.host)))
    note = cpus.binding_note(hosts, every) if cpus.started_by_mpirun() else None
    if comm.rank == 0 and note:
        print(note, flush=True)
    cpu_sets = comm.allgather(cpus.cpu_set())
    writers = writing.compressing_ranks(hosts, cpu_sets)
    mine = comm.checked(lambda: models.resolve_devices(cfg.device, comm.local_rank, cfg.gpus_per_rank))
    comm.checked(lambda: check_kernel_device(cfg, mine[0]))
    models.make_current(mine[0])
    devices = comm.allgather(models.device_label(mine))
    gpus = comm.allgather([models.device_identity(d) for d in mine])
    comm.checked(lambda: check_gpu_sharing(cfg.device, hosts, devices, gpus), root_only=True)
    return Placement(hosts, mine, devices, writers, len(cpu_sets[comm.rank]))


def check_kernel_device(cfg: Config, device: str) -> None:
    """--kernel popcount or sparse where --device auto took a GPU (config refuses an explicit cuda): refused
    before the model loads; it failed after loading, with a ValueError and exit 1."""
    if cfg.kernel in ("popcount", "sparse") and device != "cpu":
        raise UserError(f"--kernel {cfg.kernel}: runs on the CPU only, and --device {cfg.device} took {device} "
                        f"here; give --device cpu, or --kernel auto or gemm")


def check_folders_free(cfg: Config) -> None:
    """Rank 0, before pass 1 (minutes on a large corpus): refuse an --out or --dump another run or sum holds,
    or one inside a --data folder."""
    inputs.check_outputs_outside_data(cfg)
    outputs.check_unlocked(cfg.out)
    if cfg.dump:
        outputs.check_unlocked(cfg.dump, "--dump")


def run_locked(cfg: Config, comm: Comm, held: ExitStack, live: bool) -> None:
    """run(), holding (on rank 0) what prepare puts into `held` until it returns."""
    placed = place(cfg, comm)
    hosts, mine, devices = placed.hosts, placed.mine, placed.devices
    device = mine[0]  # the dtype, the token ids and any counts outside a device map go here
    comm.checked(lambda: check_folders_free(cfg), root_only=True)
    src = read_data(cfg, comm)
    job = comm.checked(lambda: prepare(cfg, hosts, src, held), root_only=True)
    if comm.rank == 0:
        announce(cfg, comm, job, devices)
    where = stage.stage_model(cfg.model, cfg.stage_model, comm) if cfg.stage_model else cfg.model
    model = comm.checked(lambda: guard_memory(
        lambda: models.load_model(where, models.resolve_dtype(cfg.dtype, device), mine), cfg, device))
    sites = comm.checked(lambda: models.find_sites(model, cfg.site_module, cfg.site))
    dumper = start_dump(cfg, comm, job, model)
    dtype = count_dtype(len(job.chunks) * cfg.ctx)
    # Each site's counts live where its module is: with --gpus-per-rank, on the GPU that holds the layer.
    tally = Tally(new_counts(sites, [models.site_device(model, s.name, device) for s in sites], cfg, dtype))
    taken = job.resumed[comm.rank :: comm.size]
    comm.checked(lambda: absorb(tally, taken))
    needed = output_bytes(cfg, tally, len(job.chunks) * cfg.ctx)
    comm.checked(lambda: start_out(cfg, needed), root_only=True)  # a full disk fails in seconds, not hours
    path = os.path.join(checkpoint.folder(cfg.out), checkpoint.file_name(job.generation, comm.rank))
    absorbs = sorted({n for ck in taken for n in [ck.name, *ck.absorbs]})
    saver = Saver(path, job.identity, absorbs, cfg.checkpoint_every, before=dumper and dumper.flush)
    started = time.monotonic()
    chunks, busy = count_scheduled(cfg, comm, job, src.source(), model, sites, tally, device, saver, live,
                                   dumper)
    saver.finish(tally)
    finish_dump(cfg, comm, job, dumper)
    del model
    reports = comm.allgather(schedule.RankReport(comm.rank, comm.host, devices[comm.rank], chunks, busy))
    wall = time.monotonic() - started
    rows = schedule.rank_rows(reports, wall, cfg.ctx)
    if comm.rank == 0:
        print(schedule.format_rows(rows), flush=True)
    reduce_and_write(cfg, comm, job, sites, tally, wall, needed, rows, placed)


def count_scheduled(cfg: Config, comm: Comm, job: Job, source: data.ChunkSource, model, sites, tally: Tally, device: str,
                    saver: Saver, live: bool, dumper: dumping.Dumper | None = None) -> tuple[int, float]:
    """Count this rank's batches (its share, or asked for one at a time) while rank 0 tracks the job."""
    comm.checked(lambda: Service.check(comm))
    todo = [b for a in job.plan for b in a.batches]
    coordinator = None
    if comm.rank == 0:
        queue = schedule.WorkQueue(todo) if cfg.schedule == "dynamic" else None
        coordinator = schedule.Coordinator(queue, JobProgress(sum(b - a for a, b in todo), cfg.ctx, comm.size,
                                                                  live=live))
    service = Service(comm, coordinator)
    batches = asked(service) if cfg.schedule == "dynamic" else job.plan[comm.rank].batches
    # On an error no close(): rank 0 would wait for the others; the error ends the job (MPI_Abort) instead.
    with Stop() as stop:
        try:
            done = guard_memory(lambda: count_chunks(model, sites, source, batches, tally, device, saver, service,
                                                     dumper, stop), cfg, device)
        except Terminated:
            comm.arrive(TERM_WAIT_S)  # every rank got the signal (SLURM, mpirun): let the slower ones save too
            raise
    service.close()
    return done


def start_dump(cfg: Config, comm: Comm, job: Job, model) -> dumping.Dumper | None:
    """--dump: this rank's dumper, once every rank runs the same dtype."""
    if job.dump is None:
        return None
    dtype = next(model.parameters()).dtype
    dtypes = comm.allgather(str(dtype).removeprefix("torch."))
    comm.checked(lambda: dumping.check_dtypes(job.dump.folder, dtypes))
    return dumping.Dumper(job.dump, cfg.ctx, cfg.threshold, comm.rank, job.generation, dtype)


def finish_dump(cfg: Config, comm: Comm, job: Job, dumper: dumping.Dumper | None) -> None:
    """--dump: every rank writes what it holds; then rank 0 writes the index."""
    if dumper is None:
        return
    shards = [e for written in comm.allgather(comm.checked(dumper.finish)) for e in written]
    if comm.rank == 0:
        chunks = (job.chunk_start, job.chunk_start + len(job.chunks))
        print(dumping.write_index(cfg, job.dump, job.data_sha256, chunks, dumper.dtype_name, shards), flush=True)


def announce(cfg: Config, comm: Comm, job: Job, devices: list[str]) -> None:
    """Rank 0's opening lines: what is counted, resumed, and the plan."""
    print(f"mpicorr {__version__}: {len(job.chunks)} chunks [{job.chunk_start}, "
          f"{job.chunk_start + len(job.chunks)}) of {job.available} x {cfg.ctx} tokens on {comm.size} rank(s)")
    if cfg.resume and not job.resumed:
        # The SLURM scripts always pass --resume; a first attempt should not read like a resume.
        print(f"mpicorr: --resume: no checkpoint in {checkpoint.folder(cfg.out)}; starting from the first chunk")
    elif cfg.resume:
        done = sum(b - a for ck in job.resumed for a, b in ck.finished)
        print(f"mpicorr: resuming from {len(job.resumed)} checkpoint(s) in {checkpoint.folder(cfg.out)}: "
              f"{done} chunks finished, {len(job.chunks) - done} to count")
    if cfg.schedule == "dynamic":
        batches = [b for a in job.plan for b in a.batches]
        print(f"mpicorr: {plan.describe_dynamic(batches, cfg.batch_size)}\n"
              f"{plan.format_plan(job.plan, devices, dynamic=True)}", flush=True)
    else:
        print(plan.format_plan(job.plan, devices), flush=True)
    if job.dump:
        print("mpicorr: dump: " + dumping.describe(job.dump, cfg, dumping.run_dtype(cfg))[0], flush=True)


def guard_memory(fn, cfg: Config, device: str):
    """Call fn; a GPU out-of-memory error becomes a UserError naming the options that help."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError in torch >= 2.5, the same class)
        raise UserError(f"out of memory on {device}: lower --batch-size (now {cfg.batch_size}) or --ctx, use "
                        f"--dtype bfloat16, or run this rank on a GPU with more memory") from None


def reduce_and_write(cfg: Config, comm: Comm, job: Job, sites, tally: Tally, seconds: float, needed: int,
                     rows: list[dict], placed: Placement) -> None:
    """Sum every unit (layer, expert, router) over the ranks onto the compressing ranks in turn (mpicorr.writing)
    and write the outputs on rank 0 (one folder per threshold): run.json, the matrix files, then each summary.h5
    (the run is finished once they are all in place), then the checkpoints are deleted."""
    tokens = len(job.chunks) * cfg.ctx
    check_fixed_total(comm.allgather(fixed_maxima(tally.counts)), tally.counts)  # before anything is written
    folders = output_folders(cfg.out, cfg.threshold)
    comm.checked(lambda: make_room(cfg, needed), root_only=True)
    if comm.rank == 0:
        schedule.write_run_json(os.path.join(cfg.out, schedule.RUN_JSON), cfg.schedule, seconds, rows)
    started = time.monotonic()
    with writing.summary_writers(folders, comm.rank == 0) as files, \
            writing.UnitWriter(cpus=placed.write_cpus) as writer:
        writing.reduce_and_write_units(comm, units(tally.counts), folders, files, writer, placed.writers)
        totals = comm.reduce_sum(np.array([tally.nll, tally.predictions], dtype=np.int64))
        for threshold, h5 in zip(cfg.threshold, files):
            h5.attrs.update(root_attributes(cfg, comm, job, sites, totals, threshold))
    if comm.rank == 0:
        outputs.clear_checkpoints(cfg.out)  # the outputs now hold everything
        report(cfg, summary.perplexity(int(totals[0]), int(totals[1])), tokens, sites, seconds,
               time.monotonic() - started, len(placed.writers))


def root_attributes(cfg: Config, comm: Comm, job: Job, sites, totals: np.ndarray, threshold: float) -> dict:
    """Root attributes of the summary.h5 of one threshold."""
    attrs = {
        "model": cfg.model, "data": cfg.data, "data_sha256": job.data_sha256, "ctx": cfg.ctx,
        "chunk_start": job.chunk_start, "chunks": len(job.chunks), "chunks_available": job.available,
        "tokens": len(job.chunks) * cfg.ctx, "threshold": threshold,
        "site": cfg.site if cfg.site_module is None else f"module {cfg.site_module}",
        "site_modules": [s.name for s in sites], "moe_layers": [s.layer for s in sites if s.experts],
        "ranks": comm.size, "batch_size": cfg.batch_size,
        "dtype": cfg.dtype, "mpicorr_version": __version__, "command": cfg.command,
        "created": summary.now(), "attempts": job.generation,
        "chunk_ranges": np.array([[job.chunk_start, job.chunk_start + len(job.chunks)]], dtype=np.int64),
        **job.data_attrs,
    }
    return {**attrs, **summary.nll_attributes(int(totals[0]), int(totals[1]))}


def report(cfg: Config, ppl: float | None, tokens: int, sites, seconds: float, write_s: float,
           writers: int) -> None:
    """The closing lines on rank 0."""
    if ppl is not None:
        print(f"mpicorr: perplexity {ppl:.4f} over {tokens} tokens")
    where = os.path.abspath(cfg.out)
    if len(cfg.threshold) > 1:
        where += " (one folder per threshold: " + ", ".join(os.path.basename(f) for f in
                                                            output_folders(cfg.out, cfg.threshold)) + ")"
    experts = sum(s.experts for s in sites)
    n = len({s.layer for s in sites})
    layers = f"{n} layer{'s' if n != 1 else ''}" + (f" ({experts} experts)" if experts else "")
    spread = f" (compressed on {writers} ranks)" if writers > 1 else ""
    print(f"mpicorr: counted {layers} in {seconds:.1f} s, reduced and wrote them in {write_s:.1f} s{spread}; "
          f"outputs in {where}", flush=True)
