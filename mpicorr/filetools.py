"""`info`, `verify` and `sum` for matrix files (mpicorr's and the original tool's) and run folders.

    python -m mpicorr info runs/a/correlations_block_0.zstd      # or a run folder: every matrix file's header
    python -m mpicorr verify runs/a/*.zstd            # or a run folder: also checks summary.h5's SHA-256s
    python -m mpicorr sum merged.zstd runs/a/correlations_block_0.zstd runs/b/correlations_block_0.zstd
    python -m mpicorr sum runs/all runs/a runs/b      # run folders: every layer and a merged summary.h5
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from contextlib import contextmanager, suppress
from typing import Callable, Iterator

import numpy as np

from . import __version__, layout, matrixfile, outputs, plan, summary
from .config import threshold_folders
from .errors import UserError
from .files import temporary
from .units import Unit

DUMP_INDEX = "index.json"  # predictor_data.INDEX, named here so that the file tools need not import torch


def is_dump(folder: str) -> bool:
    """Whether a folder holds a --dump, finished (an index) or not (shards only), for `sum`."""
    return os.path.isdir(folder) and any(n == DUMP_INDEX or n.startswith("shard-") for n in os.listdir(folder))


# Root attributes that runs must share to be merged, and the option that sets each.
SAME_RUN = {"model": "--model", "data_sha256": "--data", "ctx": "--ctx", "threshold": "--threshold",
            "site": "site", "site_modules": "--model (its layers)", "dtype": "--dtype", "batch_size": "--batch-size"}
INT64_MAX = (1 << 63) - 1
STAGING = ".mpicorr-sum.tmp"  # + PID: a sum's staging folder inside an output folder that existed
STAGING_NAME = re.compile(rf"{re.escape(STAGING)}\d+")
MARK = ".mpicorr-staging.json"  # in a sum's staging folder: the host and PID of the sum writing it
UINT64_MAX = (1 << 64) - 1


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


def info_run(folder: str) -> str:
    """info() of every matrix file of a run folder, in block (then expert) order; for a run that counted
    several thresholds, of each threshold-<T> subfolder."""
    names = matrixfile.exists_any(folder)
    if not names and threshold_folders(folder):
        return "\n".join(info_run(part) for part in threshold_folders(folder))
    if not names:
        raise UserError(f"{folder}: no correlations_block_<L>.zstd files; give a run folder or matrix files")
    order = sorted(names, key=lambda name: [int(n) for n in re.findall(r"\d+", name)])
    return "\n".join(info(os.path.join(folder, name)) for name in order)


def verify(path: str, sha256: str | None = None) -> None:
    """Read the file fully and check its counts are consistent (and its SHA-256 when given); raise
    UserError on the first problem."""
    header, packed = matrixfile.read_matrix(path, sha256)
    diag = layout.diagonal(packed, header.width).astype(np.int64)
    if (diag > header.trials).any():
        i = int(np.argmax(diag > header.trials))
        raise UserError(f"{path}: neuron {i} fired {diag[i]} times in {header.trials} trials")
    for r0, r1, rows in layout.full_row_blocks(packed, header.width):
        bad = (rows > diag[None, :]) | (rows > diag[r0:r1, None])
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise UserError(f"{path}: C[{r0 + i}, {j}] = {rows[i, j]} exceeds a diagonal count "
                            f"({diag[r0 + i]}, {diag[j]})")


def sum_files(out: str, inputs: list[str], force: bool = False) -> str:
    """Add matrix files of one block and width (trials added) into `out` (written into a staging folder beside
    it and renamed into place, `out` held meanwhile: claimed_file); return a summary line."""
    check_sum_paths(out, inputs)
    check_file_out(out, force)
    with claimed_file(out) as tmp:
        check_file_out(out, force)  # again, holding the lock: a sum that ended, or a run's --out made, meanwhile
        first, trials, total = add_files(inputs)
        matrixfile.write_matrix(os.path.join(tmp, os.path.basename(out)), first.block, first.width, trials, total)
        install_file(tmp, out)
    return f"{out}: {len(inputs)} files summed, block {first.block}, width {first.width}, trials {trials}"


def check_file_out(out: str, force: bool) -> None:
    """Refuse an output matrix file that is a folder, or that exists without --force."""
    if os.path.isdir(out):
        raise UserError(f"{out}: is a folder; the sum of matrix files is one file: give a file name "
                        f"(or give run folders to merge them into a folder)")
    if os.path.exists(out) and not force:
        raise UserError(f"{out}: exists; choose another output name or add --force")


def add_files(inputs: list[str]) -> tuple[matrixfile.Header, int, np.ndarray]:
    """(the first file's header, the trials added, the counts added) of matrix files of one block and width."""
    total, first, trials = None, None, 0
    for path in inputs:
        header, packed = matrixfile.read_matrix(path)
        if first is None:
            first, total = header, packed.astype(np.uint64)
        elif (header.block, header.width) != (first.block, first.width):
            raise UserError(f"{path}: block {header.block} width {header.width} does not match "
                            f"{inputs[0]} (block {first.block} width {first.width}); sum one block at a time")
        else:
            add_counts(total, packed, f"the counts of {path}", inputs)
        trials += header.trials
    if trials > UINT64_MAX:
        raise UserError(f"sum: {trials} trials do not fit the file's 64 bits ({', '.join(inputs)}); sum fewer files")
    return first, trials, total


@contextmanager
def claimed_file(out: str) -> Iterator[str]:
    """Hold, while `sum` writes the matrix file `out`, its staging folder `.NAME.tmpPID` beside `out` (marked
    as this process's: make_staging) locked as a run locks its --out (outputs.locked): another sum into `out`
    (or a run whose --out it is) finds it locked and is refused, as this one is when another holds one
    (outputs.sum_writing). The folders of killed sums hold no lock: they block nothing, and those of this
    host go (remove_stale_staging). Missing parent folders of `out` are made, and removed again (each if
    still empty) when the sum fails. Yields the folder; removed on every exit."""
    made = outputs.make_folder(os.path.dirname(out) or ".", "sum")  # its missing parents, removed if it fails
    remove_stale_staging(out)
    tmp = staging_path(out, True)
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own name: a leftover of nothing else
    try:
        make_staging(tmp, out)
        with outputs.locked(tmp, f"sum {out}: its staging folder", "another output name"):
            outputs.check_no_sum_writing(out, "sum", "another output name", own=tmp)
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        outputs.remove_empty(made)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_file(tmp: str, out: str) -> None:
    """Rename the summed file from the staging folder `tmp` onto `out`."""
    try:
        os.replace(os.path.join(tmp, os.path.basename(out)), out)
    except OSError as exc:  # a folder made at `out` by someone who took no lock (EISDIR), permissions
        raise UserError(f"sum {out}: cannot move the sum into place ({exc.strerror}); check that {out} is not a "
                        f"folder and that its folder is writable") from None


def check_sum_paths(out: str, inputs: list[str]) -> None:
    """Refuse an input given twice (it would be counted twice: os.path.samefile, so other spellings and
    links count too) and an output that is also an input (writing it would destroy that input)."""
    for i, path in enumerate(inputs):
        for other in inputs[:i]:
            if _same(path, other):
                raise UserError(f"{path}: given twice (also as {other}); each input would be counted twice")
        if _same(out, path) or _among_outputs(path, out):
            raise UserError(f"{out}: is also an input ({path}); writing the sum there would destroy it: "
                            f"choose another output")


def _among_outputs(path: str, out: str) -> bool:
    """Whether `path` lies in one of the threshold-<T> folders of `out`, whose files --force replaces."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(out))
    return rel != "." and not rel.startswith("..") and rel.split(os.sep)[0].startswith("threshold-")


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def add_counts(total: np.ndarray, part: np.ndarray, what: str, inputs: list[str]) -> None:
    """total += part (uint64 counts), refusing a sum that would wrap past 2**64 - 1."""
    if int(total.max(initial=0)) + int(part.max(initial=0)) > UINT64_MAX and \
            (total > UINT64_MAX - part.astype(np.uint64)).any():
        raise UserError(f"sum: adding {what} overflows uint64 ({', '.join(inputs)}); these inputs cannot be "
                        f"summed (a count above 2**64 - 1)")
    total += part


def add_int64(total: np.ndarray, part: np.ndarray, what: str, inputs: list[str]) -> np.ndarray:
    """total + part for int64 raw sums, refusing a wrap (numpy's int64 addition wraps without a word)."""
    a, b = np.asarray(total, dtype=np.int64), np.asarray(part, dtype=np.int64)
    result = a + b
    if (((a ^ result) & (b ^ result)) < 0).any():  # the sign flipped: the true sum is outside int64
        raise UserError(f"sum: {what} overflows int64 ({', '.join(inputs)}); merge fewer runs")
    return result


def verify_run(folder: str) -> str:
    """Verify every matrix file of a run folder and compare it with the SHA-256 recorded in summary.h5
    (each threshold-<T> subfolder of a run that counted several thresholds)."""
    parts = threshold_folders(folder)
    if parts and not summary.exists(folder):
        return "\n".join(verify_run(part) for part in parts)
    outputs.check_settled(folder)  # not a run or sum writing now, nor a run that stopped while writing
    root, layers = read_run(folder)
    experts, _ = summary.read_moe(os.path.join(folder, summary.SUMMARY))
    units = [*((Unit(k), e) for k, e in layers.items()), *((Unit(*k), e) for k, e in experts.items())]
    # A matrix file summary.h5 does not list belongs to another run (copied in, or left by an older mpicorr).
    extra = sorted(set(matrixfile.exists_any(folder)) - {matrixfile.matrix_name(u.layer, u.expert) for u, _ in units})
    if extra:
        raise UserError(f"{folder}: {', '.join(extra)} not listed in summary.h5; the files belong to another "
                        f"run: move them out")
    for unit, entry in units:
        path = os.path.join(folder, matrixfile.matrix_name(unit.layer, unit.expert))
        verify(path, entry["attrs"].get("matrix_sha256"))
    counted = [f"{len(layers)} layers"] * bool(layers or not experts) + [f"{len(experts)} experts"] * bool(experts)
    return f"{folder}: ok, {', '.join(counted)}, {root['chunks']} chunks"


def read_run(folder: str) -> tuple[dict, dict[int, dict]]:
    """summary.h5 of a run folder, as a UserError-clean read."""
    path = os.path.join(folder, summary.SUMMARY)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no {summary.SUMMARY}; give a run folder written by mpicorr")
    try:
        return summary.read_summary(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc}); the file is damaged") from None


def run_ranges(root: dict) -> list[plan.Batch]:
    """The chunk ranges a run counted."""
    ranges = root.get("chunk_ranges")
    if ranges is None:
        return [(root["chunk_start"], root["chunk_start"] + root["chunks"])]
    return [(int(a), int(b)) for a, b in np.asarray(ranges).reshape(-1, 2)]


# How the data was cut into chunks (issue 15) must match too; runs from before the attribute existed are concat.
SAME_RUN["chunking"] = "--chunking"
SAME_RUN["text_field"] = "--text-field"  # recorded for corpora only: absent on both sides for plain text files
SAME_RUN_DEFAULTS = {"chunking": "concat"}
CORPUS_KEYS = ("chunking", "text_field", "data_shards", "data_manifest", "max_tokens", "documents",  # kept by a
               "documents_skipped", "tokens_dropped")                                               # merge


def check_mergeable(inputs: list[str], roots: list[dict]) -> list[plan.Batch]:
    """Refuse runs of different experiments or overlapping chunks; return the merged chunk ranges."""
    for path, root in zip(inputs[1:], roots[1:]):
        for key, option in SAME_RUN.items():
            default = SAME_RUN_DEFAULTS.get(key)
            if not _matches(key, root.get(key, default), roots[0].get(key, default)):
                hint = "; a relative --model is read from the folder sum runs in" if key == "model" else ""
                raise UserError(f"{path}: different {option} from {inputs[0]} ({key} {root.get(key)!r} vs "
                                f"{roots[0].get(key)!r}); only runs of one model, data and threshold add up{hint}")
    seen: list[tuple[plan.Batch, str]] = []
    for path, root in zip(inputs, roots):
        if "nll_fixed" not in root:
            raise UserError(f"{path}: summary.h5 lacks the raw sums (written by an older mpicorr); count it again")
        for a, b in run_ranges(root):
            for (c, d), other in seen:
                if a < d and c < b:
                    raise UserError(f"{path}: chunks [{max(a, c)}, {min(b, d)}) were also counted in {other}; "
                                    f"merging would count them twice")
            seen.append(((a, b), path))
    return plan.merge_ranges([r for r, _ in seen])


def _norm(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def _matches(key: str, a, b) -> bool:
    """Whether two runs' root attribute `key` agree (SAME_RUN): equal, or for `model` one model folder."""
    return _norm(a) == _norm(b) or key == "model" and same_model_folder(a, b)


def same_model_folder(a, b) -> bool:
    """Whether two runs' `model` attributes, as each run was given --model, name one existing local folder
    (a relative path and an absolute one, a link to it): as a run reads --model, from the folder this process
    runs in. A hub id, or a path that names no folder here, matches only the same string."""
    if not (isinstance(a, str) and isinstance(b, str) and os.path.isdir(a) and os.path.isdir(b)):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def merged_model(roots: list[dict]) -> str:
    """The `model` a merge records: the runs' own when they all recorded one string, else (spellings of one
    folder: same_model_folder) that folder's real path, so that it does not depend on the inputs' order."""
    names = {root["model"] for root in roots}
    return names.pop() if len(names) == 1 else os.path.realpath(roots[0]["model"])


def sum_runs(out: str, inputs: list[str], force: bool = False, command: str = "python -m mpicorr sum") -> str:
    """Merge run folders into `out`: matrices added, summary.h5 recomputed from the summed raw sums. Runs that
    counted several thresholds are merged per threshold, into OUT/threshold-<T>. Everything is written into
    a temporary folder beside `out` and moved into place at the end, so a failed merge leaves `out` as it was;
    with --force the outputs a run or a merge wrote there are replaced, other files in it are kept. `out` is
    locked meanwhile, as a run locks its --out."""
    check_sum_paths(out, inputs)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out}: is a file; merging run folders writes a folder: give a folder name")
    with staged_folder(out) as tmp:
        if outputs.present(out) and not force:  # checked holding the lock: no other sum writes it meanwhile
            raise UserError(f"{out}: already holds outputs; choose another folder or add --force")
        return _merge_runs(tmp, out, inputs, command)


def _merge_runs(tmp: str, out: str, inputs: list[str], command: str) -> str:
    """sum_runs writing into `tmp` (`out` is the name its lines give)."""
    names = threshold_names(inputs)
    if names:
        return "\n".join(_merge_runs(os.path.join(tmp, name), os.path.join(out, name),
                                     [os.path.join(f, name) for f in inputs], command) for name in names)
    runs = [read_run(folder) for folder in inputs]
    roots = [root for root, _ in runs]
    ranges = check_mergeable(inputs, roots)
    os.makedirs(tmp, exist_ok=True)
    tokens = sum(int(r["tokens"]) for r in roots)
    moe = [summary.read_moe(os.path.join(folder, summary.SUMMARY)) for folder in inputs]
    outputs.check_space(tmp, f"sum {out}", outputs.merged_need(runs[0][1], *moe[0], tokens))
    with summary.summary_writer(os.path.join(tmp, summary.SUMMARY)) as h5:
        for layer in runs[0][1]:
            merge_unit(h5, tmp, Unit(layer), inputs, [layers.get(layer) for _, layers in runs])
        for layer, expert in moe[0][0]:
            merge_unit(h5, tmp, Unit(layer, expert), inputs, [experts.get((layer, expert)) for experts, _ in moe])
        for layer in moe[0][1]:
            merge_router(h5, Unit(layer, router=True), inputs, [routers.get(layer) for _, routers in moe])
        h5.attrs.update({**merged_attributes(*in_chunk_order(inputs, roots), ranges, tokens), "command": command})
    gaps = [(b, c) for (_, b), (c, _) in zip(ranges, ranges[1:])]  # merged ranges: all neighbours have gaps
    gap_text = "; gap (counted by no input): " + plan.format_ranges(gaps) if gaps else ""
    return (f"{out}: {len(inputs)} runs merged, chunks {plan.format_ranges(ranges)}, {tokens} tokens, "
            f"{len(runs[0][1])} layers{gap_text}")


@contextmanager
def claimed(out: str) -> Iterator[bool]:
    """Hold, while `sum` writes the folder `out`, the lock a run holds on its --out (outputs.locked): a run or
    another sum using `out` now is refused in one line, before anything is written. A lock needs the folder,
    so a missing `out` is made here (its missing parents too), and removed again (each if still empty) when
    the sum fails. Yields whether this sum made it."""
    made = outputs.make_folder(out, "sum")  # none when it existed: the user's, or another sum's (the lock decides)
    if not os.path.isdir(out):  # a link to nothing (a file is refused before)
        raise UserError(f"sum {out}: exists and is not a folder (a link to nothing?); give a folder name")
    with outputs.locked(out, "sum", "another output folder"), outputs.removed_if_failed(made):
        outputs.check_no_sum_writing(out, "sum", "another output folder")  # a sum of matrix files into `out`
        yield bool(made)


@contextmanager
def staged_folder(out: str, clear: Callable[[str], None] = outputs.clear_outputs,
                  last: str = summary.SUMMARY) -> Iterator[str]:
    """A temporary folder to write into, `out` held (claimed) meanwhile; on success its files replace `out`'s
    outputs (the folder is renamed into place when this sum made `out`; else `clear` deletes the old outputs),
    `last` (the file that marks a finished folder: summary.h5, a dump's index) last; it is removed on every
    exit. Where: staging_path."""
    with claimed(out) as made:
        remove_stale_staging(out)
        tmp = staging_path(out, made)
        shutil.rmtree(tmp, ignore_errors=True)  # this process's own name: a leftover of nothing else
        try:
            make_staging(tmp, out)
            yield tmp
            try:
                install(tmp, out, made, clear, last)
            except OSError as exc:
                raise UserError(f"{out}: cannot move the merged outputs into place ({exc.strerror}); "
                                f"check the folder's permissions") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def staging_path(out: str, made: bool) -> str:
    """Where a sum writes before its files are renamed into `out`: `.NAME.tmpPID` beside a folder this sum
    made (renamed onto it whole), else `.mpicorr-sum.tmpPID` inside `out`, the one place sure to be on `out`'s
    filesystem: a rename cannot cross filesystems, and `out` may be a mount point or a link to a folder on
    another disk."""
    if made:
        parent, name = os.path.split(os.path.abspath(out))
        return os.path.join(parent, f".{name}.tmp{os.getpid()}")
    return os.path.join(out, f"{STAGING}{os.getpid()}")


def make_staging(tmp: str, out: str) -> None:
    """Make the staging folder of a sum into `out`, marked as this process's (MARK), so that a later sum into the
    same folder can tell a leftover of a killed sum from anything else."""
    try:
        os.makedirs(tmp)
        with open(os.path.join(tmp, MARK), "w", encoding="utf-8") as fh:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, fh)
    except OSError as exc:  # a full disk, a folder we may not write
        raise UserError(f"sum {out}: cannot write there ({exc.strerror}); free space or choose a writable folder "
                        f"on another disk") from None


def remove_stale_staging(out: str) -> None:
    """Delete what sums into `out` that were killed (kill -9, a node lost) left in their staging folders:
    `.mpicorr-sum.tmpPID` inside `out`, `.NAME.tmpPID` beside it. Only folders whose MARK names this host and a
    process that no longer runs are deleted (a folder of a sum on another host, or an unmarked one, is left),
    so a running sum's folder is never taken, with `out`'s lock held (sums of folders) or not (of files)."""
    parent, name = os.path.split(os.path.abspath(out))
    inside = [os.path.join(out, n) for n in _listing(out) if STAGING_NAME.fullmatch(n)]
    beside = [os.path.join(parent, n) for n in _listing(parent) if re.fullmatch(temporary(re.escape(name)), n)]
    for folder in inside + beside:
        if _stale(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _listing(folder: str) -> list[str]:
    """The names in `folder`; none where it cannot be listed (a parent folder the user may not read)."""
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _stale(folder: str) -> bool:
    """Whether `folder` is a marked staging folder of a process of this host that no longer runs."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return False
    try:
        with open(os.path.join(folder, MARK), encoding="utf-8") as fh:
            mark = json.load(fh)
        host, pid = mark["host"], int(mark["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs (as another user)
        return False
    return False


def install(tmp: str, out: str, made: bool = False, clear: Callable[[str], None] = outputs.clear_outputs,
            last: str = summary.SUMMARY) -> None:
    """Move a finished output folder into place: a rename when `out` does not exist or is the empty folder
    this process made (claimed), else `clear` removes `out`'s old outputs and each new file is renamed in
    (`last`, which marks a finished folder, last). A user's folder is never replaced, even empty."""
    with suppress(FileNotFoundError):
        os.remove(os.path.join(tmp, MARK))  # the staging folder's, not an output
    if not os.path.exists(out) or made and not os.listdir(out):
        os.rename(tmp, out)  # onto an empty folder too (POSIX): the whole folder appears at once
        return
    clear(out)
    for name in sorted(os.listdir(tmp), key=lambda n: n == last):
        src, dest = os.path.join(tmp, name), os.path.join(out, name)
        if os.path.isdir(src) and os.path.isdir(dest):
            install(src, dest, False, clear, last)
        else:
            os.replace(src, dest)


def threshold_names(inputs: list[str]) -> list[str]:
    """The threshold-<T> subfolder names shared by run folders of several thresholds ([] for plain runs)."""
    found = [[os.path.basename(p) for p in threshold_folders(f)] if not summary.exists(f) else [] for f in inputs]
    for path, names in zip(inputs[1:], found[1:]):
        if names != found[0]:
            raise UserError(f"{path}: thresholds {names or 'of a plain run'} differ from {inputs[0]}'s "
                            f"({found[0] or 'a plain run'}); only runs of the same --threshold add up")
    return found[0]


def merge_unit(h5, out: str, unit: Unit, inputs: list[str], entries: list[dict | None]) -> None:
    """Add one layer's (or expert's) matrix files and raw statistics over the runs and write both."""
    files = [os.path.join(folder, matrixfile.matrix_name(unit.layer, unit.expert)) for folder in inputs]
    width = int(entries[0]["attrs"]["width"])
    total = np.zeros(layout.packed_size(width), dtype=np.uint64)
    stats = {"fire_count": 0, "active_hist": 0, "act_sum": 0, "act_sumsq": 0, "act_hist": 0}
    trials = 0
    for path, entry in zip(files, entries):
        if entry is None or int(entry["attrs"]["width"]) != width:
            raise UserError(f"{path}: {unit.name} is missing or has another width; runs of one model only")
        header, packed = matrixfile.read_matrix(path, entry["attrs"].get("matrix_sha256"))
        if header.width != width or header.trials != int(entry["attrs"]["tokens"]):
            raise UserError(f"{path}: does not match its summary.h5 (width {header.width}, trials "
                            f"{header.trials}); verify the run folder")
        add_counts(total, packed, f"the {unit.name} counts of {path}", inputs)
        trials += header.trials
        for name, key in (("fire_count", "fire_count"), ("active_hist", "active_hist"),
                          ("act_sum", "act_sum_fixed"), ("act_sumsq", "act_sumsq_fixed"), ("act_hist", "act_hist")):
            stats[name] = add_int64(stats[name], entry[key].astype(np.int64), f"{key} of {unit.name}", inputs)
    sha = matrixfile.write_matrix(os.path.join(out, matrixfile.matrix_name(unit.layer, unit.expert)), unit.layer,
                                  width, trials, total)
    data, attrs = summary.layer_datasets(stats, total, width, trials)
    summary.write_group(h5, summary.group_path(unit), data, {**attrs, "matrix_sha256": sha})


def merge_router(h5, unit: Unit, inputs: list[str], entries: list[dict | None]) -> None:
    """Add one MoE block's router co-selection counts over the runs."""
    if any(entry is None for entry in entries):
        missing = inputs[[entry is None for entry in entries].index(True)]
        raise UserError(f"{missing}: has no router counts for layer {unit.layer}; runs of one model only")
    experts = int(entries[0]["attrs"]["experts"])
    coselect = np.zeros_like(entries[0]["coselect"], dtype=np.uint64)
    for path, entry in zip(inputs, entries):
        add_counts(coselect, entry["coselect"], f"the router counts of layer {unit.layer} of {path}", inputs)
    stats = {"fire_count": np.diagonal(coselect).astype(np.int64)}
    tokens = sum(int(entry["attrs"]["tokens"]) for entry in entries)
    packed = coselect[np.tril_indices(experts)]
    summary.write_group(h5, summary.group_path(unit), *summary.router_datasets(stats, packed, experts, tokens))


def merged_attributes(inputs: list[str], roots: list[dict], ranges: list[plan.Batch], tokens: int) -> dict:
    """Root attributes of a merged summary: shared ones from the first run, `model` as merged_model, sums and
    ranges recomputed. Given the runs in chunk order (in_chunk_order), they are the same whatever the order
    the inputs were given in (only `command` and `created` tell one merge from another)."""
    first = roots[0]
    keep = ("data", "data_sha256", "ctx", "threshold", "site", "site_modules", "moe_layers",
            "chunks_available", "dtype", "batch_size")
    attrs = {"model": merged_model(roots), **{key: first[key] for key in keep if key in first}}
    attrs.update({key: first[key] for key in CORPUS_KEYS if key in first})
    chunks = sum(b - a for a, b in ranges)
    attrs.update({
        "chunk_start": ranges[0][0], "chunks": chunks, "tokens": tokens,
        "chunk_ranges": np.array(ranges, dtype=np.int64), "merged_from": [os.path.abspath(p) for p in inputs],
        "ranks": sum(int(r.get("ranks", 0)) for r in roots), "attempts": sum(run_attempts(r) for r in roots),
        "mpicorr_version": __version__, "created": summary.now(),
    })
    nll = sum(int(r["nll_fixed"]) for r in roots)
    if abs(nll) > INT64_MAX:
        raise UserError(f"sum: nll_fixed overflows int64 ({', '.join(inputs)}); merge fewer runs")
    return {**attrs, **summary.nll_attributes(nll, sum(int(r["predictions"]) for r in roots))}


def run_attempts(root: dict) -> int:
    """The run attempts (a first run and each --resume) that counted a run's chunks: its `attempts`; for a
    merge written before merges recorded theirs, one per run it merged."""
    if "attempts" in root:
        return int(root["attempts"])
    return len(root.get("merged_from", [])) or 1


def in_chunk_order(inputs: list[str], roots: list[dict]) -> tuple[list[str], list[dict]]:
    """The runs (folders and root attributes) sorted by their first chunk (disjoint: check_mergeable), the
    order a merge records them in whatever the order they were given in."""
    order = sorted(range(len(inputs)), key=lambda i: run_ranges(roots[i])[0])
    return [inputs[i] for i in order], [roots[i] for i in order]
