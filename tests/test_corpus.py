"""Corpora (issue 15): every --data format gives the documents in order, streamed; counts of a corpus equal
those of the same text as plain files; --chunking document against a brute-force reference; 1, 2 and 3 ranks
give the same bytes; bad input is one line and exit 2 with nothing written."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mpicorr import corpus, data, matrixfile, models, summary, tiny
from mpicorr.dist import Comm
from mpicorr.errors import UserError
from conftest import MPIRUN, cli_env, run_main
from reference import pair_loop, reference_run

CTX = 16


def documents() -> list[str]:
    """The sample text's sentences (lengths from a few tokens to a few chunks), and one with non-ASCII text."""
    sentences = [s.strip() + " ." for s in tiny.sample_text().replace("\n", " ").split(" . ") if s.strip()]
    return sentences + ["naïve café — 東京 , Zürich and ☃ : text beyond ASCII , read as UTF-8 ."]


def write_jsonl(path: str, docs: list[str], opener=open) -> str:
    with opener(path, "wt", encoding="utf-8") as fh:
        for i, doc in enumerate(docs):
            fh.write(json.dumps({"id": i, "text": doc}) + "\n")
    return path


def write_zst(path: str, docs: list[str]) -> str:
    import zstandard

    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    with open(path, "wb") as fh:
        fh.write(zstandard.ZstdCompressor().compress(raw))
    return path


def write_parquet(path: str, docs: list[str], column: str = "text") -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path, row_group_size=7)
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    """The same documents as: a folder of .txt files (one per document), one jsonl, jsonl.gz, jsonl.zst,
    parquet (row groups of 7), a save_to_disk dataset, a JSON array (indented, records and plain strings, as
    json.dump writes a list), and a folder of mixed shards."""
    from datasets import Dataset

    base, docs = tmp_path_factory.mktemp("corpora"), documents()
    (base / "txt").mkdir()
    for i, doc in enumerate(docs):
        (base / "txt" / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    mixed = base / "mixed"
    mixed.mkdir()
    thirds = [docs[: len(docs) // 3], docs[len(docs) // 3 : 2 * len(docs) // 3], docs[2 * len(docs) // 3 :]]
    write_jsonl(str(mixed / "a.jsonl.gz"), thirds[0], gzip.open)
    write_parquet(str(mixed / "b.parquet"), thirds[1])
    write_zst(str(mixed / "c.jsonl.zst"), thirds[2])
    Dataset.from_dict({"text": docs}).save_to_disk(str(base / "hf"), max_shard_size="2KB")
    items = [doc if i % 3 == 0 else {"id": i, "text": doc} for i, doc in enumerate(docs)]
    (base / "d.json").write_text("\n  " + json.dumps(items, indent=2), encoding="utf-8")
    return {"txt": str(base / "txt"), "jsonl": write_jsonl(str(base / "d.jsonl"), docs),
            "gz": write_jsonl(str(base / "d.jsonl.gz"), docs, gzip.open), "zst": write_zst(str(base / "d.jsonl.zst"), docs),
            "parquet": write_parquet(str(base / "d.parquet"), docs), "hf": str(base / "hf"), "mixed": str(mixed),
            "glob": str(mixed / "*"), "one": write_jsonl(str(base / "one.jsonl"), [tiny.sample_text()]),
            "array": str(base / "d.json")}


@pytest.fixture(scope="module")
def tokenizer(llama):
    return models.load_tokenizer(llama)


def brute_chunks(tok, docs: list[str], ctx: int, chunking: str) -> np.ndarray:
    """The chunks by the README's rules, written independently of mpicorr.data."""
    bos = tok.bos_token_id
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    rows = []
    if chunking == "concat":
        stream = [t for doc in ids for t in doc]
        rows = [stream[i : i + ctx] for i in range(0, len(stream) - ctx + 1, ctx)]
    else:
        for doc in ids:
            doc = [bos] + doc
            rows += [doc[i : i + ctx] for i in range(0, len(doc) - ctx + 1, ctx)]
    for row in rows:
        row[0] = bos
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "gz", "zst", "parquet", "hf", "array", "mixed", "glob"])
def test_every_format_reads_the_documents_in_order(corpora, kind):
    c = corpus.open_corpus(corpora[kind])
    assert list(c.documents()) == documents()
    manifest = c.manifest()
    assert [m["bytes"] for m in manifest] == [os.path.getsize(s.path) for s in c.shards]
    assert len(corpus.data_sha256(c, manifest)) == 64 and not c.plain


@pytest.mark.parametrize("chunking", ["concat", "document"])
def test_chunk_source_equals_brute_force_chunks(corpora, tokenizer, monkeypatch, chunking):
    """Every batch split gives the brute-force chunks, with pass 1 in rounds of at most 5 documents or 300 characters; --max-tokens
    keeps the first whole chunks."""
    monkeypatch.setattr(data, "ROUND_DOCS", 5)
    monkeypatch.setattr(data, "ROUND_CHARS", 300)  # some rounds end at a length, not a document count
    monkeypatch.setattr(data, "ENCODE_DOCS", 2)
    want = brute_chunks(tokenizer, documents(), CTX, chunking)
    c = corpus.open_corpus(corpora["mixed"])
    layout = data.scan(c, tokenizer, CTX, chunking, None, Comm())
    assert layout.chunks == len(want) and layout.complete
    for step in (1, 3, 7):
        source = data.ChunkSource(c, layout, tokenizer)
        got = np.concatenate([source.get(a, min(a + step, layout.chunks)) for a in range(0, layout.chunks, step)])
        assert np.array_equal(got, want), step
    assert np.array_equal(data.ChunkSource(c, layout, tokenizer).get(5, 9), want[5:9])
    short = data.scan(c, tokenizer, CTX, chunking, 10 * CTX + 5, Comm())
    assert short.chunks == 10 and not short.complete and len(short.doc_tokens) < len(documents())
    assert np.array_equal(data.ChunkSource(c, short, tokenizer).get(0, 10), want[:10])
    if chunking == "document":
        lengths = np.array([len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents()])
        assert layout.skipped() == (int((lengths < CTX).sum()), int((lengths % CTX).sum())) and layout.skipped()[0]


@pytest.mark.parametrize("chunking", ["concat", "document"])
@pytest.mark.parametrize("budget", ["all", "some"])
def test_ids_kept_from_pass_1_are_not_tokenized_again(corpora, tokenizer, monkeypatch, chunking, budget):
    """Pass 2 takes the ids pass 1 kept (every document, or the first two within a budget that the third
    would exceed) instead of tokenizing those documents again, and gives the same chunks as a source that
    kept nothing."""
    monkeypatch.setattr(data, "ROUND_DOCS", 5)
    c = corpus.open_corpus(corpora["mixed"])
    first = [len(ids) for ids in data.encode(tokenizer, documents()[:3])]
    kept = data.Kept(data.KEEP_TOKENS if budget == "all" else sum(first) + 3 * data.KEEP_DOC_COST - 1)
    layout = data.scan(c, tokenizer, CTX, chunking, None, Comm(), kept)
    held = sorted(kept.ids)
    assert held == (list(range(len(documents()))) if budget == "all" else [0, 1])
    encoded: list[str] = []
    real = data.encode
    monkeypatch.setattr(data, "encode", lambda tok, texts: encoded.extend(texts) or real(tok, texts))
    used = []
    take = kept.take
    kept.take = lambda d, text: used.append(d) or take(d, text) if d in kept.ids else take(d, text)
    got = data.ChunkSource(c, layout, tokenizer, kept).get(0, layout.chunks)
    with_kept = len(encoded)
    encoded.clear()
    assert np.array_equal(got, data.ChunkSource(c, layout, tokenizer).get(0, layout.chunks))
    assert used and with_kept == len(encoded) - len(used)  # the second source tokenized all it needed
    assert with_kept == 0 if budget == "all" else with_kept > 0
    kept = data.Kept()
    data.scan(c, tokenizer, CTX, chunking, None, Comm(), kept)
    source = data.ChunkSource(c, layout, tokenizer, kept)
    source.get(layout.chunks - 1, layout.chunks)  # a later start forgets the documents before it
    assert source.cached[0] > 0 and all(d > source.cached[0] for d in kept.ids)


@pytest.mark.parametrize("tokens", [1, 1000])
def test_kept_ids_stay_within_their_memory_budget(tokens):
    """Kept holds at most 4 bytes per id of its budget, Python's per-document overheads (array, digest, dict
    entry) included: a corpus of one-token documents does not hold ~70x that; ids below 2**31 are int32."""
    import tracemalloc

    budget = 100_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = data.Kept(budget)
        for doc in range(2 * budget // tokens):
            kept.offer(doc, [doc % 384 + (1 << 31) * (doc == 5)] * tokens, "x")
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0 < held <= 4 * budget and len(kept.ids) > 5, held
    assert {ids.dtype for d, (ids, _) in kept.ids.items() if d != 5} == {np.dtype(np.int32)}
    assert kept.ids[5][0].dtype == np.int64 and kept.take(5, "x")[0] == 5 + (1 << 31)


def test_kept_ids_go_with_the_first_source(corpora, tokenizer):
    """run.Data hands pass 1's kept ids to its first source() and keeps no reference: once that source is done
    (counting ends), ids it never asked for are freed, not held through the reduce and the writing."""
    import gc
    import weakref

    from mpicorr import run

    c = corpus.open_corpus(corpora["jsonl"])
    kept = data.Kept()
    layout = data.scan(c, tokenizer, CTX, "concat", None, Comm(), kept)
    held, gone = run.Data(c, layout, tokenizer, None, kept), weakref.ref(kept)
    source = held.source()
    assert source.kept is kept and len(kept.ids) == len(documents())
    del kept, source
    gc.collect()
    assert gone() is None and held.source().kept.ids == {}


def rewritten(path: str, docs: list[str], tokenizer) -> tuple[str, str]:
    """Two rewrites of a jsonl of `docs` for after pass 1: (one document with other text of the same token count,
    one document longer), each as the file's new contents."""
    lengths = [len(ids) for ids in data.encode(tokenizer, docs)]
    i, j = next((i, j) for i in range(len(docs)) for j in range(i + 1, len(docs))
                if lengths[i] == lengths[j] and docs[i] != docs[j])
    same = docs[:i] + [docs[j]] + docs[i + 1 :]
    longer = docs[:i] + [docs[i] + " and then some more words ."] + docs[i + 1 :]
    lines = lambda texts: "".join(json.dumps({"text": t}) + "\n" for t in texts)  # noqa: E731
    return lines(same), lines(longer)


@pytest.mark.parametrize("chunking", ["concat", "document"])
def test_a_document_rewritten_after_pass_1_is_read_again_not_taken_from_pass_1(corpora, tokenizer, tmp_path,
                                                                                 chunking):
    """A document changed between the passes: its kept ids are not used. Other text of the same token count gives
    the chunks of a source that kept nothing (the text read now, on whichever rank reads it); a longer text is
    the "changed while the run read it" error, as without keeping."""
    path = write_jsonl(str(tmp_path / "d.jsonl"), documents())
    same, longer = rewritten(path, documents(), tokenizer)
    for text, fails in ((same, False), (longer, True)):
        write_jsonl(path, documents())
        c = corpus.open_corpus(path)
        kept = data.Kept()
        layout = data.scan(c, tokenizer, CTX, chunking, None, Comm(), kept)
        assert len(kept.ids) == len(documents())
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        if fails:
            with pytest.raises(UserError, match="changed while the run read it"):
                data.ChunkSource(c, layout, tokenizer, kept).get(0, layout.chunks)
        else:
            got = data.ChunkSource(c, layout, tokenizer, kept).get(0, layout.chunks)
            assert np.array_equal(got, data.ChunkSource(c, layout, tokenizer).get(0, layout.chunks))


def test_a_corpus_rewritten_between_the_passes_of_a_run_is_one_line(llama, tokenizer, tmp_path, monkeypatch):
    """The whole run: a document that gets longer after pass 1 (ids kept on the only rank) ends it with the
    one-line error and exit 2, nothing written."""
    path = write_jsonl(str(tmp_path / "d.jsonl"), documents())
    longer = rewritten(path, documents(), tokenizer)[1]
    scan = data.scan

    def scan_then_rewrite(*args, **kwargs):
        layout = scan(*args, **kwargs)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(longer)
        return layout

    monkeypatch.setattr(data, "scan", scan_then_rewrite)
    out = tmp_path / "out"
    result = run_main(["run", "--model", llama, "--data", path, "--ctx", str(CTX), "--out", str(out)])
    assert result.returncode == 2 and "changed while the run read it" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (out / "summary.h5").exists()


def test_kept_ids_of_many_documents_are_taken_in_linear_time():
    """Taking document d forgets the earlier ones; with 100,000 short documents kept (a budget of 2**24 ids holds
    twice that) the first version scanned every kept document at each take, about 2.5 * 10**9 steps here (a
    minute). In document order now, the earliest leave first."""
    import time
    kept = data.Kept(1 << 30)
    texts = [f"d{i}" for i in range(100_000)]
    for i, text in enumerate(texts):
        kept.offer(i, [i % 7], text)
    started = time.monotonic()
    got = [kept.take(i, texts[i]) for i in range(0, 100_000, 2)]  # every other one: the rest are forgotten
    assert time.monotonic() - started < 10 and list(kept.ids) == [99_999]
    assert [int(ids[0]) for ids in got[:4]] == [0, 2, 4, 6]


def counted(folder: str) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".zstd")}


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_corpus_counts_equal_plain_text(llama, sample_path, corpora, tmp_path):
    """concat: a one-document jsonl counts the bytes of the text file; every format of the multi-document
    corpus counts the bytes of the folder of .txt files (the same token stream); the text file keeps its own
    sha256 as data_sha256."""
    args = ["run", "--model", llama, "--ctx", "64", "--batch-size", "2"]
    ok(run_main(args + ["--data", sample_path, "--out", str(tmp_path / "plain")]))
    ok(run_main(args + ["--data", corpora["one"], "--out", str(tmp_path / "one")]))
    assert counted(str(tmp_path / "plain")) == counted(str(tmp_path / "one")) != {}
    root = summary.read_summary(str(tmp_path / "plain" / "summary.h5"))[0]
    assert root["data_sha256"] == corpus.file_sha256(sample_path) and root["chunking"] == "concat"
    assert "data_manifest" not in root
    for kind in ("txt", "jsonl", "zst", "parquet", "hf", "array", "mixed"):
        ok(run_main(args + ["--data", corpora[kind], "--out", str(tmp_path / kind), "--ctx", str(CTX)]))
        assert counted(str(tmp_path / kind)) == counted(str(tmp_path / "txt")), kind
    root = summary.read_summary(str(tmp_path / "mixed" / "summary.h5"))[0]
    assert [m["name"] for m in json.loads(root["data_manifest"])] == ["a.jsonl.gz", "b.parquet", "c.jsonl.zst"]
    assert root["documents"] == len(documents()) and root["data_shards"] == 3


def test_document_chunking_equals_brute_force_reference(llama, corpora, tokenizer, tmp_path):
    out = str(tmp_path / "doc")
    result = ok(run_main(["run", "--model", llama, "--data", corpora["jsonl"], "--out", out, "--ctx", str(CTX),
                          "--chunking", "document", "--chunk-start", "2", "--chunks", "20"]))
    chunks = brute_chunks(tokenizer, documents(), CTX, "document").tolist()
    fired = reference_run(llama, None, CTX, 0.5, 2, 20, chunks=chunks)[0]
    for layer, mask in fired.items():
        header, packed = matrixfile.read_matrix(os.path.join(out, matrixfile.matrix_name(layer)))
        assert header.trials == 20 * CTX and np.array_equal(packed, pair_loop(mask)), layer
    root = summary.read_summary(os.path.join(out, "summary.h5"))[0]
    assert root["chunking"] == "document" and root["chunks_available"] == len(chunks)
    assert root["documents_skipped"] > 0, result.stdout


def test_max_tokens_and_plan(llama, corpora, tokenizer, tmp_path):
    """--max-tokens counts the chunks of the first N tokens (the bytes of --chunks N // ctx); plan shows the
    token and chunk counts without counting."""
    args = ["run", "--model", llama, "--data", corpora["mixed"], "--ctx", str(CTX)]
    ok(run_main(args + ["--max-tokens", str(12 * CTX + 3), "--out", str(tmp_path / "max")]))
    ok(run_main(args + ["--chunks", "12", "--out", str(tmp_path / "chunks")]))
    assert counted(str(tmp_path / "max")) == counted(str(tmp_path / "chunks"))
    shown = ok(run_main(["plan", *args[1:], "--chunking", "document", "--ranks", "2"])).stdout
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in documents())
    chunks = len(brute_chunks(tokenizer, documents(), CTX, "document"))
    assert f"{len(documents())} document(s) in 3 shard(s), {tokens} tokens" in shown
    assert f"{chunks} chunks of {CTX} tokens" in shown and "--chunking document" in shown
    assert "shorter than --ctx skipped" in shown and not os.path.exists(str(tmp_path / "mpicorr-out"))


def test_too_many_chunks_within_max_tokens_names_max_tokens(llama, corpora, tmp_path):
    """--chunks beyond the chunks --max-tokens leaves: the message names --max-tokens. Before it said
    'CORPUS has 3 chunks', of a corpus that has many more, leaving the user to guess why."""
    args = ["run", "--model", llama, "--data", corpora["mixed"], "--ctx", str(CTX), "--out", str(tmp_path / "o")]
    result = run_main(args + ["--max-tokens", str(3 * CTX), "--chunks", "4"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"--chunks 4: {corpora['mixed']} within --max-tokens {3 * CTX} has 3 chunks" in result.stderr
    assert not os.path.exists(tmp_path / "o")


def bad_inputs(tmp_path) -> list[tuple[list[str], str]]:
    """(extra arguments, what the one line must name) for every kind of bad input."""
    def jsonl(name: str, lines: list[bytes]) -> str:
        path = tmp_path / name
        path.write_bytes(b"\n".join(lines) + b"\n")
        return str(path)

    good = json.dumps({"text": "fine text here"}).encode()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jsonl").write_bytes(good + b"\n")
    (empty / "b.jsonl").write_bytes(b"")
    gone = tmp_path / "gone"
    gone.mkdir()
    os.symlink(str(tmp_path / "nowhere.jsonl"), str(gone / "a.jsonl"))
    return [
        (["--data", jsonl("json.jsonl", [good, good, b"{not json"])], "json.jsonl: line 3"),
        (["--data", jsonl("field.jsonl", [good, b'{"content": "x"}'])], "field.jsonl: line 2"),
        (["--data", jsonl("type.jsonl", [b'{"text": 5}'])], "type.jsonl: line 1"),
        (["--data", jsonl("utf8.jsonl", [good, b'{"text": "caf\xe9"}'])], "utf8.jsonl: line 2"),
        (["--data", str(gone)], "gone/a.jsonl: cannot read"),
        (["--data", str(empty)], "b.jsonl: holds no documents"),
        (["--data", str(tmp_path / "no-such-*.jsonl")], "matches no file"),
        (["--data", write_parquet(str(tmp_path / "col.parquet"), ["a b c"], column="body")], "no column \"text\""),
        (["--data", jsonl("short.jsonl", [good])], "too short for one chunk"),
        (["--data", jsonl("cut.json", [b'[{"text": "fine text here"},'])], "cut.json: not a JSON array"),
        (["--data", jsonl("item.json", [b'[{"text": "a"}, {"body": "b"}]'])], "item.json: array item 2: no \"text\""),
        (["--data", jsonl("nums.json", [b'["a", 7]'])], "nums.json: array item 2: no \"text\""),
        (["--data", jsonl("shortdoc.jsonl", [good] * 40), "--chunking", "document"], "every document is shorter"),
    ]


def test_bad_input_is_one_line_and_nothing_written(llama, tmp_path):
    for extra, named in bad_inputs(tmp_path):
        out = tmp_path / "out"
        result = run_main(["run", "--model", llama, "--ctx", str(CTX), "--out", str(out), *extra])
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (extra, result.stderr)
        assert named in result.stderr and not out.exists(), (extra, result.stderr)


def test_bad_input_under_mpirun_is_one_line(llama, tmp_path):
    """Pass 1 meets the bad line on every rank: rank 0 reports it once, every rank exits, nothing written."""
    from conftest import run_cli

    extra, named = bad_inputs(tmp_path)[0]
    out = tmp_path / "out"
    result = run_cli(["run", "--model", llama, "--ctx", str(CTX), "--out", str(out), *extra], ranks=2, timeout=120)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("mpicorr: error:")]
    assert result.returncode == 2 and len(lines) == 1 and named in lines[0], result.stderr
    assert not out.exists()


def test_plain_text_is_not_taken_for_fields_or_json(llama, sample_path, tmp_path):
    """A --text-field on plain text was ignored without a word (the run counted the text file), and prose in a
    .json file was refused as a broken JSON line that a user could not act on: each is now one line (exit 2,
    nothing written) saying what to do. A folder with a shard that has fields keeps the --text-field."""
    prose = tmp_path / "notes.json"
    shutil.copy(sample_path, prose)
    (tmp_path / "cite.json").write_text("[citation needed] prose that starts with a bracket\n" * 50)
    (tmp_path / "nums.json").write_text("1984\nand then prose\n")
    (tmp_path / "txt").mkdir()
    shutil.copy(sample_path, tmp_path / "txt" / "a.txt")
    cases = [(["--data", sample_path, "--text-field", "body"], f"--text-field body: --data {sample_path} is a "
              "plain text file"),
             (["--data", str(tmp_path / "txt"), "--text-field", "body"], "is plain text files only"),
             (["--data", str(prose)], "notes.json: line 1: not a JSON object (Expecting value"),
             (["--data", str(tmp_path / "cite.json")], "if cite.json is plain text, rename it to .txt"),
             (["--data", str(tmp_path / "nums.json")], "if nums.json is plain text, rename it to .txt")]
    for extra, named in cases:
        out = tmp_path / "out"
        result = run_main(["run", "--model", llama, "--ctx", str(CTX), "--out", str(out), *extra])
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (extra, result.stderr)
        assert named in result.stderr and not out.exists(), (extra, result.stderr)
    with pytest.raises(UserError, match="if notes.json is plain text, rename it to .txt"):
        list(corpus.open_corpus(str(prose)).documents())
    write_jsonl(str(tmp_path / "txt" / "b.jsonl"), ["x"])  # a shard with fields: the option means something
    assert corpus.open_corpus(str(tmp_path / "txt"), "body").text_field == "body"


def test_check_data_refuses_before_torch(tmp_path):
    from mpicorr import inputs

    with pytest.raises(UserError, match="matches no file"):
        inputs.check_data(str(tmp_path / "x-*.jsonl"))
    inputs.check_data(write_jsonl(str(tmp_path / "a.jsonl"), ["x"]))


def bad_utf8_strings():
    """A pyarrow string array whose second value ("caf\\xe9") is not UTF-8 (pyarrow does not check on write)."""
    import pyarrow as pa

    offsets = pa.py_buffer(np.array([0, 2, 6], dtype=np.int32).tobytes())
    return pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"okcaf\xe9")])


def test_damaged_parquet_and_arrow_name_the_file_and_row(tmp_path):
    """A string that is not UTF-8, a damaged page or a truncated Arrow stream: one UserError line naming the file
    and the row (pyarrow's UnicodeDecodeError and OSError escaped, a multi-line message included)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": bad_utf8_strings()}), str(tmp_path / "utf8.parquet"))
    with pa.OSFile(str(tmp_path / "utf8.arrow"), "wb") as fh, \
            pa.ipc.new_stream(fh, pa.schema([("text", pa.string())])) as writer:
        writer.write_batch(pa.record_batch([bad_utf8_strings()], names=["text"]))
    whole = (tmp_path / "utf8.arrow").read_bytes()
    (tmp_path / "cut.arrow").write_bytes(whole[:-20])
    good = (tmp_path / "good.parquet")
    pq.write_table(pa.table({"text": ["a", "b"]}), str(good))
    raw = good.read_bytes()
    (tmp_path / "page.parquet").write_bytes(raw[:8] + b"\0" * 20 + raw[28:])  # the first page header
    for name, said in [("utf8.parquet", "row 1: not UTF-8"), ("utf8.arrow", "row 1: not UTF-8"),
                       ("cut.arrow", "rows from 0 on: cannot read"), ("page.parquet", "rows from 0 on: cannot read")]:
        with pytest.raises(UserError) as caught:
            list(corpus.open_corpus(str(tmp_path / name)).documents())
        assert f"{name}: {said}" in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_truncated_zst_is_named_and_frames_are_read_through(tmp_path):
    """A .jsonl.zst cut inside a frame is an error (zstandard's stream_reader ended quietly: the documents of a
    multi-frame file cut after a frame were lost without a word, and a one-block file read as empty); every
    frame of a whole multi-frame file is read."""
    import zstandard

    lines = [json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(300)]
    frames = [zstandard.ZstdCompressor().compress(b"".join(lines[i : i + 100])) for i in range(0, 300, 100)]
    whole = tmp_path / "whole.jsonl.zst"
    whole.write_bytes(b"".join(frames))
    assert list(corpus.open_corpus(str(whole)).documents()) == [f"document {i}" for i in range(300)]
    for name, raw in [("frame.jsonl.zst", frames[0] + frames[1][:5]), ("block.jsonl.zst", frames[0][:-3])]:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(UserError, match=f"{name}: cannot decompress .*truncated"):
            list(corpus.open_corpus(str(tmp_path / name)).documents())


def test_lone_surrogate_escape_is_named_and_pairs_are_read(llama, tmp_path):
    """JSON's \\ud800 alone decodes to a str no tokenizer takes (a TypeError on the rank that tokenized it, exit 1,
    no file or line); a surrogate pair is one character."""
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"text": "smile \\ud83d\\ude00"}\n{"text": "half \\udc00"}\n')
    docs = corpus.open_corpus(str(path)).documents()
    assert next(docs) == "smile \U0001F600"
    with pytest.raises(UserError, match=r"s.jsonl: line 2: \"text\" holds a lone surrogate \(\\udc00"):
        next(docs)
    out = tmp_path / "out"
    result = run_main(["run", "--model", llama, "--ctx", str(CTX), "--out", str(out), "--data", str(path)])
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "s.jsonl: line 2" in result.stderr, \
        result.stderr
    assert not out.exists()


def test_folder_follows_linked_folders_once(tmp_path):
    """A folder's linked subfolder is part of the corpus (os.walk skipped it: its shards were left out without a
    word, though a ** glob read them); a link back up is not a loop, and no shard is read twice."""
    (tmp_path / "real").mkdir()
    write_jsonl(str(tmp_path / "real" / "x.jsonl"), ["x"])
    top = tmp_path / "top"
    top.mkdir()
    write_jsonl(str(top / "a.jsonl"), ["a"])
    os.symlink(str(tmp_path / "real"), str(top / "linked"))
    os.symlink(str(tmp_path / "real"), str(top / "again"))
    os.symlink(str(top), str(tmp_path / "real" / "up"))
    names = [s.name for s in corpus.open_corpus(str(top)).shards]
    assert names == ["a.jsonl", "again/x.jsonl"], names


def test_sum_keeps_the_corpus_attributes():
    """A merge of --part runs keeps what one run records about its corpus: documents read, and in document mode
    those skipped and the tokens dropped (they were left out of the summed summary.h5)."""
    from mpicorr import filetools

    root = {"model": "m", "data_sha256": "x", "ctx": 16, "threshold": 0.5, "chunking": "document",
            "documents": 40, "documents_skipped": 7, "tokens_dropped": 99, "nll_fixed": 0, "predictions": 0}
    attrs = filetools.merged_attributes(["a", "b"], [root, root], [(0, 4)], 64)
    assert {k: attrs[k] for k in ("documents", "documents_skipped", "tokens_dropped")} == \
        {"documents": 40, "documents_skipped": 7, "tokens_dropped": 99}


def test_ranks_and_schedules_give_the_same_bytes(llama, corpora, tmp_path):
    """2 and 3 ranks (one mpirun each, its runs in one interpreter per rank), each with both schedules and
    both chunkings between them, over mixed shards: the bytes of the 1-rank run of that chunking."""
    if MPIRUN is None:
        pytest.skip("mpirun not found")
    common = ["run", "--model", llama, "--data", corpora["mixed"], "--ctx", str(CTX), "--batch-size", "3",
              "--hostfile", "none"]
    jobs = {2: [("concat", "static"), ("document", "dynamic")], 3: [("concat", "dynamic"), ("document", "static")]}
    for ranks, runs in jobs.items():
        argvs = [common + ["--chunking", c, "--schedule", s, "--out", str(tmp_path / f"{c}-{s}-{ranks}")]
                 for c, s in runs]
        result = subprocess.run([MPIRUN, "--oversubscribe", "-n", str(ranks), sys.executable,
                                 os.path.join(os.path.dirname(__file__), "many_runs.py"), json.dumps(argvs)],
                                capture_output=True, text=True, env=cli_env(), timeout=600, cwd=str(tmp_path))
        ok(result)
    for chunking in ("concat", "document"):
        ok(run_main(common + ["--chunking", chunking, "--out", str(tmp_path / f"{chunking}-1")]))
        one = counted(str(tmp_path / f"{chunking}-1"))
        assert one
        for ranks, runs in jobs.items():
            for c, s in runs:
                if c == chunking:
                    assert counted(str(tmp_path / f"{c}-{s}-{ranks}")) == one, (c, s, ranks)


def mpmd(args: list[str], wdirs: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m mpicorr ARGS` as one MPI job of one rank per folder, each rank started in its folder (as
    ranks on nodes that see different files)."""
    if MPIRUN is None:
        pytest.skip("mpirun not found")
    cmd = [MPIRUN, "--oversubscribe"]
    for i, wdir in enumerate(wdirs):
        cmd += [":"] * (i > 0) + ["-n", "1", "--wdir", wdir, sys.executable, "-m", "mpicorr", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=timeout, cwd=wdirs[0])


def two_nodes(corpora, tmp_path) -> tuple[str, str]:
    """Folders A (which holds the mixed corpus as ./mixed) and B (which does not)."""
    a, b = tmp_path / "A", tmp_path / "B"
    b.mkdir()
    shutil.copytree(corpora["mixed"], a / "mixed")
    return str(a), str(b)


def test_a_rank_that_cannot_open_the_data_stops_every_rank(llama, corpora, tmp_path):
    """Every rank reads --data (pass 1): rank 1, started where the relative --data is missing, stops the job at
    start-up with one line naming the rank, its host, the file and the remedy; exit 2, nothing written."""
    out = tmp_path / "out"
    result = mpmd(["run", "--model", llama, "--data", "mixed", "--ctx", str(CTX), "--out", str(out), "--hostfile",
                   "none"], list(two_nodes(corpora, tmp_path)))
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("mpicorr: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (f"mpicorr: error: --data mixed: rank 1 on {os.uname().nodename} cannot open "
                        f"mixed/a.jsonl.gz (No such file or directory); put the corpus at the same path on every "
                        f"node (a shared filesystem) or add --stage-data DIR"), result.stderr
    assert not out.exists()


def test_unreadable_names_a_missing_or_resized_shard(corpora, tmp_path):
    """The start-up check (a stat per shard): a shard gone, or of another size than rank 0 listed."""
    folder = shutil.copytree(corpora["mixed"], tmp_path / "mixed")
    listed = corpus.open_corpus(str(folder))
    assert listed.unreadable() is None
    size = os.path.getsize(folder / "b.parquet")
    with open(folder / "b.parquet", "ab") as fh:
        fh.write(b"x")
    assert listed.unreadable() == f"finds {folder / 'b.parquet'} at {size + 1} bytes where rank 0 found {size}"
    os.remove(folder / "a.jsonl.gz")
    assert listed.unreadable() == f"cannot open {folder / 'a.jsonl.gz'} (No such file or directory)"


def same_summary(a: str, b: str, besides: set[str]) -> None:
    """Two summary.h5 files hold the same attributes (but `besides`) and datasets."""
    import h5py

    def walk(path: str) -> dict:
        found = {}
        with h5py.File(path, "r") as h5:
            h5.visititems(lambda name, obj: found.update({name: obj[()] if isinstance(obj, h5py.Dataset) else None}))
            for name in [None, *found]:
                obj = h5 if name is None else h5[name]
                found.update({f"{name}@{k}": v for k, v in obj.attrs.items() if name or k not in besides})
        return found

    left, right = walk(a), walk(b)
    assert sorted(left) == sorted(right)
    for key, value in left.items():
        assert np.array_equal(value, right[key]) if isinstance(value, np.ndarray) else value == right[key], key


def test_stage_data_counts_the_bytes_of_the_original(llama, corpora, tmp_path):
    """--stage-data: a run reading the staged copy writes the matrix bytes and summary.h5 (data_sha256, the
    manifest's relative names, ...) of the run reading --data itself, but for the command; the 2-rank job whose
    rank 1 has no --data (above) runs from the copy, reuses it, and gives the same bytes."""
    a, b = two_nodes(corpora, tmp_path)
    local = str(tmp_path / "local")
    common = ["run", "--model", llama, "--data", "mixed", "--ctx", str(CTX), "--batch-size", "3",
              "--hostfile", "none"]
    ok(run_main(common + ["--out", str(tmp_path / "plain")], cwd=a))
    ok(run_main(common + ["--out", str(tmp_path / "staged"), "--stage-data", local], cwd=a))
    assert counted(str(tmp_path / "plain")) == counted(str(tmp_path / "staged")) != {}
    same_summary(str(tmp_path / "plain" / "summary.h5"), str(tmp_path / "staged" / "summary.h5"),
                 {"command", "created"})
    assert sorted(os.listdir(os.path.join(local, "mixed"))) == [".mpicorr-staged.json", "a.jsonl.gz", "b.parquet",
                                                                "c.jsonl.zst"]
    stamp = os.stat(os.path.join(local, "mixed", ".mpicorr-staged.json"))
    ok(mpmd(common + ["--out", str(tmp_path / "two"), "--stage-data", local], [a, b]))
    assert counted(str(tmp_path / "two")) == counted(str(tmp_path / "plain"))
    again = os.stat(os.path.join(local, "mixed", ".mpicorr-staged.json"))
    assert (again.st_ino, again.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns), "the copy was reused"


def test_sum_refuses_runs_of_another_chunking():
    from mpicorr import filetools

    base = {"model": "m", "data_sha256": "x", "ctx": 16, "threshold": 0.5, "site": "ffn", "site_modules": ["a"],
            "chunk_start": 0, "chunks": 2, "nll_fixed": 0}
    old, concat = dict(base), dict(base, chunking="concat", chunk_start=2)
    assert filetools.check_mergeable(["old", "new"], [old, concat])  # runs from before --chunking are concat
    with pytest.raises(UserError, match="different --chunking"):
        filetools.check_mergeable(["a", "b"], [concat, dict(base, chunking="document")])


def test_prefetched_batches_come_in_order_and_errors_surface():
    calls = []

    def get(b0: int, b1: int) -> np.ndarray:
        calls.append((b0, b1))
        if b0 == 6:
            raise UserError("--data x: line 9: broken")
        return np.full((b1 - b0, 2), b0)

    batches = ((0, 2), (2, 4), (4, 6))
    got = list(data.prefetched(batches, get, ahead=True))
    assert [b for b, _ in got] == list(batches) and all((ids == b[0]).all() for b, ids in got)
    assert calls == list(batches)
    with pytest.raises(UserError, match="line 9"):
        list(data.prefetched(((4, 6), (6, 8)), get, ahead=True))
    assert [b for b, _ in data.prefetched(iter(batches), get, ahead=False)] == list(batches)


def test_sum_refuses_runs_of_another_text_field():
    from mpicorr import filetools

    base = {"model": "m", "data_sha256": "x", "ctx": 16, "threshold": 0.5, "site": "ffn", "site_modules": ["a"],
            "chunk_start": 0, "chunks": 2, "nll_fixed": 0, "chunking": "concat", "text_field": "text"}
    with pytest.raises(UserError, match="different --text-field"):
        filetools.check_mergeable(["a", "b"], [base, dict(base, text_field="content", chunk_start=2)])


def test_resume_takes_checkpoints_from_before_corpora_and_refuses_another_text_field(tmp_path, monkeypatch):
    """A checkpoint written before --chunking/--text-field existed (neither key) resumes a plain-text concat
    run; one of a corpus read through another --text-field is refused (the same shards, other documents)."""
    from mpicorr import checkpoint, plan

    ident = {key: None for key in checkpoint.IDENTITY} | {"chunking": "concat", "text_field": None}
    old = {k: v for k, v in ident.items() if k not in ("chunking", "text_field")}
    work = plan.batches(0, 4, 1)

    def live(identity):
        ck = checkpoint.Checkpoint(str(tmp_path / "g1-r0.ckpt"), identity, [(0, 2)], 0, 0, [], "<i4", [])
        monkeypatch.setattr(checkpoint, "scan", lambda out: ([ck], 2))

    live(old)
    assert checkpoint.resume(str(tmp_path), ident, work).todo == [(2, 3), (3, 4)]
    live(dict(ident, text_field="text"))
    with pytest.raises(UserError, match="different --text-field"):
        checkpoint.resume(str(tmp_path), dict(ident, text_field="content"), work)


def test_max_tokens_hashes_only_the_shards_it_read(llama, corpora, monkeypatch):
    """--max-tokens reads the first shards only: rank 0 hashes those for the identity, never the rest."""
    from mpicorr import run
    from mpicorr.config import Config

    hashed = []
    monkeypatch.setattr(data, "ROUND_DOCS", 2)
    monkeypatch.setattr(corpus, "file_sha256", lambda path: hashed.append(path) or "0" * 64)
    got = run.read_data(Config(model=llama, data=corpora["mixed"], ctx=CTX, max_tokens=2 * CTX), Comm())
    listed = got.manifest.result()
    assert len(got.layout.shard_first) == 1 and [m["name"] for m in listed] == ["a.jsonl.gz"]
    assert [os.path.basename(p) for p in hashed] == ["a.jsonl.gz"]


def test_manifest_and_staging_hash_with_the_one_hasher(tmp_path, monkeypatch):
    """corpus and stage had a hasher each (two read loops, two thread pools); mpicorr.hashing is the one both
    use (torch- and MPI-free): a file read in many pieces, an empty file, any order of files, each caller
    wording its own error for a file that cannot be read."""
    import hashlib
    from mpicorr import hashing, stage

    monkeypatch.setattr(hashing, "PIECE", 7)  # many pieces per file, a piece cut inside a line
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = {"a.txt": "", "b.txt": "x", "c.txt": tiny.sample_text()[:1000], "d.txt": "y" * 7}
    for name, text in texts.items():
        (folder / name).write_text(text)
    want = [hashlib.sha256(t.encode()).hexdigest() for t in texts.values()]
    paths = [str(folder / n) for n in texts]
    assert hashing.sha256_files(paths) == want and hashing.sha256_files(paths[::-1]) == want[::-1]
    assert hashing.sha256_files([]) == [] and hashing.sha256_file(paths[2]) == want[2]
    assert [m["sha256"] for m in corpus.open_corpus(str(folder)).manifest()] == want
    assert [f["sha256"] for f in stage.manifest(str(folder))] == want
    os.remove(paths[1])
    with pytest.raises(FileNotFoundError):
        hashing.sha256_files(paths)
    with pytest.raises(UserError, match=f"--data {paths[1]}: cannot read .No such file or directory.; give"):
        corpus.file_sha256(paths[1])
    code = ("import sys, mpicorr.hashing, mpicorr.corpus; "
            "sys.exit(sorted({'torch', 'mpi4py'} & set(sys.modules)) != [])")
    assert subprocess.run([sys.executable, "-c", code], env=cli_env()).returncode == 0


def test_stage_data_with_max_tokens_has_the_identity_of_the_run_without(llama, corpora, monkeypatch, tmp_path):
    """--max-tokens with --stage-data: the identity is that of the shards pass 1 opened, as without staging
    (before, the manifest listed every staged shard: another data_sha256, so --resume across the two refused)."""
    from mpicorr import run
    from mpicorr.config import Config

    monkeypatch.setattr(data, "ROUND_DOCS", 2)
    cfg = Config(model=llama, data=corpora["mixed"], ctx=CTX, max_tokens=2 * CTX)
    plain = run.read_data(cfg, Comm()).manifest.result()
    staged = run.read_data(Config(**{**cfg.__dict__, "stage_data": str(tmp_path)}), Comm()).manifest.result()
    assert [m["name"] for m in plain] == ["a.jsonl.gz"] and staged == plain


def test_stage_data_refuses_a_copy_inside_the_source(tmp_path):
    """--stage-data DIR where DIR/<name> lies inside the data's folder (DIR = the data folder itself, or the
    folder holding a text file), or holds it: refused, nothing written. Before, DIR = the corpus folder put the
    copy at corpus/corpus, which the next run read as part of the corpus (twice the tokens) and staged again
    inside itself, changing the user's data folder at every run."""
    from mpicorr import stage

    folder = tmp_path / "corpus"
    (folder / "deep").mkdir(parents=True)
    write_jsonl(str(folder / "a.jsonl"), ["one document"])
    write_jsonl(str(folder / "deep" / "corpus.jsonl"), ["another"])
    (tmp_path / "notes.txt").write_text("plain text")
    (tmp_path / "x" / "x").mkdir(parents=True)
    write_jsonl(str(tmp_path / "x" / "x" / "b.jsonl"), ["inside"])
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for spec, root in ((folder, folder), (tmp_path / "notes.txt", tmp_path), (folder, folder / "deep"),
                       (tmp_path / "x" / "x", tmp_path)):
        source = corpus.open_corpus(str(spec))
        with pytest.raises(UserError, match="lie one inside the other; choose a --stage-data folder outside"):
            stage.stage_corpus(source, str(root), Comm())
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    staged = stage.stage_corpus(corpus.open_corpus(str(folder)), str(tmp_path), Comm())[0]  # the source itself
    assert [s.path for s in staged.shards] == [str(folder / "a.jsonl"), str(folder / "deep" / "corpus.jsonl")]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_stage_data_and_stage_model_refuse_one_copy_over_the_other(llama, tmp_path):
    """--stage-model and --stage-data in the same DIR with a model and a corpus folder of the same name (or one
    copy inside the other): refused before anything is copied. Before, the model's copy replaced the corpus's
    after pass 1, and pass 2 could not open the shards (at every run, each copied again)."""
    from mpicorr import run
    from mpicorr.config import Config

    folder = tmp_path / os.path.basename(llama)
    folder.mkdir()
    write_jsonl(str(folder / "a.jsonl"), documents())
    for model_root, data_root in ((tmp_path / "S", tmp_path / "S"), (tmp_path / "S", tmp_path / "S" / "llama")):
        cfg = Config(model=llama, data=str(folder), ctx=CTX, stage_model=str(model_root), stage_data=str(data_root))
        with pytest.raises(UserError, match="would overlap; give the two options different folders"):
            run.read_data(cfg, Comm())
        assert not os.path.exists(model_root)


def test_stage_data_keeps_a_copy_that_holds_files_of_the_user(tmp_path):
    """A staged copy that holds files staging did not put there (a user's --out inside it, notes) is refused,
    not replaced, when the source changed: before, the whole folder was deleted with the user's files."""
    from mpicorr import stage

    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(str(folder / "a.jsonl"), ["one document"])
    root = tmp_path / "local"
    staged = stage.stage_corpus(corpus.open_corpus(str(folder)), str(root), Comm())[0]
    results = root / "corpus" / "results"
    results.mkdir()
    (results / "summary.h5").write_text("the user's outputs")
    assert stage.stage_corpus(corpus.open_corpus(str(folder)), str(root), Comm())[0] == staged  # reused
    write_jsonl(str(folder / "a.jsonl"), ["another document"])
    with pytest.raises(UserError, match="holds files --stage-data did not put there"):
        stage.stage_corpus(corpus.open_corpus(str(folder)), str(root), Comm())
    assert (results / "summary.h5").read_text() == "the user's outputs"


def test_stage_data_waits_for_another_job_staging_into_the_same_folder(tmp_path):
    """Two jobs on one node staging into the same DIR: the second waits for the first's lock on DIR (before,
    each deleted and wrote the other's <name>.staging, and one could install the other's partial copy), then
    finds the copy made and writes nothing."""
    import fcntl
    import threading
    import time
    from mpicorr import stage

    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(str(folder / "a.jsonl"), ["one document"])
    from mpicorr import outputs

    root = tmp_path / "local"
    root.mkdir()
    with outputs.locked(str(root)):  # a run whose --out is DIR: no wait
        stage.stage_corpus(corpus.open_corpus(str(folder)), str(root / "first"), Comm())
    fd = os.open(root / stage.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the other job, copying now
    done = []
    worker = threading.Thread(target=lambda: done.append(stage.stage_corpus(corpus.open_corpus(str(folder)),
                                                                            str(root), Comm())))
    worker.start()
    time.sleep(1)
    assert sorted(os.listdir(root)) == [stage.LOCK, "first"] and not done, "staged while another job held DIR"
    os.close(fd)
    worker.join(30)
    assert done and sorted(os.listdir(root / "corpus")) == [".mpicorr-staged.json", "a.jsonl"]


def test_stage_data_names_a_shard_removed_or_cut_while_staging(tmp_path, monkeypatch):
    """A shard removed after rank 0 listed it is one UserError line naming it (it was a FileNotFoundError:
    exit 1 in the middle of the broadcasts); one cut short is reported by the SHA-256 check, with rank 0
    still sending every listed byte (zeros past the end), so every rank takes part in the same broadcasts."""
    from mpicorr import stage

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(str(folder / name), ["one document", "two documents"])
    listed, sent = stage.describe, []
    bcast = Comm.bcast_array
    monkeypatch.setattr(Comm, "bcast_array", lambda self, a, size: sent.append((len(a), size)) or bcast(self, a, size))
    for change, message in ((os.remove, "cannot read .*a.jsonl \\(No such file"), (
            lambda p: os.truncate(p, 5), "a.jsonl arrived with a different SHA-256")):
        monkeypatch.setattr(stage, "describe", lambda files: [listed(files), change(files[0][0])][0])
        with pytest.raises(UserError, match=message):
            stage.stage_corpus(corpus.open_corpus(str(folder)), str(tmp_path / "local"), Comm())
        write_jsonl(str(folder / "a.jsonl"), ["one document", "two documents"])
        assert all(n == size for n, size in sent)


def test_json_array_limits_and_lone_surrogates(tmp_path, monkeypatch):
    """A JSON array is read whole, so one past ARRAY_LIMIT bytes is refused, naming jsonl as the way out; an
    item holding a lone surrogate is named like a jsonl line holding one; a .json that is jsonl stays jsonl."""
    big = tmp_path / "big.json"
    big.write_text(json.dumps([{"text": "x" * 100}] * 20))
    monkeypatch.setattr(corpus, "ARRAY_LIMIT", 1000)
    with pytest.raises(UserError, match="big.json: a JSON array of more than .* convert it to jsonl"):
        list(corpus.open_corpus(str(big)).documents())
    lone = tmp_path / "lone.json"
    lone.write_text('["fine", {"text": "bad \\ud800 here"}]')
    with pytest.raises(UserError, match="lone.json: array item 2: \"text\" holds a lone surrogate"):
        list(corpus.open_corpus(str(lone)).documents())
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert list(corpus.open_corpus(str(lines)).documents()) == ["one", "two"]


def test_out_or_dump_inside_a_data_folder_is_refused(llama, tmp_path):
    """--out or --dump inside a --data folder: one line, exit 2, nothing written. Before, the run wrote its
    run.json into the corpus folder, and the next run over that folder stopped on it ('not a JSON object'), or,
    with --resume, found another corpus."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(str(folder / "a.jsonl"), documents())
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    base = ["run", "--model", llama, "--data", str(folder), "--ctx", str(CTX), "--hostfile", "none"]
    for extra, option in ((["--out", str(folder / "out")], "--out"),
                          (["--out", str(tmp_path / "out"), "--dump", str(folder / "d"), "--dump-tokens", "4"],
                           "--dump")):
        result = run_main(base + extra)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"error: {option} " in result.stderr and "inside the --data folder" in result.stderr
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    result = run_main(base + ["--out", str(tmp_path / "out"), "--chunks", "1"])
    assert result.returncode == 0, result.stderr
