"""Checkpoint and resume: a rank SIGKILLed under the real mpirun, then --resume with the same or another
number of ranks, gives the bytes of an uninterrupted run; a crash while writing leaves no partial file."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import h5py
import numpy as np
import pytest

from mpicorr import checkpoint, filetools, summary, tiny
from conftest import MPIRUN, cli_env, run_cli, run_main
from test_errors import one_error_line
from test_pipeline import ok, outputs, same_summaries

CTX = 64


@pytest.fixture(scope="module")
def long_text(tmp_path_factory) -> str:
    """About 200 chunks of 64 tokens: a kill after a rank's first checkpoint (5 chunks) lands mid-run."""
    path = tmp_path_factory.mktemp("data") / "long.txt"
    path.write_text(open(tiny.sample_path(), encoding="utf-8").read() * 4, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def reference(llama, long_text, tmp_path_factory) -> str:
    """The uninterrupted run."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    ok(run_cli(["run", "--model", llama, "--data", long_text, "--out", out, "--ctx", str(CTX)], ranks=2))
    return out


def args(llama: str, data: str, out: str, *extra: str) -> list[str]:
    return ["run", "--model", llama, "--data", data, "--out", out, "--ctx", str(CTX), *extra]


def same_as_reference(out: str, ref: str) -> None:
    assert outputs(out) == outputs(ref)
    same_summaries(out, ref)
    assert not os.path.exists(checkpoint.folder(out)), "checkpoints are removed once the outputs are written"


def rank_pid(tag: str, rank: int) -> int | None:
    """PID of the rank launched with MPICORR_TEST_TAG=tag (Linux /proc)."""
    for env_path in glob.glob("/proc/[0-9]*/environ"):
        try:
            env = open(env_path, "rb").read().split(b"\0")
        except OSError:
            continue
        if f"MPICORR_TEST_TAG={tag}".encode() in env and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(env_path.split("/")[2])
    return None


def kill_rank_after_checkpoint(cmd_args: list[str], ranks: int, out: str, victim: int, wait_for: str,
                               sig: int = signal.SIGKILL) -> str:
    """Start mpirun, send `sig` to rank `victim` once checkpoint file `wait_for` exists; return mpirun's stderr."""
    if MPIRUN is None or not os.path.isdir("/proc"):
        pytest.skip("needs mpirun and /proc")
    tag = uuid.uuid4().hex
    env = {**cli_env(), "MPICORR_TEST_TAG": tag}
    proc = subprocess.Popen([MPIRUN, "--oversubscribe", "-n", str(ranks), sys.executable, "-m", "mpicorr",
                             *cmd_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(out))  # no ./hostfile there
    target = os.path.join(checkpoint.folder(out), wait_for)
    deadline = time.monotonic() + 120
    while not os.path.exists(target) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = rank_pid(tag, victim)
    assert proc.poll() is None, "the run ended before the kill: " + proc.communicate()[1]
    assert pid is not None, "rank process not found"
    os.kill(pid, sig)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0, "mpirun must fail when a rank is killed"
    assert time.monotonic() - killed < 30, "mpirun must not wait for the dead rank"
    assert not os.path.exists(os.path.join(out, "summary.h5"))
    return stderr


def test_sigkill_then_resume_with_same_and_other_rank_counts(llama, long_text, reference, tmp_path):
    out = str(tmp_path / "out")
    run = args(llama, long_text, out, "--checkpoint-every", "5")
    kill_rank_after_checkpoint(run, 2, out, victim=1, wait_for="g1-r1.ckpt")
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)

    resumed = ok(run_cli(args(llama, long_text, out, "--resume"), ranks=2))
    assert "resuming from" in resumed.stdout
    same_as_reference(out, reference)

    # Second life of the copy: 3 ranks, one terminated (SIGTERM) once the new attempt has saved; then 1 rank.
    kill_rank_after_checkpoint(args(llama, long_text, copy, "--resume", "--checkpoint-every", "5"), 3, copy,
                               victim=2, wait_for="g2-r2.ckpt", sig=signal.SIGTERM)
    ok(run_cli(args(llama, long_text, copy, "--resume")))
    same_as_reference(copy, reference)


CRASH_WHILE_WRITING = """
import os, signal, sys
from contextlib import contextmanager
import mpicorr.__main__ as m, mpicorr.matrixfile as mf
orig = mf.atomic_write
@contextmanager
def dying(path):
    with orig(path) as fh:
        if path.endswith("correlations_block_1.zstd"):
            fh.write(b"partial")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        yield fh
mf.atomic_write = dying
sys.exit(m.main(sys.argv[1:]))
"""


def test_kill_while_writing_leaves_no_partial_file_and_resumes(llama, tmp_path):
    data = tiny.sample_path()
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    ok(run_cli(args(llama, data, ref, "--chunks", "12")))
    crashed = subprocess.run([sys.executable, "-c", CRASH_WHILE_WRITING, *args(llama, data, out, "--chunks", "12",
                              "--checkpoint-every", "100")], env=cli_env(), capture_output=True, text=True,
                             cwd=str(tmp_path))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    # Rank 0 writes layers on several threads, so block 0 may or may not be complete when block 1's write dies;
    # block 1 and summary.h5 (written last) must not be there, and whatever file is there must be whole.
    finals = set(f for f in os.listdir(out) if not f.startswith("."))
    assert "checkpoints" in finals and finals <= {"checkpoints", "run.json", "correlations_block_0.zstd"}, finals
    if "correlations_block_0.zstd" in finals:
        filetools.verify(os.path.join(out, "correlations_block_0.zstd"))
    one_error_line(run_main(args(llama, data, out, "--chunks", "12")), "--resume", "--force")
    resumed = ok(run_cli(args(llama, data, out, "--chunks", "12", "--resume")))
    assert "12 chunks finished, 0 to count" in resumed.stdout
    same_as_reference(out, ref)


def test_several_thresholds_resume_after_a_crash(llama, tmp_path):
    """Checkpoints hold every threshold's counts: killed while writing, resumed, each folder is a plain run's."""
    data = tiny.sample_path()
    out = str(tmp_path / "out")
    multi = ("--chunks", "8", "--threshold", "0.5,1", "--checkpoint-every", "3")
    crashed = subprocess.run([sys.executable, "-c", CRASH_WHILE_WRITING, *args(llama, data, out, *multi)],
                             env=cli_env(), capture_output=True, text=True, cwd=str(tmp_path))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    ok(run_cli(args(llama, data, out, *multi, "--resume"), ranks=2))
    for t in ("0.5", "1.0"):
        single = str(tmp_path / t)
        ok(run_main(args(llama, data, single, "--chunks", "8", "--threshold", t)))
        same_as_reference(os.path.join(out, f"threshold-{t}"), single)
    assert not os.path.exists(checkpoint.folder(out))


def test_resume_refuses_other_options_and_finished_runs(llama, tmp_path):
    data = tiny.sample_path()
    out = str(tmp_path / "out")
    crashed = subprocess.run([sys.executable, "-c", CRASH_WHILE_WRITING, *args(llama, data, out, "--chunks", "6",
                              "--checkpoint-every", "2")], env=cli_env(), capture_output=True, text=True,
                             cwd=str(tmp_path))
    assert crashed.returncode == -signal.SIGKILL
    one_error_line(run_main(args(llama, data, out, "--chunks", "6", "--resume", "--threshold", "0.25")),
                   "--resume", "different --threshold", "[0.5] there, [0.25] now")
    one_error_line(run_main(args(llama, data, out, "--chunks", "7", "--resume")), "different chunk range",
                   "([0, 6) there, [0, 7) now; --chunk-start, --chunks and --part set it)")
    # --part sets the range too: the message names the range, not only --chunks the user never gave
    one_error_line(run_main(args(llama, data, out, "--chunks", "6", "--part", "1/2", "--resume")),
                   "different chunk range", "([0, 6) there, [3, 6) now", "--part")
    one_error_line(run_main(args(llama, data, out, "--chunks", "6", "--resume", "--chunking", "document")),
                   "different --chunking")
    one_error_line(run_main(args(llama, data, out, "--chunks", "6", "--resume", "--force")), "only one")
    ok(run_main(args(llama, data, out, "--chunks", "6", "--resume")))
    one_error_line(run_main(args(llama, data, out, "--chunks", "6", "--resume")), "nothing to resume")


def test_a_resume_with_other_dump_options_shows_what_differs(tmp_path):
    """--dump's identity is a dict: behind a long folder name the message's 60-character cut hid the one field
    that differed (`{"dir": "/scratch/...` there and now); it shows only the fields that differ."""
    from mpicorr.errors import UserError
    dump = {"dir": "/scratch/" + "a-long-folder-name/" * 4 + "dump", "tokens": None, "rate": 0.5, "values": False}
    ident = {**{key: 1 for key in checkpoint.IDENTITY}, "dump": dump}
    os.makedirs(checkpoint.folder(str(tmp_path)))
    ck = checkpoint.Checkpoint(os.path.join(checkpoint.folder(str(tmp_path)), "g1-r0.ckpt"), ident, [(0, 1)], 0, 0,
                               [], "<i4", [])
    checkpoint.write(ck.path, ck, [])
    with pytest.raises(UserError) as err:
        checkpoint.resume(str(tmp_path), {**ident, "dump": {**dump, "values": True}}, [(0, 1), (1, 2)])
    assert 'different --dump ({"values": false} there, {"values": true} now)' in str(err.value)


def test_resume_without_checkpoints_says_it_starts(llama, tmp_path):
    """--resume on an empty --out (the SLURM scripts always pass it) starts, and says so rather than
    'resuming from 0 checkpoint(s) ...: 0 chunks finished'."""
    out = str(tmp_path / "out")
    result = ok(run_main(args(llama, tiny.sample_path(), out, "--chunks", "2", "--resume")))
    assert f"mpicorr: --resume: no checkpoint in {checkpoint.folder(out)}; starting from the first chunk" \
        in result.stdout
    assert "resuming from" not in result.stdout


def test_damaged_checkpoint_is_named(llama, tmp_path):
    data = tiny.sample_path()
    out = str(tmp_path / "out")
    subprocess.run([sys.executable, "-c", CRASH_WHILE_WRITING, *args(llama, data, out, "--chunks", "4",
                    "--checkpoint-every", "1")], env=cli_env(), capture_output=True, cwd=str(tmp_path))
    path = os.path.join(checkpoint.folder(out), "g1-r0.ckpt")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:-9])
    one_error_line(run_main(args(llama, data, out, "--chunks", "4", "--resume")), path, "damaged checkpoint")


def test_sigterm_saves_a_checkpoint_then_resume_gives_the_same_bytes(llama, tmp_path, monkeypatch):
    """SIGTERM while counting (SLURM's notice before the kill): the rank finishes its batch, saves a
    checkpoint and exits 143; --resume then gives the bytes of an uninterrupted run. In-process, the signal
    sent after the 5th batch (before, SIGTERM ended the run at once, saving nothing)."""
    from mpicorr import run as running
    data = tiny.sample_path()
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    ok(run_main(args(llama, data, ref, "--chunks", "12")))
    batches, after_batch = [], running.Saver.after_batch

    def after(self, tally, chunks):
        after_batch(self, tally, chunks)
        batches.append(chunks)
        if len(batches) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(running.Saver, "after_batch", after)

    def unhandled(*_):
        raise RuntimeError("SIGTERM reached the test's handler")
    previous = signal.signal(signal.SIGTERM, unhandled)  # without mpicorr's handler: fail, not kill pytest
    try:
        result = run_main(args(llama, data, out, "--chunks", "12"))
        assert signal.getsignal(signal.SIGTERM) is unhandled, "the handler is restored after counting"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.returncode == 143, result.stderr
    assert "terminated (SIGTERM): saved a checkpoint of 5 chunks" in result.stderr, result.stderr
    assert not os.path.exists(os.path.join(out, "summary.h5"))
    monkeypatch.undo()
    resumed = ok(run_main(args(llama, data, out, "--chunks", "12", "--resume")))
    assert "5 chunks finished, 7 to count" in resumed.stdout
    same_as_reference(out, ref)


def test_only_files_mpicorr_wrote_are_deleted(llama, tmp_path):
    """--resume, --force and a finished run delete only files by mpicorr's names, never a folder the user may
    own: a user's file in OUT/checkpoints used to vanish with the whole folder (issue 17 item 1). Stale
    temporaries of a killed rank go; the folder goes only once it is empty."""
    data, out = tiny.sample_path(), tmp_path / "o"
    mine = [out / "checkpoints" / "model_step1000.pt", out / "notes.txt", out / ".notes.txt.tmp1"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's own")
    ok(run_main(args(llama, data, str(out), "--chunks", "4", "--resume")))  # the case
    assert all(path.read_text() == "the user's own" for path in mine)
    ok(run_main(args(llama, data, str(out), "--chunks", "4", "--force")))
    (out / "checkpoints" / ".g1-r0.ckpt.tmp99").write_bytes(b"left by a killed rank")
    (out / ".summary.h5.tmp98").write_bytes(b"left by a killed rank")
    crashed = subprocess.run([sys.executable, "-c", CRASH_WHILE_WRITING, *args(llama, data, str(out), "--chunks",
                              "4", "--checkpoint-every", "2", "--force")], env=cli_env(), capture_output=True,
                             text=True, cwd=str(tmp_path))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    ok(run_main(args(llama, data, str(out), "--chunks", "4", "--resume")))
    assert all(path.read_text() == "the user's own" for path in mine)
    assert sorted(os.listdir(out / "checkpoints")) == ["model_step1000.pt"]
    assert not [n for n in os.listdir(out) if n.startswith(".") and n != ".notes.txt.tmp1"]
    os.remove(mine[0])
    ok(run_main(args(llama, data, str(out), "--chunks", "4", "--force")))
    assert not os.path.exists(out / "checkpoints"), "an emptied checkpoints folder is removed"
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "model_step1000.pt").write_text("the user's own")
    ok(run_main(args(llama, data, str(other), "--chunks", "4")))  # a foreign file is no unfinished run


def test_force_replaces_every_output_of_the_previous_run(tmp_path):
    """--force with another model: the earlier run's other layers and threshold folders go (they made `verify`
    and the analysis see 4 layers of a 2-layer run), the user's files stay; a run that refuses to start
    deletes nothing (issue 17 item 3)."""
    data, out = tiny.sample_path(), str(tmp_path / "x")
    four, two = (tiny.build("llama", str(tmp_path / name), layers=n) for name, n in (("four", 4), ("two", 2)))
    ok(run_main(args(four, data, out, "--chunks", "4", "--threshold", "0.25,0.5")))
    for folder in ("", "threshold-0.5"):
        open(os.path.join(out, folder, "mine.txt"), "w").write("the user's own")
    before = {p: open(p, "rb").read() for p in glob.glob(f"{out}/**", recursive=True) if os.path.isfile(p)}
    one_error_line(run_main(args(two, data, out, "--chunks", "4", "--force", "--chunk-start", "999")), "--chunk")
    broken = shutil.copytree(two, str(tmp_path / "broken"))
    weights = os.path.join(broken, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    assert run_main(args(broken, data, out, "--chunks", "4", "--force")).returncode != 0  # fails to load
    assert {p: open(p, "rb").read() for p in before} == before, "a run that did not start deleted files"
    ok(run_main(args(two, data, out, "--chunks", "4", "--force")))
    assert sorted(os.listdir(out)) == ["correlations_block_0.zstd", "correlations_block_1.zstd", "mine.txt",
                                       "run.json", "summary.h5", "threshold-0.5"]
    assert os.listdir(os.path.join(out, "threshold-0.5")) == ["mine.txt"]
    assert filetools.verify_run(out).startswith(f"{out}: ok, 2 layers")
    root, layers = summary.read_summary(os.path.join(out, "summary.h5"))
    assert sorted(layers) == [0, 1] and root["threshold"] == 0.5


def test_outputs_names_checkpoints_as_checkpoint_does():
    """outputs.py spells checkpoint.py's names itself (checkpoint needs torch; the file tools must not)."""
    from mpicorr import outputs as run_files
    assert (run_files.CHECKPOINTS, run_files.CHECKPOINT) == (checkpoint.FOLDER, checkpoint.NAME.pattern)


def test_linked_checkpoints_and_threshold_folders_are_kept(llama, tmp_path):
    """OUT/checkpoints and OUT/threshold-<T> may be the user's links to folders elsewhere (another disk): their
    checkpoints and outputs go, the links stay. Before, rmdir of an emptied link failed: the finished run
    exited 1 (NotADirectoryError), and a run of several thresholds failed before writing, its counting lost."""
    data, out, elsewhere = tiny.sample_path(), tmp_path / "o", tmp_path / "elsewhere"
    for name in ("checkpoints", "threshold-0.5"):
        (elsewhere / name).mkdir(parents=True)
        out.mkdir(exist_ok=True)
        os.symlink(elsewhere / name, out / name)
    ok(run_main(args(llama, data, str(out), "--chunks", "4", "--checkpoint-every", "2")))
    assert os.listdir(elsewhere / "checkpoints") == [] and os.path.islink(out / "checkpoints")
    ok(run_main(args(llama, data, str(out), "--chunks", "4", "--threshold", "0.25,0.5", "--force")))
    assert sorted(os.listdir(elsewhere / "threshold-0.5")) == ["correlations_block_0.zstd",
                                                                "correlations_block_1.zstd", "summary.h5"]
    ok(run_main(args(llama, data, str(out), "--chunks", "4", "--force")))  # the old threshold folders emptied
    assert os.path.islink(out / "threshold-0.5") and os.listdir(elsewhere / "threshold-0.5") == []
    assert filetools.verify_run(str(out)).startswith(f"{out}: ok, 2 layers")


def test_a_second_run_into_the_same_out_is_refused(llama, tmp_path):
    """Two runs into one --out at once wrote the same checkpoint names (each replacing the other's, the first
    to finish deleting the other's) and outputs that mixed the two runs. Rank 0 locks --out for the whole run:
    a second run is refused in one line, and the lock goes with the process."""
    data, out = tiny.sample_path(), str(tmp_path / "o")
    slow = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_rank.py")
    first = subprocess.Popen([sys.executable, slow, "0", "0.2", *args(llama, data, out, "--chunks", "20",
                              "--checkpoint-every", "1")], env=cli_env(), cwd=str(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint_files(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    second = run_main(args(llama, data, out, "--chunks", "20", "--resume"))
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    one_error_line(second, f"--out {out}: another mpicorr run or sum is using this folder")
    assert filetools.verify_run(out).startswith(f"{out}: ok, 2 layers, 20 chunks")
    ok(run_main(args(llama, data, out, "--chunks", "4", "--force")))  # the lock went with the first run


def test_a_folder_in_use_is_refused_before_the_corpus_is_read(llama, tmp_path):
    """A run into an --out (or --dump) another run holds was refused only after its pass 1 had read the whole
    corpus (minutes for a large one). It is refused first: here the corpus's bad line is never reached."""
    from mpicorr.outputs import locked
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    out, dump = tmp_path / "o", tmp_path / "d"
    os.makedirs(out)
    os.makedirs(dump)
    with locked(str(out)):
        one_error_line(run_main(args(llama, str(bad), str(out), "--chunks", "2")),
                       f"--out {out}: another mpicorr run or sum is using this folder")
    with locked(str(dump), "--dump"):
        one_error_line(run_main(args(llama, str(bad), str(out), "--chunks", "2", "--dump", str(dump), "--dump-rate",
                                     "0.5")),
                       f"--dump {dump}: another mpicorr run or sum is using this folder")
    one_error_line(run_main(args(llama, str(bad), str(out), "--chunks", "2")), "line 2")  # unlocked: the data


def test_outputs_finished_between_the_check_and_the_lock_are_seen(llama, tmp_path, monkeypatch, capsys):
    """A run checked --out, then locked it: a run or sum that finished in between left outputs the first check
    did not see, and this run would have replaced them without --force. --out is checked again under the lock."""
    from mpicorr import __main__ as cli, outputs as output_files
    data, out, done = tiny.sample_path(), str(tmp_path / "o"), str(tmp_path / "done")
    ok(run_main(args(llama, data, done, "--chunks", "2")))
    real = output_files.locked

    def another_run_finishes_first(folder, *rest, **kw):
        shutil.copytree(done, folder, dirs_exist_ok=True)  # what the other run left as the lock came free
        return real(folder, *rest, **kw)

    monkeypatch.setattr(output_files, "locked", another_run_finishes_first)
    assert cli.main(args(llama, data, out, "--chunks", "2")) == 2
    assert f"--out {out}: already holds outputs of a run" in capsys.readouterr().err
    assert filetools.verify_run(out).startswith(f"{out}: ok, 2 layers, 2 chunks")


@pytest.mark.parametrize("option", ["--out", "--dump"])
def test_a_run_the_lock_refuses_leaves_the_folder_of_the_run_that_holds_it(llama, tmp_path, monkeypatch, capsys,
                                                                           option):
    """Two runs started at once into the same new --out (or --dump): this one made the folder, the other
    locked it first. The refused run removed it (it had made it) under the other run, which then counted
    into a folder that was gone. A run removes only folders it made and holds."""
    from mpicorr import __main__ as cli, outputs as output_files
    folders, real, rival = {"--out": tmp_path / "new" / "o", "--dump": tmp_path / "d"}, output_files.locked, []

    def the_other_run_locks_first(folder, which="--out", *rest, **kw):
        if which == option:  # the other run, between this run's makedirs and its lock
            rival.append(os.open(folder, os.O_RDONLY))
            fcntl.flock(rival[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real(folder, which, *rest, **kw)

    monkeypatch.setattr(output_files, "locked", the_other_run_locks_first)
    try:
        assert cli.main(args(llama, tiny.sample_path(), str(folders["--out"]), "--chunks", "2",
                             "--dump", str(folders["--dump"]), "--dump-rate", "0.5")) == 2
        assert f"{option} {folders[option]}: another mpicorr run or sum is using" in capsys.readouterr().err
        assert os.path.samestat(os.fstat(rival[0]), os.stat(folders[option])), "the other run's folder is gone"
    finally:
        for fd in rival:
            os.close(fd)


def test_a_failed_run_removes_its_folders_while_it_still_holds_them(llama, tmp_path, monkeypatch, capsys):
    """A run that failed after locking the --out (and --dump) it made released the lock, then removed the
    folder: another run started at that moment could lock the folder in between and lose it. The folders
    go while still locked."""
    from mpicorr import __main__ as cli
    root = tmp_path / "node-local"
    (root / os.path.basename(llama)).mkdir(parents=True)  # --stage-model finds the user's folder: refused
    out, dump, seen, real = tmp_path / "o", tmp_path / "d", {}, os.rmdir

    def still_locked(path, *rest, **kw):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen[str(path)] = "free"
        except BlockingIOError:
            seen[str(path)] = "locked"
        finally:
            os.close(fd)
        return real(path, *rest, **kw)

    monkeypatch.setattr(os, "rmdir", still_locked)
    assert cli.main(args(llama, tiny.sample_path(), str(out), "--chunks", "2", "--stage-model", str(root),
                         "--dump", str(dump), "--dump-rate", "0.5")) == 2
    assert "was not made by --stage-model" in capsys.readouterr().err
    assert seen == {str(out): "locked", str(dump): "locked"} and not out.exists() and not dump.exists()


def the_other_run_removes(folder: str):
    """os.open that, for `folder`, lets the run that held it remove it right after this run opened it (that
    run failed, and released its lock after this run's open)."""
    real = os.open

    def opened(path, *rest, **kw):
        fd = real(path, *rest, **kw)
        if str(path) == folder:
            os.rmdir(folder)
        return fd
    return opened


def test_a_folder_removed_before_its_lock_was_taken_is_refused(tmp_path, monkeypatch):
    """A run that opened --out as the run holding it failed and removed it got the lock on a folder that no
    longer exists, and wrote into a new one of that name, unlocked. It is refused in one line."""
    from mpicorr import outputs as output_files
    from mpicorr.errors import UserError
    out = tmp_path / "o"
    out.mkdir()
    monkeypatch.setattr(os, "open", the_other_run_removes(str(out)))
    with pytest.raises(UserError, match=f"--out {out}: another mpicorr run or sum was using this folder"):
        with output_files.locked(str(out)):
            pass
    monkeypatch.undo()
    with pytest.raises(UserError, match=f"--dump {out}: another mpicorr run or sum was using this folder"):
        with output_files.locked(str(out), "--dump"):  # gone before the open: not an OSError either
            pass


def checkpoint_files(out: str) -> list[str]:
    folder = checkpoint.folder(out)
    return [n for n in os.listdir(folder) if n.endswith(".ckpt")] if os.path.isdir(folder) else []


def test_a_run_json_of_the_users_is_never_replaced(llama, tmp_path):
    """run.json is a common name: one in --out that mpicorr did not write (no mpicorr format) was silently
    replaced by a run without --force (and deleted by --force). It is refused in one line, with or without
    --force; mpicorr's own run.json is replaced as before. So is a summary.h5 of the user's, which --force
    deleted."""
    data, out = tiny.sample_path(), tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text('{"learning_rate": 0.001}')
    for extra in ([], ["--force"], ["--resume"]):
        one_error_line(run_main(args(llama, data, str(out), "--chunks", "2", *extra)),
                       f"{out / 'run.json'}: not written by mpicorr")
        assert (out / "run.json").read_text() == '{"learning_rate": 0.001}' and os.listdir(out) == ["run.json"]
    os.remove(out / "run.json")
    ok(run_main(args(llama, data, str(out), "--chunks", "2")))
    ok(run_main(args(llama, data, str(out), "--chunks", "2", "--force")))
    mine = out / "threshold-0.5" / "summary.h5"  # the user's HDF5 file, in a folder of the name a run uses
    mine.parent.mkdir()
    with h5py.File(mine, "w") as h5:
        h5["weights"] = np.arange(3)
    one_error_line(run_main(args(llama, data, str(out), "--chunks", "2", "--force")), f"{mine}: not written by")
    with h5py.File(mine, "r") as h5:
        assert list(h5["weights"][:]) == [0, 1, 2]
