"""A run folder's files: which are mpicorr's, whether the run there finished, clearing them, and the space
writing them needs.

mpicorr deletes only files it writes, found by their exact names, and a folder only when that leaves it
empty; never a folder wholesale (OUT may hold the user's own files):

    OUT/correlations_block_<L>.zstd, OUT/correlations_block_<L>_expert_<E>.zstd, OUT/summary.h5, OUT/run.json
    OUT/threshold-<T>/ the matrix files and summary.h5 of each threshold (a run of several thresholds)
    OUT/checkpoints/g<G>-r<R>.ckpt
    and the temporary of each (files.atomic_path: .<name>.tmp<pid>)

While a run uses OUT, its rank 0 holds a lock on the folder (locked), and so does a `sum` writing into it: a
second run or sum into OUT is refused. A `sum` of matrix files, whose OUT is a file, locks its staging folder
`.NAME.tmpPID` beside OUT instead (sum_writing): a run or sum into OUT meanwhile is refused as well.

A run is finished when every output folder that holds its matrix files also holds summary.h5: rank 0 writes
summary.h5 last, after every matrix file, and deletes the checkpoints only after that.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from contextlib import contextmanager, suppress
from typing import Iterator

import h5py

from . import layout, matrixfile, summary
from .config import THRESHOLD_DIR, threshold_folders
from .errors import UserError
from .files import free_bytes, human, temporary
from .schedule import RUN_JSON
from .units import HIST_BINS

MATRIX = r"correlations_block_\d+(?:_expert_\d+)?\.zstd"
OUTPUT = rf"{MATRIX}|{re.escape(summary.SUMMARY)}|{re.escape(RUN_JSON)}"
# checkpoint.FOLDER and checkpoint.NAME, not imported: checkpoint needs torch, the file tools must start without
CHECKPOINTS, CHECKPOINT = "checkpoints", r"g(\d+)-r(\d+)\.ckpt"
# Upper bounds of what writing a unit takes: a zstd frame is at most its input plus 1/256 and a few bytes; a
# summary group at most its uncompressed datasets (about 11 values, a histogram and 2 x 16 top partners per
# neuron, 8 bytes each) plus HDF5's headers.
FRAME_SLACK, GROUP_BYTES = 4096, 64 << 10
SUMMARY_NEURON_BYTES = 8 * (11 + HIST_BINS + 2 * summary.TOP_PARTNERS)


def _names(folder: str, pattern: str) -> list[str]:
    """The files of `folder` whose names match `pattern` exactly."""
    if not os.path.isdir(folder):
        return []
    rx = re.compile(pattern)
    return sorted(n for n in os.listdir(folder) if rx.fullmatch(n) and os.path.isfile(os.path.join(folder, n)))


def remove(folder: str, pattern: str, drop_empty: bool = False, only_temporaries: bool = False) -> None:
    """Delete the files of `folder` named by `pattern` and their temporaries (or only the temporaries); then
    the folder itself when `drop_empty` and nothing else is left in it (never a link to a folder: the user's)."""
    names = temporary(pattern) if only_temporaries else rf"(?:{pattern})|{temporary(pattern)}"
    for name in _names(folder, names):
        os.remove(os.path.join(folder, name))
    if drop_empty and os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder):
        with suppress(OSError):  # a mount point (EBUSY) or a folder we may not remove: left empty, harmless
            os.rmdir(folder)


def checkpoints(out: str) -> list[str]:
    """The checkpoint files in OUT/checkpoints (only mpicorr's names: other files there are not checkpoints)."""
    return _names(os.path.join(out, CHECKPOINTS), CHECKPOINT)


def folders(out: str) -> list[str]:
    """OUT and its threshold-<T> subfolders: where a run's matrix files and summary.h5 may be."""
    return [out, *threshold_folders(out)]


def holding(out: str) -> list[str]:
    """The folders of OUT (itself, threshold-<T>) that hold files of a run: where clear_outputs deletes."""
    return [f for f in folders(out) if _names(f, OUTPUT)]


def foreign(out: str) -> str | None:
    """The first file by one of mpicorr's common names (OUT/run.json, a summary.h5) that mpicorr did not
    write: a run.json without mpicorr's format key, a summary.h5 without its mpicorr_version attribute."""
    for path in [os.path.join(out, RUN_JSON), *(os.path.join(f, summary.SUMMARY) for f in folders(out))]:
        if os.path.lexists(path) and not _ours(path):
            return path
    return None


def _ours(path: str) -> bool:
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                return str(json.load(fh).get("format", "")).startswith("mpicorr-run-")
        with h5py.File(path, "r") as h5:
            return "mpicorr_version" in h5.attrs
    except (OSError, ValueError, AttributeError):
        return False


def present(out: str) -> bool:
    """Whether OUT holds matrix files or a summary.h5 of some run."""
    return any(_names(f, rf"{MATRIX}|{re.escape(summary.SUMMARY)}") for f in folders(out))


def finished(out: str) -> bool:
    """Whether OUT holds a finished run: outputs, and summary.h5 (written last) beside every set of matrices."""
    return present(out) and all(summary.exists(f) for f in folders(out) if _names(f, MATRIX))


def clear_checkpoints(out: str) -> None:
    """Delete OUT's checkpoint files (and their temporaries); OUT/checkpoints too if that empties it."""
    remove(os.path.join(out, CHECKPOINTS), CHECKPOINT, drop_empty=True)


def clear_outputs(out: str) -> None:
    """Delete the matrix files, summary.h5 files and run.json of an earlier run in OUT (and in its
    threshold-<T> subfolders, each removed if that empties it)."""
    remove(out, OUTPUT)
    for folder in threshold_folders(out):
        remove(folder, OUTPUT, drop_empty=True)


def clear_temporaries(out: str) -> None:
    """Delete temporaries left by a process killed while writing (an MPI_Abort, kill -9) in OUT, its
    threshold-<T> subfolders and OUT/checkpoints."""
    for folder in folders(out):
        remove(folder, OUTPUT, only_temporaries=True)
    remove(os.path.join(out, CHECKPOINTS), CHECKPOINT, only_temporaries=True)


def reclaimable(out: str) -> int:
    """Bytes clear_outputs would free."""
    return sum(os.path.getsize(os.path.join(f, n)) for f in folders(out) for n in _names(f, OUTPUT))


def matrix_bound(width: int, trials: int) -> int:
    """The most bytes a matrix file of `width` neurons and `trials` trials can take (its counts uncompressed,
    plus zstd's worst case)."""
    raw = layout.packed_size(width) * (8 if trials >= 1 << 32 else 4)
    return matrixfile.HEADER.size + raw + (raw >> 8) + FRAME_SLACK


def summary_bound(width: int) -> int:
    """The most bytes a layer's (or expert's) group in summary.h5 can take."""
    return width * SUMMARY_NEURON_BYTES + GROUP_BYTES


def router_bound(experts: int) -> int:
    """The most bytes a router's group in summary.h5 can take."""
    return 8 * experts * (experts + 1) + GROUP_BYTES


def need(units: list[tuple[int, bool]], thresholds: int, trials: int) -> int:
    """Upper bound of the bytes a run's outputs take: per threshold, each (width, is a router) unit's matrix
    file and summary group, and the files' own overhead."""
    per = sum(router_bound(w) if router else matrix_bound(w, trials) + summary_bound(w) for w, router in units)
    return thresholds * (per + GROUP_BYTES) + GROUP_BYTES


def merged_need(layers: dict, experts: dict, routers: dict, trials: int) -> int:
    """need() of a run merged by `sum`, from the first input's summary entries (summary.read_summary's layers,
    read_moe's experts and routers)."""
    units = [(int(e["attrs"]["width"]), False) for e in [*layers.values(), *experts.values()]]
    return need(units + [(int(e["attrs"]["experts"]), True) for e in routers.values()], 1, trials)


def check_space(where: str, label: str, needed: int, reclaim: int = 0) -> None:
    """Refuse to go on when the filesystem of `where` has less than `needed` bytes free (counting `reclaim`
    bytes about to be deleted there as free): one line naming `label` (the option or argument)."""
    free = free_bytes(where)
    if free + reclaim < needed:
        old = f" (and {human(reclaim)} of the previous run's outputs that would be replaced)" if reclaim else ""
        raise UserError(f"{label}: not enough disk space: the outputs need up to {human(needed)} (the counts "
                        f"uncompressed, an upper bound), {human(free)} free{old}; free space or choose a "
                        f"folder on another disk")


@contextmanager
def locked(out: str, option: str = "--out", instead: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the folder OUT (flock, which the kernel releases when the process ends, even
    by kill -9): a second run into OUT (or into the same --dump folder, `option`), or a `sum` into it, at the
    same time would replace this one's checkpoints (shards) and mix its outputs with this one's. A refusal
    names `option` and OUT and says to choose `instead` (default: another `option`). Where the filesystem has
    no such locks (some network mounts), nothing is locked. A folder that the run or sum holding it removed
    (it had made it, and failed: removed_if_failed) before this lock was taken is refused too: the lock
    would hold a folder that is gone, and OUT made anew would be unlocked."""
    gone = UserError(f"{option} {out}: another mpicorr run or sum was using this folder, and removed it as it "
                     f"failed; start again")
    try:
        fd = os.open(out, os.O_RDONLY)
    except FileNotFoundError:
        raise gone from None
    try:
        if not _take(fd):
            raise UserError(f"{option} {out}: another mpicorr run or sum is using this folder now; wait "
                            f"until it ends or choose {instead or 'another ' + option}")
        if not _same_folder(fd, out):
            raise gone
        yield
    finally:
        os.close(fd)


def _same_folder(fd: int, path: str) -> bool:
    """Whether `path` still names the folder open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def make_folder(path: str, option: str) -> list[str]:
    """Create the folder `path` (and its missing parents) for `option`; return the folders this call made,
    deepest first (none when it existed: the user's, or another command's that has just made it, which the
    lock then tells apart), for removed_if_failed. Each folder counts as made only if this call's mkdir made
    it (a parent another process made meanwhile is not), and is named as given, so that removing it removes
    what was made even where a parent is a link (`link/../new` is not `./new`)."""
    made: list[str] = []
    try:
        _make(path.rstrip(os.sep) or path, made)
    except FileExistsError:
        made = []  # `path` itself existed
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot create the folder ({exc.strerror}); choose a writable "
                        f"place") from None
    if not os.path.exists(path):  # a file is refused by the caller, as the file it is
        raise UserError(f"{option} {path}: exists and is not a folder (a link to nothing?); give a folder name")
    return made


def _make(path: str, made: list[str]) -> None:
    """mkdir `path` after its missing parents (as os.makedirs does), inserting at the front of `made` each
    folder made here."""
    head = os.path.dirname(path)
    if head and not os.path.lexists(head):
        with suppress(FileExistsError):  # made by another process meanwhile: not ours to remove
            _make(head, made)
    os.mkdir(path)
    made.insert(0, path)


@contextmanager
def removed_if_failed(made: list[str]) -> Iterator[None]:
    """Remove the folders a command made (make_folder), deepest first, if it fails: a run or sum that fails
    before writing anything leaves no empty folder behind. Only folders still empty go: one that holds a
    checkpoint, an output or a file someone put there is kept. Enter it while the folder is locked (inside
    locked()): a command the lock refused never removes the folder (another's, even if this one made it), and
    the folder goes before the lock is released (no other run can have taken it)."""
    try:
        yield
    except BaseException:
        remove_empty(made)
        raise


def remove_empty(made: list[str]) -> None:
    """Remove the folders a failed command made (make_folder's list, deepest first); one that holds anything
    is kept."""
    for folder in made:
        with suppress(OSError):
            os.rmdir(folder)


def started(out: str) -> bool:
    """Whether OUT holds a run's own traces besides its outputs (mpicorr's run.json, checkpoints): matrix
    files there without summary.h5 are a run that stopped while writing, not the original tool's folder."""
    path = os.path.join(out, RUN_JSON)
    return bool(checkpoints(out)) or (os.path.isfile(path) and _ours(path))


def check_unlocked(folder: str, option: str = "--out") -> None:
    """Refuse at once a folder that a running run or sum holds (locked), or that a sum of matrix files is
    about to write as a file (sum_writing), before a run's long first steps (reading the whole corpus in pass
    1); the run takes the lock itself later. A missing folder passes the first test, and one it may not read
    (the run's own checks then name the problem)."""
    check_no_sum_writing(folder, option)
    if os.path.isdir(folder) and os.access(folder, os.R_OK):
        with locked(folder, option):
            pass


def _take(fd: int) -> bool:
    """Lock the open file `fd` exclusively, without waiting: False when another open file holds the lock (a
    live process: the kernel drops a lock with its holder), True once held or where there are no such locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno not in (errno.EWOULDBLOCK, errno.EACCES)
    return True


def busy(folder: str) -> bool:
    """Whether a running process holds `folder`'s lock (locked, or a matrix-file sum's on its staging folder);
    a folder left by a process that ended is not busy. Tried by taking the lock and letting it go at once."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # gone meanwhile, or not ours to read: nobody we could wait for
        return False
    try:
        return not _take(fd)
    finally:
        os.close(fd)


def sum_writing(path: str, own: str | None = None) -> str | None:
    """The staging folder of a `sum` of matrix files writing the file `path` now (another than `own`), if any:
    `.NAME.tmpPID` beside `path`, which that sum holds locked while it writes (filetools.claimed_file); the
    folder of a sum that was killed is not locked any more, and blocks nothing."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        names = sorted(os.listdir(parent))
    except OSError:  # a parent that does not exist (yet) or may not be read: no sum writes there
        return None
    rx = re.compile(temporary(re.escape(name)))
    for found in (os.path.join(parent, n) for n in names if rx.fullmatch(n)):
        if found != own and os.path.isdir(found) and not os.path.islink(found) and busy(found):
            return found
    return None


def check_no_sum_writing(path: str, option: str, instead: str | None = None, own: str | None = None) -> None:
    """Refuse `path` while a `sum` of matrix files writes a file by that name (sum_writing, other than `own`):
    its rename at the end would fail on a run's folder, and two such sums would each replace the other's file.
    The refusal names `option` and `path` and says to choose `instead` (default: another `option`)."""
    if sum_writing(path, own):
        raise UserError(f"{option} {path}: another mpicorr sum is writing this file now; wait until it ends or "
                        f"choose {instead or 'another ' + option}")


def check_settled(run_dir: str) -> None:
    """For the readers (the analysis scripts, verify): refuse a folder that a run or sum is using now (it holds
    the lock: the files may be replaced while they are read) and a run that stopped while writing (matrix
    files, no summary.h5, but run.json or checkpoints; the folder above threshold-<T> folders holds run.json
    alone and is told apart by matrix_paths): read as the original tool's folder, it would be analysed a layer
    short without a word. A threshold-<T> folder's run keeps its lock, run.json and checkpoints in the folder
    above."""
    owners = [run_dir]
    if os.path.basename(os.path.normpath(run_dir)).startswith(THRESHOLD_DIR):
        owners.append(os.path.dirname(os.path.abspath(run_dir)))
    if any(busy(folder) for folder in owners):
        raise UserError(f"{run_dir}: an mpicorr run or sum is using this folder now, and its files may be "
                        f"replaced while they are read; read it once that has ended")
    if (not summary.exists(run_dir) and matrixfile.exists_any(run_dir)
            and any(started(folder) for folder in owners)):
        raise UserError(f"{run_dir}: its run has not finished writing (no summary.h5, which is written last); "
                        f"finish it with the run's command and --resume, then read it")
