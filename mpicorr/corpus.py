"""What --data names, read as a stream of documents in one fixed order (no torch, no MPI):

    from mpicorr import corpus
    c = corpus.open_corpus("shards/*.jsonl.zst", "text")
    for text in c.documents():        # one document at a time, memory bounded by a line / a row group
        ...
    c.manifest()                      # [{"name", "bytes", "sha256"}] of every shard, hashed on threads

Accepted: a plain text file (one document: the whole file, as mpicorr always read it), jsonl, jsonl.gz,
jsonl.zst (one JSON object per line, the text in --text-field; a .json file may also be one JSON array of such
objects or of strings), parquet (the --text-field column, read one
row group at a time), Arrow files (a Hugging Face dataset saved with save_to_disk, or the arrow files of the
datasets cache), and a folder or glob of such shards (sorted by path; in a folder, .txt files are one
document each). Bad input raises UserError naming the file and the line or row.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, replace
from typing import Iterator

from .errors import UserError
from .hashing import sha256_file, sha256_files

ZSTD_BLOCK = 1 << 17      # compressed bytes read at a time from a .zst shard (text expands about 4-10x)
ARRAY_LIMIT = 1 << 30     # bytes of a JSON array file read whole (parsing takes several times that in memory)
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl.gz", ".json.gz": "jsonl.gz",
            ".jsonl.zst": "jsonl.zst", ".jsonl.zstd": "jsonl.zst", ".json.zst": "jsonl.zst",
            ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
DEFAULT_TEXT_FIELD = "text"  # config.Config.text_field's default (config does not import this module)
HF_STATE = "state.json"   # written by datasets' save_to_disk next to its arrow files
HF_DICT = "dataset_dict.json"


@dataclass(frozen=True)
class Shard:
    """One file of a corpus."""

    path: str
    name: str    # as the manifest names it: relative to the folder or glob's fixed part
    kind: str    # "text", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow"
    size: int


@dataclass(frozen=True)
class Corpus:
    """The shards of --data, in reading order, and the field that holds each document's text."""

    spec: str
    shards: tuple[Shard, ...]
    text_field: str
    plain: bool   # --data is one plain text file: its sha256 stays the run's data identity, as always

    def documents(self, first_shard: int = 0) -> Iterator[str]:
        """Every document from shard `first_shard` on, in order."""
        for shard in self.shards[first_shard:]:
            yield from self.shard_documents(shard)

    def shard_documents(self, shard: Shard) -> Iterator[str]:
        """The documents of one shard; an empty shard is an error."""
        read = {"text": _text_docs, "parquet": _parquet_docs, "arrow": _arrow_docs}.get(shard.kind, _jsonl_docs)
        empty = True
        for text in read(shard, self.text_field):
            empty = False
            yield text
        if empty:
            raise UserError(f"--data {shard.path}: holds no documents; remove the empty shard")

    def manifest(self, count: int | None = None) -> list[dict]:
        """Name, size and SHA-256 of every shard (or of the first `count`), hashed on a few threads."""
        shards = self.shards[:count]
        hashes = sha256_files([s.path for s in shards], file_sha256)  # its errors name --data
        return [{"name": s.name, "bytes": s.size, "sha256": h} for s, h in zip(shards, hashes)]

    def moved(self, base: str) -> "Corpus":
        """The same corpus read from copies of its shards at base/<shard name> (--stage-data): the same names,
        kinds, sizes and order, so the same documents, manifest and data identity."""
        return replace(self, shards=tuple(replace(s, path=os.path.join(base, s.name)) for s in self.shards))

    def unreadable(self) -> str | None:
        """What is wrong with the first shard this process cannot open or whose size is not the one
        listed (rank 0's, when rank 0 resolved the corpus); None when all can be read. A stat per shard, no
        read."""
        for shard in self.shards:
            try:
                with open(shard.path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
            except OSError as exc:
                return f"cannot open {shard.path} ({exc.strerror})"
            if size != shard.size:
                return f"finds {shard.path} at {size} bytes where rank 0 found {shard.size}"
        return None


def data_sha256(corpus: Corpus, manifest: list[dict]) -> str:
    """The run's data identity: a plain text file's own SHA-256 (as before corpora), else that of the
    manifest written as canonical JSON (names, sizes and hashes of every shard in order)."""
    if corpus.plain:
        return manifest[0]["sha256"]
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (hashing.sha256_file); one that cannot be read is a UserError naming --data."""
    try:
        return sha256_file(path)
    except OSError as exc:
        raise UserError(f"--data {path}: cannot read ({exc.strerror}); give readable shards") from None


def open_corpus(spec: str, text_field: str = "text") -> Corpus:
    """Resolve --data into its shards (checked to exist and be readable; their contents are checked as they
    are read)."""
    plain = False
    if _is_glob(spec):
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not paths:
            raise UserError(f"--data {spec}: the pattern matches no file; check the path and the quotes")
        base = _glob_base(spec)
        shards = [_shard(p, os.path.relpath(p, base), strict=True) for p in paths]
    elif os.path.isdir(spec):
        shards = _folder_shards(spec)
    else:
        _check_readable(spec)
        kind = _kind(spec) or "text"
        shards, plain = [Shard(spec, os.path.basename(spec), kind, os.path.getsize(spec))], kind == "text"
    check_text_field(spec, shards, text_field, plain)
    return Corpus(spec, tuple(shards), text_field, plain)


def check_text_field(spec: str, shards: list[Shard], text_field: str, plain: bool) -> None:
    """Refuse a --text-field other than the default where no shard has fields (plain text only): it would be
    ignored, and the user meant a corpus with that field."""
    if text_field == DEFAULT_TEXT_FIELD or any(s.kind != "text" for s in shards):
        return
    what = "a plain text file (one document, read whole)" if plain else "plain text files only (each one document)"
    raise UserError(f"--text-field {text_field}: --data {spec} is {what}, which has no fields; leave out "
                    f"--text-field (it names the JSON field or the parquet/Arrow column of a corpus)")


def folder_name(spec: str) -> str:
    """The last name of --data's path (of a glob, of its folder part before the first wildcard): what
    --stage-data calls its copy."""
    return os.path.basename(os.path.abspath(_glob_base(spec) if _is_glob(spec) else spec)) or "data"


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[") and not os.path.exists(spec)


def _folder_shards(folder: str) -> list[Shard]:
    """The shards of a folder: a save_to_disk dataset's arrow files in its own order, else every file with a
    known suffix below it, sorted by path."""
    if os.path.isfile(os.path.join(folder, HF_DICT)):
        splits = _json(os.path.join(folder, HF_DICT)).get("splits", [])
        raise UserError(f"--data {folder}: a dataset with splits {splits}; give one split's folder, e.g. "
                        f"{os.path.join(folder, (splits or ['train'])[0])}")
    state = os.path.join(folder, HF_STATE)
    if os.path.isfile(state):
        try:
            files = [f["filename"] for f in _json(state)["_data_files"]]
        except (KeyError, TypeError) as exc:
            raise UserError(f"--data {state}: not a datasets save_to_disk state ({exc}); save the dataset "
                            f"again") from None
        return [_shard(os.path.join(folder, f), f, strict=True) for f in files]
    paths = sorted(os.path.join(root, name) for root, names in _walk(folder) for name in names
                   if not name.startswith(".") and _kind(name))
    if not paths:
        raise UserError(f"--data {folder}: no shards (.txt, .jsonl[.gz|.zst], .parquet, .arrow) in this folder")
    return [_shard(p, os.path.relpath(p, folder), strict=False) for p in paths]


def _walk(folder: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) of `folder` and every folder below it, symbolic links to folders followed (a corpus
    put together from linked folders), each real folder once (no loop, no shard twice)."""
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()  # a folder linked twice is read where its first name sorts, on every rank
        yield root, names


def _json(path: str) -> dict:
    """A datasets metadata file (state.json, dataset_dict.json)."""
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"--data {path}: cannot read ({exc}); save the dataset again") from None
    if not isinstance(value, dict):
        raise UserError(f"--data {path}: not a datasets metadata file; save the dataset again")
    return value


def _shard(path: str, name: str, strict: bool) -> Shard:
    kind = _kind(path)
    if kind is None:
        if strict:
            raise UserError(f"--data {path}: unknown shard type; name shards .txt, .jsonl, .jsonl.gz, "
                            f".jsonl.zst, .parquet or .arrow")
        kind = "text"
    _check_readable(path)
    return Shard(path, name, kind, os.path.getsize(path))


def _kind(path: str) -> str | None:
    lower = path.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return SUFFIXES[suffix]
    return None


def _glob_base(spec: str) -> str:
    """The folder part of a glob before its first wildcard (manifest names are relative to it)."""
    fixed = []
    for part in spec.split(os.sep):
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def _check_readable(path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"--data {path}: cannot read ({exc.strerror}); give a readable file") from None


def _text_docs(shard: Shard, _field: str) -> Iterator[str]:
    """A text file: one document, the whole file (tokenized whole, as mpicorr always did)."""
    yield read_text_file(shard.path)


def read_text_file(path: str) -> str:
    """The whole of a UTF-8 text file; unreadable, not UTF-8 or blank is a UserError naming it."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UserError(f"--data {path}: cannot read ({exc.strerror}); give a readable text file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--data {path}: not UTF-8 (byte {exc.start}); convert the file to UTF-8") from None
    if not text.strip():
        raise UserError(f"--data {path}: the file is empty; give a text file with at least one chunk of text")
    return text


def _open_lines(shard: Shard):
    """A binary line reader of a jsonl shard, decompressing .gz and .zst on the fly."""
    fh = open(shard.path, "rb")
    if shard.kind == "jsonl.gz":
        return gzip.open(fh)
    if shard.kind == "jsonl.zst":
        return io.BufferedReader(_Zstd(fh))
    return fh


class _Zstd(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame. A file that ends inside a frame (truncated) is a
    ZstdError: zstandard's stream_reader returns what it decompressed and stops as if the file were whole."""

    def __init__(self, fh):
        import zstandard

        self.fh, self.zstandard, self.dctx = fh, zstandard, zstandard.ZstdDecompressor()
        self.frame, self.inside, self.rest = self.dctx.decompressobj(), False, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self.rest):
            if not self._decompress():
                return 0
        n = min(len(buffer), len(self.rest))
        buffer[:n], self.rest = self.rest[:n], self.rest[n:]
        return n

    def _decompress(self) -> bool:
        """Decompress the next block of the file into self.rest; False at its end."""
        block = self.fh.read(ZSTD_BLOCK)
        if not block and self.inside:
            raise self.zstandard.ZstdError("the file ends inside a frame (truncated)")
        out = []
        while block:
            out.append(self.frame.decompress(block))
            self.inside = True
            if not self.frame.eof:
                break
            block, self.frame, self.inside = self.frame.unused_data, self.dctx.decompressobj(), False
        self.rest = memoryview(b"".join(out))
        return bool(out)

    def close(self) -> None:
        self.fh.close()
        super().close()


def _jsonl_docs(shard: Shard, field: str) -> Iterator[str]:
    """One document per non-blank line: the JSON object's `field`; or, when the file starts with `[` (a JSON
    array, as `json.dump` of a list of records writes it), one per element: an object's `field`, or a string."""
    where = f"--data {shard.path}"
    try:
        with _open_lines(shard) as fh:
            if _starts_array(fh):
                yield from _array_texts(fh, field, where, plain_hint(shard))
                return
            first = True  # a first line that is no JSON object: perhaps plain text under a .json name
            for number, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                yield _line_text(raw, field, f"{where}: line {number}", plain_hint(shard) if first else None)
                first = False
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{where}: cannot read ({exc}); the file is damaged or not {shard.kind}") from None
    except Exception as exc:
        if type(exc).__name__ != "ZstdError":  # zstandard.ZstdError: a damaged frame
            raise
        raise UserError(f"{where}: cannot decompress ({exc}); the file is damaged or not zstd") from None


def plain_hint(shard: Shard) -> str:
    """What to do when a shard read as JSON by its name may be plain text (a .json file of prose)."""
    name = os.path.basename(shard.path)
    suffix = max((x for x in SUFFIXES if name.lower().endswith(x)), key=len)
    fix = "rename it to .txt" if shard.kind == "jsonl" else "decompress it into a .txt file"
    return f"a {suffix} file is read as JSON (an object per line, or an array): if {name} is plain text, {fix}"


def _starts_array(fh) -> bool:
    """Whether the stream's first byte that is not white space is `[` (read nothing: peek)."""
    head = fh.peek(4096) if hasattr(fh, "peek") else b""
    return head.lstrip()[:1] == b"["


def _array_texts(fh, field: str, where: str, hint: str) -> Iterator[str]:
    """The documents of a JSON array file, read whole (up to ARRAY_LIMIT bytes); `hint`: what to do if the file
    is plain text that starts with `[`."""
    raw = fh.read(ARRAY_LIMIT + 1)
    if len(raw) > ARRAY_LIMIT:
        raise UserError(f"{where}: a JSON array of more than {ARRAY_LIMIT >> 30} GiB is read whole; convert it to "
                        f"jsonl, one object per line (jq -c '.[]' FILE > FILE.jsonl)")
    try:
        items = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 (byte {exc.start}); convert the file to UTF-8") from None
    except ValueError as exc:
        raise UserError(f"{where}: not a JSON array ({exc}); fix the file or write it as jsonl; {hint}") from None
    for number, item in enumerate(items, 1):
        text = item if isinstance(item, str) else _field(item, field, f"{where}: array item {number}")
        _check_unicode(text, field, f"{where}: array item {number}")
        yield text


def _field(obj, field: str, where: str) -> str:
    """A JSON object's text field, checked."""
    if not isinstance(obj, dict) or field not in obj:
        raise UserError(f"{where}: no \"{field}\" field; give --text-field with the field that holds the text")
    if not isinstance(obj[field], str):
        raise UserError(f"{where}: \"{field}\" is {type(obj[field]).__name__}, not a string; give "
                        f"--text-field with the field that holds the text")
    return obj[field]


def _line_text(raw: bytes, field: str, where: str, hint: str | None = None) -> str:
    """One JSON line's text; `hint`: what to do instead when it is no JSON object (the file's first line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 (byte {exc.start}); convert the file to UTF-8") from None
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise UserError(f"{where}: not a JSON object ({exc}); {hint or 'fix or remove the line'}") from None
    if hint and not isinstance(obj, dict):
        raise UserError(f"{where}: not a JSON object; {hint}")
    text = _field(obj, field, where)
    if b"\\u" in raw:  # only a \uXXXX escape can leave a lone surrogate, which no tokenizer takes
        _check_unicode(text, field, where)
    return text


def _check_unicode(text: str, field: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{where}: \"{field}\" holds a lone surrogate (\\u{ord(text[exc.start]):04x} at character "
                        f"{exc.start}), not Unicode text; fix or remove the line") from None


def _column_texts(values: list, field: str, where: str, first_row: int) -> Iterator[str]:
    for i, text in enumerate(values):
        if not isinstance(text, str):
            raise UserError(f"{where}: row {first_row + i}: \"{field}\" is {type(text).__name__}, not a string; "
                            f"give --text-field with the column that holds the text")
        yield text


def _parquet_docs(shard: Shard, field: str) -> Iterator[str]:
    """One document per row of the `field` column, one row group in memory at a time."""
    import pyarrow.parquet as pq

    where = f"--data {shard.path}"
    try:
        pf = pq.ParquetFile(shard.path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise UserError(f"{where}: not a parquet file ({_said(exc)}); give .parquet shards") from None
    if field not in pf.schema_arrow.names:
        raise UserError(f"{where}: no column \"{field}\" (columns: {', '.join(pf.schema_arrow.names)}); give "
                        f"--text-field with the column that holds the text")
    row = 0
    for group in range(pf.num_row_groups):
        values = _values(lambda: pf.read_row_group(group, columns=[field]).column(0), where, row)
        yield from _column_texts(values, field, where, row)
        row += len(values)


def _arrow_docs(shard: Shard, field: str) -> Iterator[str]:
    """One document per row of an Arrow stream (datasets' format) or file, one record batch at a time."""
    import pyarrow as pa

    where = f"--data {shard.path}"
    try:
        source = pa.memory_map(shard.path)
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{where}: not an Arrow file ({_said(exc)}); give a dataset saved with save_to_disk") from None
    if field not in reader.schema.names:
        raise UserError(f"{where}: no column \"{field}\" (columns: {', '.join(reader.schema.names)}); give "
                        f"--text-field with the column that holds the text")
    row, index = 0, reader.schema.get_field_index(field)
    while (values := _values(lambda: next(batches, None), where, row, index)) is not None:
        yield from _column_texts(values, field, where, row)
        row += len(values)


def _values(read, where: str, first_row: int, index: int | None = None) -> list | None:
    """The Python values of the column that read() returns (of its record batch's column `index`; None at the
    end): a damaged file or a string that is not UTF-8 becomes a UserError naming the row."""
    try:
        column = read()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ... for a damaged file
        raise UserError(f"{where}: rows from {first_row} on: cannot read ({_said(exc)}); the file is damaged") from None
    if column is not None and index is not None:
        column = column.column(index)
    try:
        return None if column is None else column.to_pylist()
    except UnicodeDecodeError:
        bad = next(i for i in range(len(column)) if not _decodes(column, i))
        raise UserError(f"{where}: row {first_row + bad}: not UTF-8; convert the text to UTF-8") from None


def _said(exc: Exception) -> str:
    """pyarrow's message on one line (some span several)."""
    return " ".join(str(exc).split())


def _decodes(column, i: int) -> bool:
    try:
        column[i].as_py()
    except UnicodeDecodeError:
        return False
    return True
