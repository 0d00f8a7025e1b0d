"""`python -m mpicorr plan`: what a run with these options would do, worked out on rank 0 alone without loading
the model's weights: the corpus's chunks, each rank's host, device and share of the work (or, under
--schedule dynamic, the queue of batches), what --stage-data and --stage-model would copy where, and the size
of a --dump. What the run would refuse that rank 0 can see from here is said, not raised.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from . import dump as dumping
from . import models, plan, stage
from .config import Config, hostfile_label
from .corpus import folder_name
from .dist import Comm
from .errors import UserError
from .run import Data, check_gpu_sharing, read_data, read_hostfile, select_chunks

ENOUGH_GPUS = 1 << 30  # a node whose GPUs plan cannot see is shown as if it had enough of them


@dataclass(frozen=True)
class Seat:
    """Where `plan` expects a rank to run: its host and weight, its local rank there (None without a hostfile:
    the launcher decides) and whether that host is this machine (whose GPUs plan can see)."""

    host: str
    weight: float
    local: int | None
    here: bool


def dry_plan(cfg: Config, ranks: int) -> str:
    """plan's text for `ranks` ranks placed by slot over the hostfile (Open MPI's default)."""
    src = read_data(cfg, Comm(), counting=False)  # plan runs on rank 0 alone: pass 1 serially, no hashing
    start, count = select_chunks(cfg, src.layout)
    places = seats(cfg, ranks)
    devices, device_notes = planned_devices(cfg, places)
    work = plan.make_plan(plan.batches(start, count, cfg.batch_size), [s.host for s in places],
                          [s.weight for s in places])
    lines = [head_line(cfg, src, start, count, ranks), split_text(cfg, work, devices), *device_notes,
             *staging_lines(cfg, src, places)]
    return "\n".join(lines) + dump_estimate(cfg, src.layout.chunks, start, count)


def head_line(cfg: Config, src: Data, start: int, count: int, ranks: int) -> str:
    """plan's first line: the chunks, the batches, the ranks, where the weights come from and the corpus."""
    weights = ("--schedule dynamic (no weights)" if cfg.schedule == "dynamic" else
               f"weights from {hostfile_label(cfg.hostfile) if cfg.hostfile else 'no hostfile (all equal)'}")
    return (f"{cfg.data}: {src.layout.chunks} chunks of {cfg.ctx} tokens; processing {count} "
            f"[{start}, {start + count}) in batches of {cfg.batch_size} on {ranks} rank(s), {weights}; "
            f"{data_line(cfg, src)}")


def split_text(cfg: Config, work: list[plan.Assignment], devices: list[str]) -> str:
    """The rank table with each rank's share by weight; under --schedule dynamic, the queue and no shares."""
    if cfg.schedule != "dynamic":
        return plan.format_plan(work, devices)
    queue = plan.describe_dynamic([b for a in work for b in a.batches], cfg.batch_size)
    return queue + "\n" + plan.format_plan(work, devices, dynamic=True)


def seats(cfg: Config, ranks: int) -> list[Seat]:
    """Each rank's Seat: by slot over the hostfile, or unknown hosts without one."""
    if cfg.hostfile is None:
        return [Seat("-", 1.0, None, False)] * ranks
    slots = plan.by_slot(read_hostfile(cfg.hostfile), ranks, hostfile_label(cfg.hostfile))
    return [Seat(line.host, line.weight, local, is_here(line.host)) for line, local in slots]


def is_here(host: str) -> bool:
    """Whether a hostfile's host is this machine (localhost, or this machine's name)."""
    return host.lower() in plan.LOCAL_NAMES or plan.short(host) == plan.short(socket.gethostname())


def gpus_here() -> int:
    """CUDA GPUs of this machine, as a run counts them (0: none)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def planned_devices(cfg: Config, places: list[Seat]) -> tuple[list[str], list[str]]:
    """(each rank's device label, the notes under the table): the devices a run would take (models.devices_for)
    on this machine, and on another as on a node with enough GPUs, said so; and what the run would refuse."""
    labels, refusals = [], []
    for rank, seat in enumerate(places):
        try:
            labels.append(seat_device(cfg, seat))
        except UserError as exc:
            labels.append("-")
            refusals.append(f"rank {rank} on {seat.host}: {exc}")
    refusal = refusals[0] if refusals else sharing(cfg, places, labels)
    return labels, device_notes(cfg, places) + ([f"the run would refuse to start: {refusal}"] if refusal else [])


def sharing(cfg: Config, places: list[Seat], labels: list[str]) -> str | None:
    """The run's refusal of two ranks on one GPU of this machine under --device auto (run.check_gpu_sharing),
    or None. GPUs of other hosts are not known, so not compared."""
    here = plan.short(socket.gethostname())
    gpus = [[d if d.startswith("cuda") else None
             for d in models.devices_for(cfg.device, s.local, cfg.gpus_per_rank, gpus_here())] if s.here else [None]
            for s in places]
    hosts = [here if s.here else s.host for s in places]
    return first_refusal(check_gpu_sharing, cfg.device, hosts, labels, gpus)


def seat_device(cfg: Config, seat: Seat) -> str:
    """One rank's device label: exact on this machine; elsewhere as on a node with enough GPUs ('or cpu' where
    --device auto would fall back to the CPU); 'auto' when the rank's local rank is unknown and matters."""
    per_rank = cfg.gpus_per_rank
    if seat.here:
        return models.device_label(models.devices_for(cfg.device, seat.local, per_rank, gpus_here()))
    fixed = cfg.device == "cpu" or cfg.device.startswith("cuda:") or cfg.device == "cuda" and per_rank == 1
    if seat.local is None and not fixed:
        return "auto"
    label = models.device_label(models.devices_for(cfg.device, seat.local or 0, per_rank, ENOUGH_GPUS))
    return label + " or cpu" if cfg.device == "auto" and per_rank == 1 else label


def device_notes(cfg: Config, places: list[Seat]) -> list[str]:
    """What plan cannot see: the GPUs of other hosts, or without a hostfile where the ranks run at all."""
    if cfg.device == "cpu":
        return []
    here = gpus_here()
    mine = f"this machine ({socket.gethostname()}) has {f'{here} CUDA GPU(s)' if here else 'no CUDA GPU'}"
    if cfg.hostfile is None:
        return [(f"devices: without a hostfile plan cannot know where the ranks run; with --device {cfg.device} "
                 f"each takes {auto_rule(cfg)} ({mine})")]
    away = sorted({s.host for s in places if not s.here})
    if not away:
        return []
    return [(f"devices: plan cannot see the GPUs of {', '.join(away)} (not this machine): shown as the run would "
             f"choose them on a node with enough GPUs (--device {cfg.device}: {auto_rule(cfg)}); {mine}")]


def auto_rule(cfg: Config) -> str:
    """How a rank picks its device(s) on its node, in words (models.devices_for)."""
    g = cfg.gpus_per_rank
    if g > 1:
        first = f"{cfg.device.partition(':')[2]}" if cfg.device.startswith("cuda:") else f"<local rank x {g}>"
        return f"{g} GPUs from cuda:{first} on, refused on a node without CUDA or with too few GPUs"
    if cfg.device == "auto":
        return "cuda:<local rank mod the node's GPU count>, or cpu on a node without CUDA"
    return f"{cfg.device}, refused on a node without CUDA"


def staging_lines(cfg: Config, src: Data, places: list[Seat]) -> list[str]:
    """What --stage-data and --stage-model would copy where, and the first of rank 0's checks of the copies
    that the run would fail (in the run's order: the two copies apart, the corpus's, the model's)."""
    nodes = sorted({s.host for s in places if s.host != "-"})
    where = f"on each of {', '.join(nodes)}" if nodes else "on every node the ranks run on"
    copies, missing = staged_copies(cfg, src)
    checks = [(stage.check_apart, cfg.model, cfg.stage_model, cfg.data, cfg.stage_data)] \
        if cfg.stage_data and cfg.stage_model else []
    checks += [(stage.check_copy, files, target, option) for option, files, target, *_ in copies]
    refusals = [r for check, *args in checks if (r := first_refusal(check, *args))] + [missing] * bool(missing)
    return [copy_line(copy, where) for copy in copies] + [f"the run would refuse to start: {r}" for r in refusals[:1]]


Copy = tuple[str, list[tuple[str, str]], str, str, str]  # option, its (path, relative path) files, the copy,
# what is copied and what every rank then reads, in words


def staged_copies(cfg: Config, src: Data) -> tuple[list[Copy], str | None]:
    """The copies staging would make (as stage.stage_corpus and stage.stage_model list them), and a model that
    --stage-model cannot find."""
    copies: list[Copy] = []
    if cfg.stage_data:
        target = os.path.join(cfg.stage_data, folder_name(cfg.data))
        files = [(s.path, s.name) for s in src.corpus.shards]
        more = f" (and {len(files) - 1} more file(s) there)" if len(files) > 1 else ""
        copies.append(("--stage-data", files, target, "--data's shards", os.path.join(target, files[0][1]) + more))
    if cfg.stage_model:
        try:
            source = stage.resolve(cfg.model)
        except UserError as exc:
            return copies, str(exc)
        target = os.path.join(cfg.stage_model, stage.staged_name(cfg.model))
        copies.append(("--stage-model", stage.files_of(source), target, f"the model folder {source}", target))
    return copies, None


def copy_line(copy: Copy, where: str) -> str:
    """One staging copy in words: what, how much, where, and what the ranks then read."""
    option, files, target, what, reads = copy
    size = dumping.human(sum(os.path.getsize(p) for p, _ in files))
    return (f"{option}: rank 0 copies {what}, {len(files)} file(s), {size}, to {target} {where} (one rank per node "
            f"receives them; a node whose copy there still has every SHA-256 keeps it); every rank then reads "
            f"{reads}")


def first_refusal(check, *args) -> str | None:
    """The message of the UserError check(*args) raises, or None."""
    try:
        check(*args)
    except UserError as exc:
        return str(exc)
    return None


def data_line(cfg: Config, src: Data) -> str:
    """plan's words on the corpus: documents and tokens read, and what --chunking and --max-tokens leave."""
    lay, shards = src.layout, len(src.corpus.shards)
    line = (f"{len(lay.doc_tokens)} document(s) in {shards} shard(s), {lay.tokens()} tokens"
            f"{'' if lay.complete else ' read (pass 1 stopped at --max-tokens ' + str(cfg.max_tokens) + ')'}, "
            f"--chunking {cfg.chunking}")
    if cfg.chunking == "document":
        docs, tokens = lay.skipped()
        line += f" ({docs} document(s) shorter than --ctx skipped, {tokens} tokens dropped in all)"
    return line


def dump_estimate(cfg: Config, available: int, start: int, count: int) -> str:
    """plan's line on the --dump size (at the dtype of a run from this machine; 2 bytes on GPUs)."""
    if not cfg.dump:
        return ""
    sample = dumping.draw(cfg, available, start, count)
    line = dumping.describe(sample, cfg, dumping.run_dtype(cfg))[0]
    if dumping.run_dtype(cfg) == "float32" and cfg.dtype == "auto":
        line += f"; {dumping.human(dumping.describe(sample, cfg, 'bfloat16')[1])} on GPUs (bfloat16/float16)"
    try:
        dumping.check_sample(cfg, sample)
    except UserError as exc:
        line += f"\nthe run would refuse to start: {exc}"
    return "\ndump: " + line
