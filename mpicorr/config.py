"""Run configuration: a frozen dataclass, filled from defaults < ./mpicorr.toml < command line.

    python -m mpicorr run --model DIR_OR_HUB_ID --data wiki.test.raw --out runs/x
    mpirun -hostfile hostfile python -m mpicorr          # reads ./mpicorr.toml
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field

from .errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("static", "dynamic")
CHUNKINGS = ("concat", "document")  # the same tuple as data.CHUNKINGS
KERNELS = ("auto", "gemm", "popcount", "sparse")  # the same tuple as triangle.KERNELS (no torch import here)


SITES = ("ffn", "gate", "heads")  # --site: models.SITES (ffn), GATES and HEADS
THRESHOLD_DIR = "threshold-"  # OUT/threshold-<T>/ per threshold when a run counts several
DEFAULT_HOSTFILE = "./hostfile"  # read when present and no --hostfile is given
CHOICES = {"dtype": DTYPES, "kernel": KERNELS, "schedule": SCHEDULES, "site": SITES, "chunking": CHUNKINGS}


@dataclass(frozen=True)
class Config:
    """Everything a run depends on; the same object on every rank."""

    model: str | None = None
    data: str | None = None
    text_field: str = "text"
    chunking: str = "concat"
    max_tokens: int | None = None
    out: str = "mpicorr-out"
    ctx: int = 512
    chunk_start: int = 0
    chunks: int | None = None
    part: str | None = None
    threshold: tuple[float, ...] = (0.5,)
    site: str = "ffn"
    site_module: str | None = None
    batch_size: int = 1
    dtype: str = "auto"
    device: str = "auto"
    gpus_per_rank: int = 1
    kernel: str = "auto"
    hostfile: str | None = None
    schedule: str = "static"
    stage_model: str | None = None
    stage_data: str | None = None
    force: bool = False
    resume: bool = False
    checkpoint_every: int | None = None
    dump: str | None = None
    dump_tokens: int | None = None
    dump_rate: float | None = None
    dump_values: bool = False
    dump_max_gb: float | None = None
    debug: bool = False
    command: str = field(default="", compare=False)


HELP = {
    "model": "local model folder or Hugging Face hub id (required)",
    "data": "what to count (required): a UTF-8 text file (one document, tokenized whole), a jsonl, jsonl.gz, "
            "jsonl.zst, parquet or arrow file, a folder or quoted glob of such shards (read in sorted order; "
            ".txt files in a folder are one document each), or a folder written by datasets' save_to_disk",
    "text_field": "the JSON field, parquet or arrow column that holds each document's text (default: text; "
                  "plain text has no fields: another value is refused there)",
    "chunking": "concat: the documents' tokens one after another, cut every --ctx tokens, BOS in place of each "
                "chunk's first token; document: each document alone with BOS first, cut every --ctx tokens, "
                "shorter documents and remainders dropped (default: concat)",
    "max_tokens": "use only the chunks within the corpus's first N tokens (chunk numbers, --chunk-start, "
                  "--chunks and --part then refer to those); the rest is not even read (default: all)",
    "out": "output folder for correlations_block_<L>.zstd and summary.h5 (default: mpicorr-out)",
    "ctx": "tokens per chunk; each chunk is one sequence, at most the model's positions (default: 512)",
    "chunk_start": "first chunk to process (default: 0)",
    "chunks": "number of chunks to process (default: all from --chunk-start on)",
    "part": "K/N: process only the K-th (from 0) of N equal shares of the chunks, in whole batches, for "
            "separate jobs (SLURM arrays) whose outputs 'mpicorr sum' adds up (default: all)",
    "threshold": "a neuron fires when x >= +T or x <= -T; several, comma-separated (0.25,0.5,1), are counted "
                 "in one pass, each into OUT/threshold-<T>/ (default: 0.5)",
    "site": "what a neuron is: ffn (the FFN down projection's input), gate (the activation of the gate "
            "projection, gated MLPs), heads (one per attention head: fires when its output's L2 norm >= T) "
            "(default: ffn)",
    "site_module": "record the input of every module whose full name matches this regular expression "
                   "(default: the FFN down projection from the family registry)",
    "batch_size": "chunks per forward pass; the work is split in whole batches (default: 1)",
    "dtype": "model dtype: auto (bfloat16/float16 on GPU, float32 on CPU), float32, bfloat16, float16",
    "device": "auto (this rank's local GPU when CUDA is there, else cpu), cpu, cuda or cuda:N",
    "gpus_per_rank": "GPUs each rank owns: the model is split across them with accelerate's device map and each "
                     "layer's counts stay on the GPU that holds it; start one rank per that many GPUs (default: 1)",
    "kernel": "pair-count kernel: auto (popcount/sparse per batch on CPU, gemm on GPU), gemm, popcount, sparse; "
              "all give the same counts",
    "hostfile": "hostfile giving each rank's weight, or none for equal weights (default: ./hostfile when present)",
    "schedule": "static: each rank one contiguous share of the batches, by hostfile weight; dynamic: rank 0 "
                "hands out batches as ranks ask, so faster GPUs do more (same counts either way; default: static)",
    "stage_model": "copy the model folder from rank 0 over MPI into this node-local folder on every node "
                   "(once: checked by SHA-256, skipped while the copy there hashes the same), for clusters "
                   "without a shared filesystem (default: every rank reads --model itself)",
    "stage_data": "copy --data's shards (a text file: that file) from rank 0 over MPI into <name> in this "
                  "node-local folder on every node (<name>: --data's last path name) and read them there (once: "
                  "checked by SHA-256, skipped while the copy there hashes the same), for clusters without a "
                  "shared filesystem (default: every rank reads --data itself, at the same path on every node)",
    "force": "start over in --out: delete its checkpoints before counting and the previous run's outputs "
             "before writing (only files by mpicorr's names)",
    "resume": "continue the run whose checkpoints are in --out; finished chunks are not counted again "
              "(the number of ranks and the hostfile may differ)",
    "checkpoint_every": "save each rank's partial counts every K chunks it finishes; 0: never "
                        "(default: about every 10 minutes)",
    "dump": "also write predictor training data into this folder: for sampled tokens, each layer's MLP input "
            "and firing mask per threshold (see --dump-tokens, --dump-rate; default: no dump)",
    "dump_tokens": "with --dump: dump N tokens, chosen by a hash of their position in the chunk range",
    "dump_rate": "with --dump: dump each token with probability R (0 < R <= 1), chosen by a hash of its position",
    "dump_values": "with --dump: also dump the recorded activations themselves (N values per token and layer)",
    "dump_max_gb": "with --dump: refuse to start when the dump's estimated size exceeds this many GB "
                   "(default: only the free space of the dump's filesystem is checked)",
    "debug": "print full tracebacks of unexpected errors",
}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one long option per Config field; defaults are None so that the TOML file can fill gaps."""
    types = {"ctx": int, "max_tokens": int, "chunk_start": int, "chunks": int, "threshold": str, "batch_size": int,
             "checkpoint_every": int, "gpus_per_rank": int, "dump_tokens": int, "dump_rate": float,
             "dump_max_gb": float}
    for f in dataclasses.fields(Config):
        if f.name == "command":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":  # --no-X turns off an X = true of the TOML file (the command line overrides it)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
        elif f.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[f.name], default=None, help=HELP[f.name])
        else:
            parser.add_argument(flag, type=types.get(f.name, str), default=None, help=HELP[f.name])
    parser.add_argument("--config", default="mpicorr.toml",
                        help="TOML file with the same keys as the long options (default: ./mpicorr.toml if present)")


def read_toml(path: str, required: bool) -> dict:
    """Read option values from a TOML file; keys may use '-' or '_'."""
    if not os.path.exists(path):
        if required:
            raise UserError(f"{path}: config file not found; create it or leave out --config")
        return {}
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config file ({exc}); fix the TOML syntax (UTF-8 text)") from None
    names = {f.name for f in dataclasses.fields(Config)} - {"command"}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "config":
            raise UserError(f"{path}: key '{key}': a config file cannot name another; give --config FILE on the "
                            f"command line")
        if name not in names:
            raise UserError(f"{path}: unknown key '{key}'; valid keys are the long options of 'mpicorr run' "
                            f"(but --config)")
        _check_type(path, key, name, value)
        values[name] = value
    return values


def _check_type(path: str, key: str, name: str, value: object) -> None:
    """A TOML value of the field's type (threshold: parse_thresholds checks it); the command line's values
    are typed by argparse already."""
    kind = next(f.type for f in dataclasses.fields(Config) if f.name == name)
    if name == "threshold":
        return
    if kind == "bool":
        ok, what = isinstance(value, bool), "true or false"
    elif kind.startswith("int"):
        ok, what = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif kind.startswith("float"):
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, what = isinstance(value, str), "a string in quotes"
    if not ok:
        raise UserError(f"{path}: {key} = {value!r} must be {what}")


def build_config(args: argparse.Namespace, command: str) -> Config:
    """Merge defaults, the TOML file and the command line (in rising priority) and validate."""
    values = read_toml(args.config, required=args.config != "mpicorr.toml")
    for f in dataclasses.fields(Config):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    for key in ("model", "data", "out", "hostfile", "dump", "stage_data"):  # TOML values get no shell expansion of ~
        if isinstance(values.get(key), str) and values[key].startswith("~"):
            values[key] = os.path.expanduser(values[key])
    if values.get("hostfile") is None and os.path.exists(DEFAULT_HOSTFILE):
        values["hostfile"] = DEFAULT_HOSTFILE
    elif str(values.get("hostfile")).lower() == "none":  # --hostfile none: equal weights, ./hostfile or not
        values["hostfile"] = None
    values["command"] = command
    if "threshold" in values:
        values["threshold"] = parse_thresholds(values["threshold"])
    try:
        cfg = Config(**values)
    except TypeError as exc:
        raise UserError(f"configuration: {exc}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check values that need no file access; raise UserError naming the option."""
    if not cfg.model:
        raise UserError("--model is required: a local model folder or a hub id (or 'model' in mpicorr.toml)")
    if not cfg.data:
        raise UserError("--data is required: a UTF-8 text file or a corpus (or 'data' in mpicorr.toml)")
    for option, value in (("--out", cfg.out), ("--stage-model", cfg.stage_model),
                          ("--stage-data", cfg.stage_data), ("--dump", cfg.dump)):
        if value == "":  # e.g. stage_data = "$LOCAL" unset in a generated TOML: not "off" without a word
            raise UserError(f"{option} '': an empty path; give a folder, or leave the option out")
    _check_int("--ctx", cfg.ctx, 2)
    if cfg.chunking not in CHUNKINGS:
        raise UserError(f"--chunking {cfg.chunking!r}: choose concat or document")
    if not isinstance(cfg.text_field, str) or not cfg.text_field:
        raise UserError(f"--text-field {cfg.text_field!r}: give the name of the field that holds the text")
    if cfg.max_tokens is not None:
        _check_int("--max-tokens", cfg.max_tokens, cfg.ctx)
    _check_int("--chunk-start", cfg.chunk_start, 0)
    if cfg.chunks is not None:
        _check_int("--chunks", cfg.chunks, 1)
    _check_int("--batch-size", cfg.batch_size, 1)
    if cfg.part is not None:
        parse_part(cfg.part)
    if cfg.checkpoint_every is not None:
        _check_int("--checkpoint-every", cfg.checkpoint_every, 0)
    if cfg.force and cfg.resume:
        raise UserError("--force starts over and --resume continues: give only one of them")
    if not isinstance(cfg.threshold, tuple) or not cfg.threshold:
        raise UserError(f"--threshold {cfg.threshold!r}: give one or more positive numbers, e.g. 0.5 or 0.25,0.5,1")
    check_site(cfg.site, cfg.site_module)
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    check_device(cfg.device)
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"--schedule {cfg.schedule!r}: choose static or dynamic")
    if cfg.kernel not in KERNELS:
        raise UserError(f"--kernel {cfg.kernel!r}: choose one of {', '.join(KERNELS)}")
    _check_int("--gpus-per-rank", cfg.gpus_per_rank, 1)
    if cfg.gpus_per_rank > 1 and cfg.device not in ("auto", "cuda") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--gpus-per-rank {cfg.gpus_per_rank}: needs GPUs; leave out --device {cfg.device} or use 1")
    if cfg.kernel in ("popcount", "sparse") and cfg.device.startswith("cuda"):
        raise UserError(f"--kernel {cfg.kernel}: runs on the CPU only; use --kernel auto or gemm with --device cuda")
    _check_dump(cfg)


def check_site(site: str, site_module: str | None) -> None:
    """--site and --site-module, for run, plan and inspect alike: a known site, and a regular expression only
    with the ffn site (whose registry it replaces)."""
    if site not in SITES:
        raise UserError(f"--site {site!r}: choose ffn, gate or heads")
    if site_module is not None and site != "ffn":
        raise UserError(f"--site-module replaces the ffn registry (the input of the modules it names); "
                        f"leave out --site {site} or --site-module")
    if site_module is not None:
        try:
            re.compile(site_module)
        except re.error as exc:
            raise UserError(f"--site-module {site_module!r}: not a regular expression ({exc})") from None


def check_device(name: str, auto: bool = True) -> None:
    """Refuse a --device torch would not take (or not as meant), in one line: cpu, cuda, cuda:N, and auto
    where `auto`. For run, bench and analysis/predictor.py alike."""
    if not (re.fullmatch(r"cpu|cuda(:\d+)?", name) or auto and name == "auto"):
        raise UserError(f"--device {name!r}: choose {'auto, ' if auto else ''}cpu, cuda or cuda:N")


def _check_dump(cfg: Config) -> None:
    """The --dump options: a sample size (tokens or rate) exactly when dumping, on FFN neurons."""
    given = [o for o, v in (("--dump-tokens", cfg.dump_tokens), ("--dump-rate", cfg.dump_rate),
                            ("--dump-values", cfg.dump_values or None), ("--dump-max-gb", cfg.dump_max_gb))
             if v is not None]
    if cfg.dump is None:
        if given:
            raise UserError(f"{given[0]}: only with --dump DIR; add --dump or leave it out")
        return
    if (cfg.dump_tokens is None) == (cfg.dump_rate is None):
        raise UserError(f"--dump {cfg.dump}: give exactly one of --dump-tokens N and --dump-rate R (how many "
                        f"tokens to dump)")
    dump, out = os.path.realpath(cfg.dump), os.path.realpath(cfg.out)
    if os.path.commonpath([dump, out]) == dump:  # the same folder, or --out inside the dump (which it empties)
        raise UserError(f"--dump {cfg.dump}: the dump needs a folder of its own, not --out's nor one holding "
                        f"--out; e.g. {cfg.out}/dump")
    if cfg.dump_tokens is not None:
        _check_int("--dump-tokens", cfg.dump_tokens, 1)
    if cfg.dump_rate is not None and not (_number(cfg.dump_rate) and 0 < cfg.dump_rate <= 1):
        raise UserError(f"--dump-rate {cfg.dump_rate!r}: must be a number with 0 < R <= 1")
    if cfg.dump_max_gb is not None and not (_number(cfg.dump_max_gb) and cfg.dump_max_gb > 0):
        raise UserError(f"--dump-max-gb {cfg.dump_max_gb!r}: must be a number > 0")
    if cfg.site == "heads" or cfg.site_module is not None:
        what = "--site heads" if cfg.site == "heads" else "--site-module"
        raise UserError(f"--dump: masks of FFN neurons only (--site ffn or gate, from the family registry); "
                        f"leave out {what} or --dump")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hostfile_label(path: str) -> str:
    """How messages name the hostfile: a ./hostfile nobody asked for says so, and how to do without it."""
    return f"{path} (read by default; --hostfile none for equal weights)" if path == DEFAULT_HOSTFILE else path


def parse_thresholds(value: object) -> tuple[float, ...]:
    """The sorted thresholds of a --threshold value: a number, "0.25,0.5,1" or (in TOML) a list of numbers."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    thresholds = []
    for item in items:
        try:
            t = float(item.strip() if isinstance(item, str) else item) if not isinstance(item, bool) else -1.0
        except (TypeError, ValueError):
            t = -1.0
        if not math.isfinite(t) or t <= 0:
            raise UserError(f"--threshold {value!r}: {item!r} is not a positive number; give e.g. 0.5 or 0.25,0.5,1")
        thresholds.append(t)
    if not thresholds:
        raise UserError("--threshold: empty list; give e.g. 0.5 or 0.25,0.5,1")
    if len(set(thresholds)) != len(thresholds):
        raise UserError(f"--threshold {value!r}: a threshold is given twice; list each once")
    return tuple(sorted(thresholds))


def output_folders(out: str, thresholds: tuple[float, ...]) -> list[str]:
    """Where each threshold's matrix files and summary.h5 go: OUT itself for one threshold, else
    OUT/threshold-<T> (T as Python writes the float, e.g. threshold-0.5, threshold-1.0)."""
    if len(thresholds) == 1:
        return [out]
    return [os.path.join(out, f"{THRESHOLD_DIR}{t!r}") for t in thresholds]


def threshold_folders(folder: str) -> list[str]:
    """The threshold-<T> subfolders of a run folder that counted several thresholds (sorted by T)."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        if name.startswith(THRESHOLD_DIR) and os.path.isdir(os.path.join(folder, name)):
            try:
                found.append((float(name[len(THRESHOLD_DIR):]), os.path.join(folder, name)))
            except ValueError:
                continue
    return [path for _, path in sorted(found)]


def parse_part(part: str) -> tuple[int, int]:
    """(K, N) of a --part K/N value."""
    k, _, n = str(part).partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise UserError(f"--part {part!r}: give K/N with 0 <= K < N, e.g. 0/4 for the first of four shares")
    return k, n


def _check_int(option: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{option} {value!r}: must be a whole number >= {minimum}")
