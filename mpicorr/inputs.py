"""Cheap checks of a run's input files, before torch, transformers or MPI start (they take seconds):

    from mpicorr import inputs
    inputs.check(cfg)                       # --data readable, --model a folder or a hub id in the local cache

A hub id is read from the local Hugging Face cache only (the command line turns on HF_HUB_OFFLINE):
mpicorr never downloads a model, so no rank waits on the network inside an MPI job; `hf download`
fetches one first.
"""

from __future__ import annotations

import os

from .config import Config
from .errors import UserError


def check(cfg: Config) -> None:
    """Refuse a missing or unreadable --data file and a --model that is neither a folder nor cached."""
    check_data(cfg.data, cfg.text_field)
    check_outputs_outside_data(cfg)
    model_folder(cfg.model)


def check_outputs_outside_data(cfg: Config) -> None:
    """Refuse an --out or --dump inside a --data folder: every .json, .jsonl, .txt... file below such a folder is
    a shard, so the run's run.json or the dump's index.json would join the corpus, and the next run over that
    folder would fail on them or count them (a save_to_disk folder, which reads only its state.json's files,
    is spared)."""
    from .corpus import HF_STATE

    if not os.path.isdir(cfg.data) or os.path.isfile(os.path.join(cfg.data, HF_STATE)):
        return
    data = os.path.realpath(cfg.data)
    for option, path in (("--out", cfg.out), ("--dump", cfg.dump)):
        if path and os.path.commonpath([data, os.path.realpath(path)]) == data:
            raise UserError(f"{option} {path}: inside the --data folder {cfg.data}, every file of which is read "
                            f"as a shard (the run's own .json files would join the corpus); choose a folder "
                            f"outside it")


def check_data(path: str, text_field: str = "text") -> None:
    """--data must name readable files: a text file, shards, a folder or glob of them (their contents are
    checked when they are read)."""
    from .corpus import open_corpus

    open_corpus(path, text_field)


def model_folder(name: str) -> str:
    """The folder --model names: itself, or a hub id's snapshot in the local cache."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"--model {name}: no config.json in this folder; give a folder written by "
                            f"save_pretrained")
        return name
    if looks_local(name):
        raise UserError(f"--model {name}: no such folder; give a model folder or a hub id like org/name")
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - an invalid id or any missing piece: not usable from the cache
        raise UserError(f"--model {name}: not a folder, and not in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}); download it first with 'hf download {name}', or give a "
                        f"model folder") from None


def looks_local(name: str) -> bool:
    """A path rather than a hub id (org/name): ./x, /x, ~/x, a/b/c, or anything that exists."""
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or os.path.exists(name)
