"""--stage-model DIR and --stage-data DIR: copy files from rank 0 to a node-local folder on every node, over MPI.

For clusters without a shared filesystem (as in the original, where only the master node held the model and
the data). What is copied is a list of rank 0's files, each under a relative path: the model folder's files
(stage_model), or the corpus's shards under their manifest names (stage_corpus). Rank 0 lists them (path,
size, SHA-256 of every file); one rank per node (local rank 0) checks its copy against that list (sizes and
SHA-256s: see mpicorr.hashing for the cost) and, if it differs, receives the files in pieces broadcast from rank 0,
checks each file's SHA-256 and renames the finished folder into place. A stamp file records the list, so a
later run skips nodes whose copy still hashes the same. Only folders staging made (holding the stamp, or the
mark a staging folder gets first) are ever replaced or deleted: a folder of the same name that the user owns
is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import nullcontext

import numpy as np

from .corpus import Corpus, folder_name
from .dist import Comm
from .errors import UserError
from .hashing import sha256_files

STAMP = ".mpicorr-staged.json"
LOCK = ".mpicorr-stage.lock"  # in DIR: held by the node's writer while it copies
MARK = ".mpicorr-staging"  # marks a staging folder until the stamp does (a partial copy has no stamp yet)
PIECE = 64 << 20  # bytes per broadcast


def resolve(model: str) -> str:
    """A local folder for --model: the folder itself, or a hub id's snapshot in the local cache."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not in the cache"
        raise UserError(f"--stage-model: --model {model} is neither a folder nor in the local hub cache "
                        f"({type(exc).__name__}); fetch it with 'hf download {model}' on rank 0's node") from None


def staged_name(model: str) -> str:
    """The folder name of a staged model: a folder's own name, or the hub id with '/' as '--'."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model.replace("/", "--")


def files_of(folder: str) -> list[tuple[str, str]]:
    """Every file under `folder` (sorted) as (path, path relative to `folder`), staging's own files left out."""
    paths = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs.sort()
        paths += [os.path.join(root, n) for n in sorted(names) if n != STAMP and not n.startswith(".mpicorr-")]
    return [(p, os.path.relpath(p, folder)) for p in paths]


def manifest(folder: str) -> list[dict]:
    """Every file under `folder` (sorted, relative paths) with its size and SHA-256."""
    return describe(files_of(folder))


def describe(files: list[tuple[str, str]]) -> list[dict]:
    """The staging list of (path, relative path) pairs: each relative path with its file's size and SHA-256."""
    return [{"path": rel, "size": os.path.getsize(p), "sha256": sha}
            for (p, rel), sha in zip(files, sha256_files([p for p, _ in files]))]


def is_staged(folder: str, files: list[dict]) -> bool:
    """True when `folder` holds a finished copy of exactly these files."""
    try:
        with open(os.path.join(folder, STAMP)) as fh:
            if json.load(fh) != files:
                return False
    except (OSError, ValueError):
        return False
    paths = [(os.path.join(folder, f["path"]), f["size"]) for f in files]
    if not all(os.path.isfile(p) and os.path.getsize(p) == size for p, size in paths):
        return False
    # The stamp and sizes say a copy finished; only the hashes show bytes changed in place since.
    try:
        return sha256_files([p for p, _ in paths]) == [f["sha256"] for f in files]
    except OSError:  # a copied file this process cannot read: not a copy it can use, made again
        return False


def stage_model(model: str | None, root: str, comm: Comm, leader: bool | None = None) -> str:
    """Make rank 0's `model` folder available as root/<name> on every node; return that path.

    `model` matters on rank 0 only; `leader` (default: local rank 0) marks the one rank per node that
    writes the copy. Every rank must call this."""
    source = comm.checked(lambda: resolve(model), root_only=True)  # rank 0's path (used by rank 0 only)
    files = files_of(source) if comm.rank == 0 else None
    return stage(files, staged_name(model) if comm.rank == 0 else None, root, comm, "--stage-model", leader)[0]


def check_apart(model: str, model_root: str, spec: str, data_root: str) -> None:
    """--stage-model and --stage-data copy to different folders, neither inside the other: otherwise staging
    the model (after the corpus) replaces the corpus's copy, which then cannot be read, at every run."""
    paths = [os.path.realpath(os.path.join(model_root, staged_name(model))),
             os.path.realpath(os.path.join(data_root, folder_name(spec)))]
    if paths[0] == paths[1] or _inside(*paths) or _inside(*paths[::-1]):
        raise UserError(f"--stage-data {data_root}: the corpus's copy {paths[1]} and --stage-model's {paths[0]} "
                        f"would overlap; give the two options different folders")


def stage_corpus(corpus: Corpus, root: str, comm: Comm, leader: bool | None = None) -> tuple[Corpus, list[dict]]:
    """--stage-data: make rank 0's shards of `corpus` available as root/<name>/<shard name> on every node
    (<name>: --data's last path name, a glob's folder's); return the corpus read from there (the same shards,
    names, kinds and sizes, so the same documents) and the corpus's manifest (Corpus.manifest's, from the
    SHA-256s of rank 0's source files that staging took). `corpus` is rank 0's, on every rank. Every rank must
    call this."""
    files = [(s.path, s.name) for s in corpus.shards] if comm.rank == 0 else None
    target, listing = stage(files, folder_name(corpus.spec) if comm.rank == 0 else None, root, comm,
                            "--stage-data", leader)
    return corpus.moved(target), [{"name": f["path"], "bytes": f["size"], "sha256": f["sha256"]} for f in listing]


def stage(files: list[tuple[str, str]] | None, name: str | None, root: str, comm: Comm, option: str,
          leader: bool | None = None) -> tuple[str, list[dict]]:
    """Make rank 0's `files` ((path, relative path) pairs) available as root/<name>/<relative path> on every
    node; return that folder and the staging list (relative paths, sizes, SHA-256s).

    `files` and `name` matter on rank 0 only; `option` names the option in messages; `leader` (default: local
    rank 0) marks the one rank per node that writes the copy. Every rank must call this."""
    name, listing = comm.checked(lambda: _listed(files, name, root, option), root_only=True)
    target = os.path.join(root, name)
    leader = comm.local_rank == 0 if leader is None else leader
    error = _copy(files, target, listing, comm, option, leader)
    comm.checked(lambda: _raise(error))
    return target, listing


def _listed(files: list[tuple[str, str]], name: str, root: str, option: str) -> tuple[str, list[dict]]:
    """Rank 0: the checks of the relative paths and of the copy's place, then (name, the staging list); a
    file it cannot read (hashing it) is a UserError naming `option` and the file, raised on every rank."""
    check_copy(files, os.path.join(root, name), option)
    try:
        return name, describe(files)
    except OSError as exc:
        raise UserError(f"{option}: cannot read {exc.filename} ({exc.strerror}); make it readable on rank 0's "
                        f"node") from None


def check_copy(files: list[tuple[str, str]], target: str, option: str) -> None:
    """Rank 0's checks of a copy before anything is read (a run's, and `plan`'s): every relative path stays
    inside `target`, which lies apart from the files' folder (or is that folder)."""
    _check_names(files, option)
    _check_place(files, target, option)


def _check_names(files: list[tuple[str, str]], option: str) -> None:
    """Every relative path stays inside the staged folder (a name from a dataset's state.json could not)."""
    for _, rel in files:
        if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
            raise UserError(f"{option}: {rel} lies outside the folder staged; give files under one folder")


def _check_place(files: list[tuple[str, str]], target: str, option: str) -> None:
    """The copy is the source's own folder, or lies apart from it: a copy inside the folder it copies would be
    read as part of it by the next run (a corpus or model that grows at every run), and a source file inside
    the copy would be deleted when the copy is replaced."""
    real = os.path.realpath(target)
    for path, rel in files:
        full, rel = os.path.normpath(os.path.abspath(path)), os.path.normpath(rel)
        base = os.path.realpath(full[: -len(rel)] if full.endswith(os.sep + rel) else os.path.dirname(full))
        if real != base and (_inside(real, base) or _inside(os.path.realpath(full), real)):
            raise UserError(f"{option}: the copy {target} and the folder it copies, {base}, lie one inside the "
                            f"other; choose a {option} folder outside {base}")


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _copy(files: list[tuple[str, str]] | None, target: str, listing: list[dict], comm: Comm, option: str,
          leader: bool) -> str | None:
    """Rank 0 and the leaders: send the files to the leaders whose copy differs. An error string, or None."""
    leaders = comm.split(0 if leader or comm.rank == 0 else 1)
    if not (leader or comm.rank == 0):
        return None
    same = comm.rank == 0 and all(os.path.realpath(os.path.join(target, rel)) == os.path.realpath(path)
                                  for path, rel in files)  # already in place (the source itself)
    need = leader and not same and not is_staged(target, listing)
    if not any(leaders.allgather(need)):
        return None
    group = leaders.split(0 if need or leaders.rank == 0 else 1)
    if not (need or leaders.rank == 0):
        return None
    return _transfer([path for path, _ in files] if comm.rank == 0 else None, target, listing, group, need, option)


def made_here(folder: str) -> bool:
    """Whether `folder` is missing or a folder staging made (it holds the stamp or the mark): the only
    folders _transfer deletes."""
    if not os.path.lexists(folder):
        return True
    return os.path.isdir(folder) and not os.path.islink(folder) and any(
        os.path.exists(os.path.join(folder, name)) for name in (STAMP, MARK))


def unlisted(folder: str) -> str | None:
    """The first file (or link) under a finished copy that its stamp does not list, relative to it: a user's
    file that replacing the copy would delete. None when there is none (or no copy)."""
    try:
        with open(os.path.join(folder, STAMP)) as fh:
            listed = {f["path"] for f in json.load(fh)}
    except (OSError, ValueError, TypeError, KeyError):
        listed = set()  # no stamp (a missing folder, or only the mark): nothing of the user's is expected
    for root, dirs, names in os.walk(folder):
        for name in sorted(names) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in listed and name not in (STAMP, MARK):
                return rel
    return None


def _raise(error: str | None) -> None:
    if error is not None:
        raise UserError(error)


def _transfer(sources: list[str] | None, target: str, files: list[dict], group: Comm, write: bool,
              option: str) -> str | None:
    """Broadcast every file from the group's rank 0 (which reads `sources`, one path per entry of `files`);
    writers check and install the copy, holding a lock on its folder. An error string (no exception: every
    member must take part in every broadcast, or the others would wait forever)."""
    fd, error = _lock(os.path.dirname(target) or ".", option) if write else (None, None)
    try:
        # Another job on this node (same DIR) may have made the copy while this one waited for the lock.
        write = write and error is None and not is_staged(target, files)
        return _write(sources, target, files, group, write, option, error)
    finally:
        if fd is not None:
            os.close(fd)


def _source(path: str, option: str, error: str | None):
    """Rank 0's open source file, or None and the error (a file removed since it was listed)."""
    try:
        return open(path, "rb"), error
    except OSError as exc:
        return None, error or f"{option}: cannot read {path} ({exc.strerror}); rerun once it is in place"


def _read(src, size: int) -> np.ndarray:
    """The next `size` bytes of a source; zeros past its end, or in place of a file that cannot be read (cut or
    removed since it was listed): every member takes part in the same broadcasts, and the writers' SHA-256
    check reports the difference."""
    try:
        data = src.read(size) if src else b""
    except OSError:
        data = b""
    return np.frombuffer(data.ljust(size, b"\0"), dtype=np.uint8)


def _lock(root: str, option: str) -> tuple[int | None, str | None]:
    """An exclusive lock on LOCK in the folder that holds the copies (flock, waiting for it; released when the
    process ends, even by kill -9): two jobs staging into one node's DIR at once would delete and write each
    other's staging folder. A file of its own, not DIR: a run whose --out is DIR holds DIR's lock for hours.
    Nothing is locked where the filesystem has no such locks. (fd, None) or (None, error)."""
    try:
        os.makedirs(root, exist_ok=True)
        fd = os.open(os.path.join(root, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        return None, f"{option}: cannot create {root} ({exc.strerror}); choose a writable folder"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    return fd, None


def _write(sources: list[str] | None, target: str, files: list[dict], group: Comm, write: bool, option: str,
           error: str | None) -> str | None:
    """_transfer's broadcasts, once the writer holds the lock (or could not: `error`). Every rank of `group`
    takes part in every broadcast, whatever goes wrong, so that none waits on another."""
    tmp = f"{target}.staging"
    if write:
        error = _refusal(target, tmp, option) or _begin(tmp, option)
        write = error is None
    for i, f in enumerate(files):
        error = _receive(sources[i] if group.rank == 0 else None, tmp if write else None, f, group, option, error)
    if write and error is None:
        _install(tmp, target, files)
    return error


def _refusal(target: str, tmp: str, option: str) -> str | None:
    """Why the writer must not replace `target` (or its staging folder): a folder it did not make, or a copy
    holding files the stamp does not list; None when it may."""
    foreign = [f for f in (target, tmp) if not made_here(f)]
    if foreign:
        return (f"{option}: {foreign[0]} exists and was not made by {option}; move it away or choose another "
                f"(node-local) {option} folder")
    extra = unlisted(target)
    if extra:
        return (f"{option}: {target} holds files {option} did not put there ({extra}); move them away or choose "
                f"another (node-local) {option} folder")
    return None


def _begin(tmp: str, option: str) -> str | None:
    """A fresh staging folder with its mark; the error when it cannot be made."""
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a staging folder (checked by _refusal): a leftover of a killed copy
        os.makedirs(tmp)
        open(os.path.join(tmp, MARK), "wb").close()
    except OSError as exc:
        return f"{option}: cannot create {tmp} ({exc.strerror}); choose a writable folder"
    return None


def _receive(source: str | None, tmp: str | None, f: dict, group: Comm, option: str,
             error: str | None) -> str | None:
    """Broadcast one file from rank 0 (`source`) in pieces; a writer (`tmp` given) stores it under tmp and
    checks its SHA-256. Returns the first error so far."""
    h, out = hashlib.sha256(), None
    if tmp is not None:
        os.makedirs(os.path.dirname(os.path.join(tmp, f["path"])), exist_ok=True)
        out = open(os.path.join(tmp, f["path"]), "wb")
    src, error = _source(source, option, error) if group.rank == 0 else (None, error)
    with src or nullcontext():
        for offset in range(0, max(f["size"], 1), PIECE):
            size = min(PIECE, f["size"] - offset)
            piece = group.bcast_array(_read(src, size) if group.rank == 0 else None, size)
            if out is not None:
                h.update(piece)
                try:
                    out.write(piece.tobytes())
                except OSError as exc:
                    error = error or (f"{option}: writing {tmp} failed ({exc.strerror}); free space or choose "
                                      f"another folder")
    if out is not None:
        out.close()
        if error is None and h.hexdigest() != f["sha256"]:
            error = f"{option}: {f['path']} arrived with a different SHA-256; rerun to copy it again"
    return error


def _install(tmp: str, target: str, files: list[dict]) -> None:
    """Stamp the finished copy and rename it into place."""
    with open(os.path.join(tmp, STAMP), "w") as fh:
        json.dump(files, fh)
    os.remove(os.path.join(tmp, MARK))  # the stamp marks it now: a finished copy holds the files staged only
    shutil.rmtree(target, ignore_errors=True)  # missing, or made here (checked by _refusal)
    os.replace(tmp, target)
