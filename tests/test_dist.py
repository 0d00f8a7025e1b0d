"""The communicator wrapper, mpi4py-style: one test class on COMM_SELF and COMM_WORLD, under -n 1 and -n 2.

    mpirun -n 2 python -m pytest tests/test_dist.py     # what test_under_mpirun runs
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from conftest import MPIRUN, mpirun_pytest
from mpicorr import dist
from mpicorr.errors import UserError


@pytest.fixture
def source_folder():
    """Makes a folder to stage: make(c, name, files) creates, on rank 0 of `c`, the folder `name` in a fresh
    temporary folder holding `files` (relative path: bytes or text; subfolders made) and returns its path;
    None on the other ranks (staging reads rank 0's files only)."""
    def make(c: dist.Comm, name: str, files: dict[str, bytes | str]) -> str | None:
        if c.rank != 0:
            return None
        base = os.path.join(tempfile.mkdtemp(), name)
        for rel, content in files.items():
            path = os.path.join(base, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb" if isinstance(content, bytes) else "w") as fh:
                fh.write(content)
        return base
    return make


def jsonl(*docs: str) -> str:
    """A jsonl shard's text: one {"text": doc} line per document."""
    return "".join(f'{{"text": "{d}"}}\n' for d in docs)


class BaseComm:
    def comm(self) -> dist.Comm:
        raise NotImplementedError

    def test_reduce_sum(self):
        c = self.comm()
        got = c.reduce_sum(np.arange(5, dtype=np.int32) * (c.rank + 1))
        if c.rank == 0:
            assert got.tolist() == (np.arange(5) * sum(range(1, c.size + 1))).tolist()
            assert got.dtype == np.int32
        else:
            assert got is None

    def test_reduce_sum_to_another_root(self):
        c = self.comm()
        root = c.size - 1
        got = c.reduce_sum(np.full(3, c.rank + 1, dtype=np.int64), root)
        assert (got.tolist() == [c.size * (c.size + 1) // 2] * 3) if c.rank == root else got is None

    def test_send_bytes_in_pieces(self, monkeypatch):
        """Bytes longer than a message go in pieces; None and empty bytes arrive as they were sent."""
        c = self.comm()
        if c.size == 1:
            return  # a rank sends to another one only
        monkeypatch.setattr(dist, "PIECE", 7)
        payloads = [bytes(range(20)), None, b""]
        if c.rank == c.size - 1:
            for i, data in enumerate(payloads):
                c.send_bytes({"i": i}, None if data is None else memoryview(data), 0)
        elif c.rank == 0:
            for i, data in enumerate(payloads):
                meta, got = c.recv_bytes(c.size - 1)
                assert meta == {"i": i}
                assert (got is None) if data is None else (got.dtype == np.uint8 and got.tobytes() == data)

    def test_allgather_and_bcast(self):
        c = self.comm()
        assert c.allgather(c.rank) == list(range(c.size))
        assert c.bcast("root" if c.rank == 0 else None) == "root"

    def test_checked_turns_one_rank_error_into_shared_error(self):
        c = self.comm()

        def fail_on_last():
            if c.rank == c.size - 1:
                raise UserError("bad input")
            return c.rank

        with pytest.raises(dist.SharedError, match="bad input"):
            c.checked(fail_on_last)
        assert c.checked(lambda: c.rank) == c.rank

    def test_checked_root_only_broadcasts(self):
        c = self.comm()
        assert c.checked(lambda: 42, root_only=True) == 42

    def test_service_answers_every_rank(self):
        c = self.comm()
        counter, told = iter(range(100)), []

        def handler(rank, message):
            if message == "next":
                return next(counter)
            told.append((rank, message))

        service = dist.Service(c, handler if c.rank == 0 else None)
        got = [service.ask("next") for _ in range(3)]
        service.tell(("hello", c.rank))
        service.close()
        assert sorted(x for g in c.allgather(got) for x in g) == list(range(3 * c.size))
        if c.rank == 0:
            assert sorted(told) == [(r, ("hello", r)) for r in range(c.size)]


    def test_stage_model_broadcasts_files(self, monkeypatch, source_folder):
        """Every rank acts as a node's leader with its own folder, so rank 1 receives over MPI."""
        from mpicorr import stage
        c = self.comm()
        monkeypatch.setattr(stage, "PIECE", 1000)  # several pieces per file
        rng = np.random.default_rng(0)
        source = source_folder(c, "model", {name: rng.bytes(size) for name, size in
                                            (("config.json", 10), ("empty", 0), ("sub/weights.bin", 4321))})
        root = tempfile.mkdtemp()
        got = stage.stage_model(source, root, c, leader=True)
        assert got == os.path.join(root, "model")
        files = c.bcast(stage.manifest(source) if c.rank == 0 else None)
        assert stage.manifest(got) == files and stage.is_staged(got, files)
        assert not os.path.exists(os.path.join(got, stage.MARK)), "a finished copy: the model's files and the stamp"
        transfer = stage._transfer
        monkeypatch.setattr(stage, "_transfer", lambda *a: pytest.fail("staged twice"))
        assert stage.stage_model(source, root, c, leader=True) == got  # already there: nothing sent
        with open(os.path.join(got, "sub/weights.bin"), "r+b") as fh:  # bytes changed, size kept
            fh.seek(100)
            fh.write(b"tampered")
        monkeypatch.setattr(stage, "_transfer", transfer)
        assert not stage.is_staged(got, files)
        assert stage.stage_model(source, root, c, leader=True) == got  # copied again
        assert stage.manifest(got) == files

    def test_stage_model_never_deletes_a_folder_it_did_not_make(self, source_folder):
        """A folder of the model's name (or of its staging folder's) that staging did not make is refused,
        not replaced (issue 17 item 1: before, shutil.rmtree deleted it)."""
        from mpicorr import stage
        c = self.comm()
        source = source_folder(c, "model", {"config.json": "{}"})
        for name in ("model", "model.staging"):
            root = tempfile.mkdtemp()
            os.makedirs(os.path.join(root, name))
            open(os.path.join(root, name, "mine.txt"), "w").write("the user's own")
            with pytest.raises(UserError, match=f"{name} exists and was not made by --stage-model"):
                stage.stage_model(source, root, c, leader=True)
            assert open(os.path.join(root, name, "mine.txt")).read() == "the user's own"

    def test_stage_names_a_file_it_cannot_hash(self, monkeypatch, source_folder):
        """A source file rank 0 cannot read while it lists it (hashing) was an OSError on rank 0 alone (exit 1,
        MPI_Abort, no option named); a staged copy that cannot be read, one on its node's writer. Now the first
        is one UserError on every rank naming the option and the file, the second a copy made again."""
        import errno
        from mpicorr import hashing, stage
        c = self.comm()
        source = source_folder(c, "model", {"config.json": "{}", "weights.bin": b"w" * 100})
        root, blocked = tempfile.mkdtemp(), []

        def sha256_file(path: str) -> str:
            if path in blocked:
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return hashing.sha256_file(path)
        monkeypatch.setattr(stage, "sha256_files", lambda paths: hashing.sha256_files(paths, sha256_file))
        blocked[:] = [f"{source}/weights.bin"]
        with pytest.raises(UserError, match=r"--stage-model: cannot read .*model/weights.bin \(Permission denied\)"):
            stage.stage_model(source, root, c, leader=True)
        blocked[:] = []
        got = stage.stage_model(source, root, c, leader=True)
        blocked[:] = [f"{got}/weights.bin"]  # this node's copy
        assert stage.stage_model(source, root, c, leader=True) == got  # copied again
        blocked[:] = []
        assert stage.manifest(got) == c.bcast(stage.manifest(source) if c.rank == 0 else None)

    def test_stage_corpus_copies_the_shards(self, monkeypatch, source_folder):
        """--stage-data: rank 0's shards (a folder's, under their relative names) reach every leader's folder;
        the staged corpus has the source's documents, manifest and data identity; a second call reuses the
        copy; a shard changed at the source (same size) is copied again."""
        from mpicorr import corpus, stage
        c = self.comm()
        monkeypatch.setattr(stage, "PIECE", 100)  # several pieces per shard
        base = source_folder(c, "shards", {"a.jsonl": jsonl("one", "two"), "sub/b.jsonl": jsonl("three " * 40)})
        # as run.read_data: rank 0's corpus on every rank
        source = c.bcast(corpus.open_corpus(base) if c.rank == 0 else None)
        listed = c.bcast(source.manifest() if c.rank == 0 else None)
        root = tempfile.mkdtemp()
        staged, got = stage.stage_corpus(source, root, c, leader=True)
        assert [s.path for s in staged.shards] == [os.path.join(root, "shards", n) for n in ("a.jsonl", "sub/b.jsonl")]
        assert got == listed and staged.manifest() == listed and staged.spec == source.spec
        assert corpus.data_sha256(staged, staged.manifest()) == corpus.data_sha256(source, listed)
        assert list(staged.documents()) == ["one", "two", "three " * 40]
        transfer = stage._transfer
        monkeypatch.setattr(stage, "_transfer", lambda *a: pytest.fail("staged twice"))
        assert stage.stage_corpus(source, root, c, leader=True)[1] == listed  # the copy is reused
        if c.rank == 0:
            with open(source.shards[0].path, "r+b") as fh:  # same size, other bytes
                fh.write(b'{"text": "ONE"}')
        monkeypatch.setattr(stage, "_transfer", transfer)
        staged, got = stage.stage_corpus(source, root, c, leader=True)
        assert got != listed and staged.manifest() == got
        assert list(staged.documents()) == ["ONE", "two", "three " * 40]

    def test_stage_corpus_names_a_text_file_and_a_glob(self, source_folder):
        """A text file is staged as DIR/<file name>/<file name>; a glob's shards under its folder's name,
        with their paths relative to that folder."""
        from mpicorr import corpus, stage
        c = self.comm()
        base = source_folder(c, "web", {"2024/x.jsonl": jsonl("a"), "notes.txt": "plain text"})
        specs = [corpus.open_corpus(os.path.join(base, "notes.txt")), corpus.open_corpus(base + "/*/*.jsonl")] \
            if c.rank == 0 else None
        plain, globbed = c.bcast(specs)
        root = tempfile.mkdtemp()
        staged = stage.stage_corpus(plain, root, c, leader=True)[0]
        assert staged.plain and [s.path for s in staged.shards] == [os.path.join(root, "notes.txt", "notes.txt")]
        assert list(staged.documents()) == ["plain text"]
        staged = stage.stage_corpus(globbed, root, c, leader=True)[0]
        assert [s.path for s in staged.shards] == [os.path.join(root, "web", "2024", "x.jsonl")]
        assert list(staged.documents()) == ["a"]


@pytest.mark.skipif(dist.MPI is None, reason="mpi4py missing")
def test_comm_frees_its_node_communicator():
    """Comm() asks for the node-local rank with Split_type and frees that communicator (before, one leaked
    per Comm: per split and staging step)."""
    freed = []

    class Node:
        def Get_rank(self):
            return 3

        def Free(self):
            freed.append(True)

    class Fake:
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

        def Split_type(self, kind):
            return Node()

    assert dist.Comm(Fake()).local_rank == 3 and freed == [True]


class TestSelf(BaseComm):
    def comm(self):
        return dist.serial()


class TestWorld(BaseComm):
    def comm(self):
        return dist.world()


class TestNoMPI(BaseComm):
    def comm(self):
        return dist.Comm(None)


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")
@pytest.mark.skipif("OMPI_COMM_WORLD_SIZE" in os.environ, reason="already under mpirun")
def test_under_mpirun():
    stdout = mpirun_pytest(__file__, 2)
    assert stdout.count("37 passed") == 2, stdout
