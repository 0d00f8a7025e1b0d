"""info / verify / sum on matrix files."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import cli_env, run_cli, run_main
from mpicorr import filetools, matrixfile, summary
from test_full_disk import small_disk  # noqa: F401 - a fixture
from test_pipeline import outputs
from mpicorr.errors import UserError


def symmetric_counts(rng, width, trials):
    fired = rng.random((trials, width)) < 0.3
    full = fired.T.astype(np.int64) @ fired
    return full[np.tril_indices(width)]


def test_sum_adds_counts_and_trials(tmp_path):
    rng = np.random.default_rng(3)
    a, b = symmetric_counts(rng, 9, 40), symmetric_counts(rng, 9, 25)
    matrixfile.write_matrix(str(tmp_path / "a.zstd"), 4, 9, 40, a)
    matrixfile.write_matrix(str(tmp_path / "b.zstd"), 4, 9, 25, b)
    filetools.sum_files(str(tmp_path / "s.zstd"), [str(tmp_path / "a.zstd"), str(tmp_path / "b.zstd")])
    header, total = matrixfile.read_matrix(str(tmp_path / "s.zstd"))
    assert (header.block, header.width, header.trials) == (4, 9, 65)
    assert np.array_equal(total, a + b)
    filetools.verify(str(tmp_path / "s.zstd"))
    with pytest.raises(UserError, match="exists"):
        filetools.sum_files(str(tmp_path / "s.zstd"), [str(tmp_path / "a.zstd")])


def test_sum_refuses_a_run_folder_beside_a_dump_folder(tmp_path):
    """A run folder and a --dump folder given to one sum: one line naming both (it said the run folder had
    'no index.json', as if it were meant to be a dump), exit 2, nothing written."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "correlations_block_0.zstd").write_bytes(b"")
    (tmp_path / "dump").mkdir()
    (tmp_path / "dump" / "index.json").write_text("{}")
    for inputs in (["run", "dump"], ["dump", "run"]):
        result = run_main(["sum", str(tmp_path / "all"), *(str(tmp_path / i) for i in inputs)])
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"sum: {tmp_path / 'dump'} is a --dump folder and {tmp_path / 'run'} is not; merge run folders and " \
               "dump folders apart" in result.stderr
    assert not os.path.exists(tmp_path / "all")


def test_sum_refuses_mixed_blocks(tmp_path):
    matrixfile.write_matrix(str(tmp_path / "a.zstd"), 0, 2, 1, np.zeros(3))
    matrixfile.write_matrix(str(tmp_path / "b.zstd"), 1, 2, 1, np.zeros(3))
    with pytest.raises(UserError, match="does not match"):
        filetools.sum_files(str(tmp_path / "s.zstd"), [str(tmp_path / "a.zstd"), str(tmp_path / "b.zstd")])
    assert not (tmp_path / "s.zstd").exists()


@pytest.mark.parametrize("packed,trials,message", [
    ([2, 3, 4], 5, r"C\[0, 1\] = 3 exceeds"),   # pair count above neuron 0's firing count
    ([6, 0, 1], 5, "fired 6 times in 5 trials"),
])
def test_verify_catches_impossible_counts(tmp_path, packed, trials, message):
    path = str(tmp_path / "bad.zstd")
    matrixfile.write_matrix(path, 0, 2, trials, np.array(packed))
    with pytest.raises(UserError, match=message):
        filetools.verify(path)


def test_sum_of_matrix_files_into_missing_folders(tmp_path):
    """`sum x/y/s.zstd A B` where x does not exist ended in an internal FileNotFoundError naming a temporary; the
    folders are made now, as for a sum of run folders, and removed again when the sum fails."""
    matrixfile.write_matrix(str(tmp_path / "a.zstd"), 0, 2, 1, np.ones(3))
    matrixfile.write_matrix(str(tmp_path / "b.zstd"), 1, 2, 1, np.ones(3))
    out = str(tmp_path / "x" / "y" / "s.zstd")
    with pytest.raises(UserError, match="does not match"):
        filetools.sum_files(out, [str(tmp_path / "a.zstd"), str(tmp_path / "b.zstd")])
    assert sorted(os.listdir(tmp_path)) == ["a.zstd", "b.zstd"]
    filetools.sum_files(out, [str(tmp_path / "a.zstd")])
    assert os.listdir(tmp_path / "x" / "y") == ["s.zstd"] and matrixfile.read_matrix(out)[0].trials == 1


def test_cli_info_and_verify(tmp_path):
    good = str(tmp_path / "correlations_block_3.zstd")
    matrixfile.write_matrix(good, 3, 2, 7, np.array([1, 1, 2]))
    result = run_cli(["info", good])
    assert result.returncode == 0 and "block 3, width 2, trials 7, uint32 counts" in result.stdout
    (tmp_path / "junk.zstd").write_bytes(b"\x7d\xca\x7d\xca" + b"\0" * 30)
    result = run_cli(["verify", good, str(tmp_path / "junk.zstd")])
    assert result.returncode == 2 and f"{good}: ok" in result.stdout
    assert result.stderr.count("mpicorr: error:") == 1 and "junk.zstd" in result.stderr


def run_folder(llama, sample_path, out, start, count, *extra):
    result = run_main(["run", "--model", llama, "--data", sample_path, "--out", str(out), "--ctx", "64",
                       "--chunk-start", str(start), "--chunks", str(count), *extra])
    assert result.returncode == 0, result.stderr
    return str(out)


def test_sum_of_run_folders_equals_one_run(llama, sample_path, tmp_path):
    whole = run_folder(llama, sample_path, tmp_path / "whole", 0, 12)
    parts = [run_folder(llama, sample_path, tmp_path / "b", 5, 7), run_folder(llama, sample_path, tmp_path / "a", 0, 5)]
    result = run_main(["sum", str(tmp_path / "merged"), *parts])
    assert result.returncode == 0, result.stderr
    assert "2 runs merged, chunks [0, 12), 768 tokens" in result.stdout and "gap" not in result.stdout
    merged = str(tmp_path / "merged")
    assert outputs(merged) == outputs(whole)
    root, layers = summary.read_summary(f"{merged}/summary.h5")
    root_whole, layers_whole = summary.read_summary(f"{whole}/summary.h5")
    for key in ("tokens", "chunks", "chunk_start", "nll_fixed", "predictions", "perplexity", "model"):
        assert root[key] == root_whole[key], key
    for layer, entry in layers_whole.items():
        for name, value in entry.items():
            if name != "attrs":
                assert np.array_equal(layers[layer][name], value), (layer, name)
        assert layers[layer]["attrs"] == entry["attrs"]
    assert run_main(["verify", merged, whole]).returncode == 0


def test_parts_summed_equal_one_run(llama, sample_path, tmp_path):
    """--part K/N cuts at batch boundaries, so each share is forwarded exactly as in the whole run."""
    whole = run_folder(llama, sample_path, tmp_path / "whole", 1, 11, "--batch-size", "2")
    parts = [run_folder(llama, sample_path, tmp_path / f"p{k}", 1, 11, "--batch-size", "2", "--part", f"{k}/3")
             for k in range(3)]
    ranges = [summary.read_summary(f"{p}/summary.h5")[0]["chunk_ranges"].tolist() for p in parts]
    assert ranges == [[[1, 5]], [[5, 9]], [[9, 12]]]
    assert run_main(["sum", str(tmp_path / "merged"), *parts]).returncode == 0
    assert outputs(str(tmp_path / "merged")) == outputs(whole)


def test_sum_of_run_folders_refuses_overlap_and_reports_gaps(llama, sample_path, tmp_path):
    a = run_folder(llama, sample_path, tmp_path / "a", 0, 4)
    b = run_folder(llama, sample_path, tmp_path / "b", 3, 3)
    c = run_folder(llama, sample_path, tmp_path / "c", 9, 2)
    t = run_folder(llama, sample_path, tmp_path / "t", 20, 2, "--threshold", "0.25")
    result = run_main(["sum", str(tmp_path / "m1"), a, b])
    assert result.returncode == 2 and "chunks [3, 4) were also counted in" in result.stderr
    assert not (tmp_path / "m1").exists()
    result = run_main(["sum", str(tmp_path / "m2"), a, c])
    assert result.returncode == 0 and "gap (counted by no input): [4, 9)" in result.stdout
    root, _ = summary.read_summary(str(tmp_path / "m2" / "summary.h5"))
    assert root["chunk_ranges"].tolist() == [[0, 4], [9, 11]] and root["chunks"] == 6
    result = run_main(["sum", str(tmp_path / "m3"), a, t])
    assert result.returncode == 2 and "different --threshold" in result.stderr
    result = run_main(["sum", str(tmp_path / "m4"), a, f"{c}/correlations_block_0.zstd"])
    assert result.returncode == 2 and "not both" in result.stderr


def test_verify_run_folder_checks_recorded_sha256(llama, sample_path, tmp_path):
    out = run_folder(llama, sample_path, tmp_path / "a", 0, 3)
    assert run_main(["verify", out]).returncode == 0
    header, packed = matrixfile.read_matrix(f"{out}/correlations_block_1.zstd")
    matrixfile.write_matrix(f"{out}/correlations_block_1.zstd", 1, header.width, header.trials, packed * 0)
    result = run_main(["verify", out])
    assert result.returncode == 2 and "SHA-256 differs" in result.stderr
    result = run_main(["sum", str(tmp_path / "merged"), out])
    assert result.returncode == 2 and "SHA-256 differs" in result.stderr


def test_verify_run_folder_refuses_matrix_files_summary_does_not_list(llama, sample_path, tmp_path):
    """A matrix file summary.h5 does not list (another run's, copied in) makes verify fail, naming it."""
    out = run_folder(llama, sample_path, tmp_path / "a", 0, 3)
    shutil.copy(f"{out}/correlations_block_1.zstd", f"{out}/correlations_block_7.zstd")
    result = run_main(["verify", out])
    assert result.returncode == 2 and "correlations_block_7.zstd not listed in summary.h5" in result.stderr


def test_verify_refuses_a_folder_in_use_or_a_run_that_stopped_writing(llama, sample_path, tmp_path):
    """verify read a folder a run holds (its files about to be replaced) as finished, and called a run that
    stopped while writing (matrix files and run.json, no summary.h5) 'no summary.h5; give a run folder written
    by mpicorr': the same one-line refusals as the analysis scripts now (outputs.check_settled)."""
    from mpicorr import outputs
    out = run_folder(llama, sample_path, tmp_path / "a", 0, 3)
    with outputs.locked(out):
        result = run_main(["verify", out])
    assert result.returncode == 2 and "an mpicorr run or sum is using this folder now" in result.stderr
    os.remove(os.path.join(out, summary.SUMMARY))
    result = run_main(["verify", out])
    assert result.returncode == 2 and "its run has not finished writing" in result.stderr, result.stderr


def test_file_commands_and_input_errors_start_without_torch(llama, sample_path, tmp_path):
    """info (of a file and of a run folder), verify and sum, and a missing --data or --model, in a fresh
    interpreter: none imports torch, transformers, numba or mpi4py (seconds of start-up each)."""
    out = run_folder(llama, sample_path, tmp_path / "a", 0, 3)
    commands = [["info", out], ["info", f"{out}/correlations_block_1.zstd"], ["verify", out],
                ["sum", str(tmp_path / "m"), out], ["sum", str(tmp_path / "s.zstd"), f"{out}/correlations_block_0.zstd"],
                ["run", "--model", llama, "--data", str(tmp_path / "absent.txt")],
                ["run", "--model", str(tmp_path / "absent"), "--data", sample_path],
                ["run", "--model", "mpicorr-test/absent", "--data", sample_path],
                ["info", str(tmp_path)]]
    script = ("import json, sys\nfrom mpicorr.__main__ import main\ncodes = []\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    try:\n        codes.append(main(argv))\n    except SystemExit as exc:\n        codes.append(exc.code)\n"
              "print(json.dumps([codes, sorted({'torch', 'transformers', 'numba', 'mpi4py'} & set(sys.modules))]))")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                            env=cli_env(), cwd=str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    codes, heavy = json.loads(result.stdout.splitlines()[-1])
    assert codes == [0, 0, 0, 0, 0, 2, 2, 2, 2] and heavy == [], result.stdout + result.stderr
    assert result.stdout.count(f"{out}/correlations_block_0.zstd: block 0, width ") == 1
    assert result.stdout.count(f"{out}/correlations_block_1.zstd: block 1, width ") == 2
    errors = result.stderr.splitlines()
    assert len(errors) == 4 and all(line.startswith("mpicorr: error: ") for line in errors), result.stderr
    assert "absent.txt: cannot read" in errors[0] and "no such folder" in errors[1]
    assert "not in the local Hugging Face cache" in errors[2] and "hf download mpicorr-test/absent" in errors[2]
    assert "connect" not in errors[2] and "no correlations_block_<L>.zstd files" in errors[3]


def sha256_of(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


def test_sum_files_refuses_repeated_inputs_and_an_output_that_is_an_input(tmp_path):
    a, b = str(tmp_path / "a.zstd"), str(tmp_path / "b.zstd")
    matrixfile.write_matrix(a, 0, 2, 5, np.array([3, 1, 2]))
    matrixfile.write_matrix(b, 0, 2, 4, np.array([1, 0, 1]))
    os.symlink(a, tmp_path / "link.zstd")
    before = sha256_of(str(tmp_path))
    for out, inputs, message in [
            (tmp_path / "s.zstd", [a, a], "given twice"),                        # `sum s a a` counted a twice
            (tmp_path / "s.zstd", [a, f"{tmp_path}/./b.zstd", b], "given twice"),
            (tmp_path / "s.zstd", [a, str(tmp_path / "link.zstd")], "given twice"),
            (a, [a, b], "is also an input"),                                     # --force would have destroyed a
            (tmp_path / "link.zstd", [b, a], "is also an input"),
            (tmp_path, [a, b], "is a folder")]:                                  # was IsADirectoryError
        result = run_main(["sum", str(out), *inputs, "--force"])
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
    assert sha256_of(str(tmp_path)) == before and not (tmp_path / "s.zstd").exists()


def test_sum_files_refuses_a_count_past_64_bits(tmp_path):
    big = np.array([2**63 + 5, 2**63, 2**63 + 9], dtype=np.uint64)
    for name in ("a", "b"):
        matrixfile.write_matrix(str(tmp_path / f"{name}.zstd"), 0, 2, 2**63 + 9, big)
    with pytest.raises(UserError, match=r"overflows uint64 \(.*a.zstd, .*b.zstd\)"):
        filetools.sum_files(str(tmp_path / "s.zstd"), [str(tmp_path / "a.zstd"), str(tmp_path / "b.zstd")])
    assert not (tmp_path / "s.zstd").exists()


def test_sum_accepts_one_model_folder_spelt_two_ways(llama, sample_path, tiny_models, tmp_path, monkeypatch):
    """Runs record --model as given, and `sum` matched them by that string: a part run with --model as a
    relative path and one with the absolute path of the same folder were refused ('different --model'). Two
    spellings of one existing folder now match (read from the folder sum runs in, as a run reads them), and
    the merge records the folder's real path; another model folder is still refused. The merged summary is
    the same bytes whatever the order the parts are given in (`created` and `command` set alike)."""
    import h5py
    from test_errors import one_error_line
    parent, name = os.path.split(llama)
    rel = tmp_path / "rel"
    assert run_main(["run", "--model", name, "--data", sample_path, "--out", str(rel), "--ctx", "64",
                     "--chunk-start", "0", "--chunks", "2"], cwd=parent).returncode == 0
    absolute = run_folder(llama, sample_path, tmp_path / "abs", 2, 3)
    assert summary.read_summary(f"{rel}/summary.h5")[0]["model"] == name
    one = run_folder(llama, sample_path, tmp_path / "one", 0, 5)
    monkeypatch.chdir(parent)
    monkeypatch.setattr(summary, "now", lambda: "2027-01-01T00:00:00+00:00")
    for out, parts in (("m1", [str(rel), absolute]), ("m2", [absolute, str(rel)])):
        filetools.sum_runs(str(tmp_path / out), parts, command="python -m mpicorr sum")
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    assert sha256_of(str(m1)) == sha256_of(str(m2))
    assert outputs(str(m1)) == outputs(one)
    root = summary.read_summary(f"{m1}/summary.h5")[0]
    assert root["model"] == os.path.realpath(llama) and list(root["merged_from"]) == [str(rel), absolute]
    other = shutil.copytree(absolute, tmp_path / "other")
    with h5py.File(other / "summary.h5", "r+") as h5:
        h5.attrs["model"] = tiny_models["mistral"]  # a real folder, another model
    one_error_line(run_main(["sum", str(tmp_path / "m3"), str(rel), str(other)], cwd=parent), "different --model")
    one_error_line(run_main(["sum", str(tmp_path / "m3"), str(rel), absolute]),  # 'llama' names nothing here
                   "different --model", "a relative --model is read from the folder sum runs in")
    assert not (tmp_path / "m3").exists()


@pytest.fixture(scope="module")
def three_runs(llama, sample_path, tmp_path_factory):
    """Three disjoint runs of one experiment (chunks 0-1, 2-3, 4-5)."""
    base = tmp_path_factory.mktemp("runs")
    return [run_folder(llama, sample_path, base / name, 2 * k, 2) for k, name in enumerate("abc")]


def test_failed_sum_of_run_folders_leaves_nothing(three_runs, tmp_path):
    """A merge that fails after writing some layers (here: a damaged layer 1 in one input) leaves no output
    folder, and with --force leaves an earlier merge as it was."""
    a, b, c = three_runs
    damaged = shutil.copytree(c, tmp_path / "c")
    header, packed = matrixfile.read_matrix(f"{damaged}/correlations_block_1.zstd")
    matrixfile.write_matrix(f"{damaged}/correlations_block_1.zstd", 1, header.width, header.trials, packed // 2)
    result = run_main(["sum", str(tmp_path / "m"), a, b, str(damaged)])
    assert result.returncode == 2 and "SHA-256 differs" in result.stderr
    assert not (tmp_path / "m").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".m.tmp")]
    assert run_main(["sum", str(tmp_path / "m"), a, b]).returncode == 0
    before = sha256_of(str(tmp_path / "m"))
    result = run_main(["sum", str(tmp_path / "m"), a, c, str(damaged), "--force"])
    assert result.returncode == 2 and sha256_of(str(tmp_path / "m")) == before


def test_sum_of_run_folders_refuses_repeats_and_its_own_inputs(three_runs, tmp_path):
    a, b, _ = three_runs
    copy = shutil.copytree(b, tmp_path / "b")
    before = sha256_of(str(copy))
    os.makedirs(tmp_path / "t")
    nested = shutil.copytree(b, tmp_path / "t" / "threshold-0.5")  # --force would replace its files
    for out, inputs, message in [(copy, [copy, a], "is also an input"),       # `sum B B A --force` corrupted B
                                 (tmp_path / "t", [a, nested], "is also an input"),
                                 (tmp_path / "m", [a, f"{a}/"], "given twice"),
                                 (tmp_path / "m", [a, copy, f"{tmp_path}/../{tmp_path.name}/b"], "given twice")]:
        result = run_main(["sum", str(out), *map(str, inputs), "--force"])
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert sha256_of(str(copy)) == before and not (tmp_path / "m").exists()


def test_sum_force_replaces_only_mpicorr_outputs(three_runs, tmp_path):
    """--force on a folder that holds an earlier run's outputs and a user's files: the outputs are replaced
    (a stale layer and run.json included), the user's files stay."""
    a, b, _ = three_runs
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "model_step1000.pt").write_text("mine too")
    shutil.copy(f"{a}/correlations_block_0.zstd", out / "correlations_block_7.zstd")
    shutil.copy(f"{a}/summary.h5", out / "summary.h5")
    (out / "run.json").write_text("{}")
    result = run_main(["sum", str(out), a, b])
    assert result.returncode == 2 and "already holds outputs" in result.stderr
    assert run_main(["sum", str(out), a, b, "--force"]).returncode == 0
    assert sorted(os.listdir(out)) == ["checkpoints", "correlations_block_0.zstd", "correlations_block_1.zstd",
                                       "notes.txt", "summary.h5"]
    assert (out / "notes.txt").read_text() == "mine" and os.listdir(out / "checkpoints") == ["model_step1000.pt"]
    assert run_main(["verify", str(out)]).returncode == 0


def test_merged_summary_adds_the_runs_attempts(three_runs, llama, sample_path, tmp_path, monkeypatch):
    """A run's summary.h5 records `attempts` (1, plus one per --resume); a merged one had none. It holds the
    runs' attempts added now: a run stopped by SIGTERM after its first chunk and resumed (2 attempts) merged
    with two uninterrupted ones gives 4, and a merge of that merge and a third run 5."""
    import signal

    from mpicorr import run as running
    a, b, c = three_runs
    part = ["run", "--model", llama, "--data", sample_path, "--out", str(tmp_path / "resumed"), "--ctx", "64",
            "--chunk-start", "6", "--chunks", "3"]
    after_batch = running.Saver.after_batch

    def stop_after_the_first(self, tally, chunks):
        after_batch(self, tally, chunks)
        os.kill(os.getpid(), signal.SIGTERM)  # mpicorr's handler: finish the batch, save a checkpoint, exit 143
    monkeypatch.setattr(running.Saver, "after_batch", stop_after_the_first)

    def unhandled(*_):
        raise RuntimeError("SIGTERM reached the test's handler")
    previous = signal.signal(signal.SIGTERM, unhandled)  # without mpicorr's handler: fail, not kill pytest
    try:
        assert run_main(part).returncode == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert run_main([*part, "--resume"]).returncode == 0
    attempts = [summary.read_summary(f"{run}/summary.h5")[0]["attempts"] for run in (a, b, tmp_path / "resumed")]
    assert attempts == [1, 1, 2]
    assert run_main(["sum", str(tmp_path / "m"), a, str(tmp_path / "resumed"), b]).returncode == 0
    assert summary.read_summary(f"{tmp_path}/m/summary.h5")[0]["attempts"] == 4
    assert run_main(["sum", str(tmp_path / "mm"), str(tmp_path / "m"), c]).returncode == 0
    assert summary.read_summary(f"{tmp_path}/mm/summary.h5")[0]["attempts"] == 5


def test_sum_refuses_other_dtype_or_batch_size(llama, sample_path, three_runs, tmp_path):
    a = three_runs[0]
    for option, value in (("--batch-size", "2"), ("--dtype", "float32")):
        other = run_folder(llama, sample_path, tmp_path / option.strip("-"), 6, 2, option, value)
        result = run_main(["sum", str(tmp_path / "m"), a, other])
        assert result.returncode == 2 and f"different {option}" in result.stderr, result.stderr
    result = run_main(["sum", str(tmp_path / "m"), *three_runs[:2]])
    root, _ = summary.read_summary(str(tmp_path / "m" / "summary.h5"))
    assert root["dtype"] == summary.read_summary(f"{a}/summary.h5")[0]["dtype"] and "batch_size" in root


def test_sum_refuses_int64_overflow_of_the_raw_sums(three_runs, tmp_path):
    """The fixed-point sums are int64: two runs whose act_sumsq add past 2**63 - 1 are refused, naming the
    inputs (numpy's addition would wrap to a negative sum)."""
    import h5py
    a, b = (shutil.copytree(run, tmp_path / name) for run, name in zip(three_runs, "ab"))
    for run in (a, b):
        with h5py.File(run / "summary.h5", "r+") as h5:
            h5["layers/0/act_sumsq_fixed"][3] = 2**62 + 1
    result = run_main(["sum", str(tmp_path / "m"), str(a), str(b)])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"act_sumsq_fixed of block_0 overflows int64 ({a}, {b})" in result.stderr
    assert not (tmp_path / "m").exists()


def test_sum_refuses_a_folder_a_run_or_another_sum_is_using(llama, sample_path, three_runs, tmp_path):
    """`sum` took no lock: two sums into one folder at once, or a sum into the --out of a running run, mixed
    their outputs (and the later one replaced the other's without --force). It holds the run's lock on its
    output folder now: while a run (or sum) holds it, a sum is refused in one line and touches nothing, and
    a run into a folder a sum is writing is refused in turn."""
    from mpicorr.outputs import locked
    from test_errors import one_error_line
    a, b, c = three_runs
    out = tmp_path / "m"
    assert run_main(["sum", str(out), a, b]).returncode == 0
    (out / "notes.txt").write_text("mine")
    before = sha256_of(str(out))
    with locked(str(out)):  # what a run into --out m holds for its whole run
        result = run_main(["sum", str(out), a, c, "--force"])
    one_error_line(result, f"sum {out}: another mpicorr run or sum is using this folder now; wait until it ends "
                           f"or choose another output folder")
    assert sha256_of(str(out)) == before and sorted(os.listdir(tmp_path)) == ["m"]
    fresh = tmp_path / "fresh"
    with filetools.claimed(str(fresh)) as made:  # another sum has just made the missing folder and holds it
        assert made
        one_error_line(run_main(["sum", str(fresh), a, b]), f"sum {fresh}: another mpicorr run or sum is using")
        one_error_line(run_main(["run", "--model", llama, "--data", sample_path, "--out", str(fresh), "--ctx",
                                 "64", "--chunks", "2"]), f"--out {fresh}: another mpicorr run or sum is using")
        assert os.listdir(fresh) == []
    assert run_main(["sum", str(out), a, c, "--force"]).returncode == 0  # the lock went with its holder
    assert (out / "notes.txt").read_text() == "mine" and run_main(["verify", str(out)]).returncode == 0


def test_sum_into_a_mount_point_or_a_link_to_another_disk(three_runs, small_disk, tmp_path):
    """`sum` staged its output beside OUT and renamed it in: where OUT is a mount point or a link to a folder on
    another disk the rename failed (EXDEV), always, and with --force only after the earlier merge there had been
    deleted (lost, though 'a failed merge leaves ALL as it was'). A folder that existed is now staged inside
    itself: the merge lands, the user's files stay, nothing hidden is left."""
    a, b, c = three_runs
    disk = small_disk(64 << 20)  # a mount point
    os.makedirs(f"{disk}/elsewhere")
    os.symlink(f"{disk}/elsewhere", tmp_path / "link")  # a link to a folder on another filesystem
    for out in (disk, str(tmp_path / "link")):
        assert run_main(["sum", out, a, b]).returncode == 0
        with open(f"{out}/notes.txt", "w") as fh:
            fh.write("mine")
        result = run_main(["sum", out, a, c, "--force"])
        assert result.returncode == 0, result.stderr
        assert run_main(["verify", out]).returncode == 0
        assert summary.read_summary(f"{out}/summary.h5")[0]["chunks"] == 4
        assert open(f"{out}/notes.txt").read() == "mine"
        assert [n for n in os.listdir(out) if n.startswith(".")] == []
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_sum_into_a_link_to_nothing_or_under_missing_folders(three_runs, tmp_path):
    """A link to nothing as OUT was an OSError (exit 1, 'FileNotFoundError'); a failed sum into a/b/OUT with a
    and b missing removed OUT but left a/b, made by the sum. One line, exit 2; every folder the sum made goes."""
    from test_errors import one_error_line
    a, b, _ = three_runs
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    one_error_line(run_main(["sum", str(tmp_path / "dangling"), a, b]),
                   f"sum {tmp_path / 'dangling'}: exists and is not a folder")
    again = shutil.copytree(a, tmp_path / "again")  # the same chunks: refused once the sum holds OUT
    one_error_line(run_main(["sum", str(tmp_path / "x" / "y" / "m"), a, str(again)]), "were also counted in")
    assert sorted(os.listdir(tmp_path)) == ["again", "dangling"]
    assert run_main(["sum", str(tmp_path / "x" / "y" / "m"), a, b]).returncode == 0


def dead_pid() -> int:
    """The PID of a process that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def leftover(folder, host: str | None, pid: int | None) -> None:
    """A staging folder as a killed sum leaves it: a partial output inside, marked by `host` and `pid` (no mark
    when None)."""
    os.makedirs(folder)
    (folder / "correlations_block_0.zstd").write_bytes(b"partial" * 1000)
    if host is not None:
        (folder / filetools.MARK).write_text(json.dumps({"host": host, "pid": pid}))


def test_sum_removes_what_killed_sums_left(three_runs, tmp_path):
    """A sum killed while writing (kill -9, a lost node) left its staging folder, inside OUT or beside it, for
    ever (its outputs: possibly GBs). The next sum into OUT deletes those marked as this host's by a process
    that no longer runs; another host's, a running process's and unmarked folders are left."""
    import socket
    a, b, _ = three_runs
    out, host = tmp_path / "m", socket.gethostname()
    os.makedirs(out)
    stale = [out / f"{filetools.STAGING}{dead_pid()}", tmp_path / f".m.tmp{dead_pid()}"]
    kept = [out / f"{filetools.STAGING}1", tmp_path / ".m.tmp2", out / f"{filetools.STAGING}3"]
    for folder in stale:
        leftover(folder, host, int(folder.name.rsplit("tmp", 1)[1]))
    leftover(kept[0], "another-host", dead_pid())
    leftover(kept[1], host, os.getppid())  # a process that runs (this one's parent)
    leftover(kept[2], None, None)
    assert run_main(["sum", str(out), a, b]).returncode == 0
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)
    assert filetools.MARK not in os.listdir(out) and run_main(["verify", str(out)]).returncode == 0


def test_sum_killed_while_writing_is_cleaned_by_the_next(three_runs, tmp_path):
    """A real kill -9 of a sum while it writes its staging folder; the next sum into OUT removes what it left
    (for dumps: tests/test_dump.py)."""
    a, b, _ = three_runs
    out = tmp_path / "m"
    slow = ("import sys, time; from mpicorr import filetools, __main__ as m\n"
            "write = filetools.merge_unit\n"
            "def merge_unit(*args):\n    write(*args); print('writing', flush=True); time.sleep(60)\n"
            "filetools.merge_unit = merge_unit\nsys.exit(m.main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", slow, "sum", str(out), a, b], env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "writing\n", proc.stderr.read()
    proc.kill()
    proc.wait()
    left = [n for n in os.listdir(tmp_path) if n.startswith(".m.tmp")]
    assert left == [f".m.tmp{proc.pid}"] and os.listdir(out) == []
    assert run_main(["sum", str(out), a, b]).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["m"] and run_main(["verify", str(out)]).returncode == 0


# A `sum` CLI in a child process that stops just before it writes its matrix file (after its checks), says
# 'writing' and goes on when a line arrives on its stdin: a real sum, caught while it writes.
SLOW_FILE_SUM = ("import sys; from mpicorr import matrixfile, __main__ as m\n"
                 "write = matrixfile.write_matrix\n"
                 "def write_matrix(*args):\n"
                 "    print('writing', flush=True); sys.stdin.readline(); return write(*args)\n"
                 "matrixfile.write_matrix = write_matrix\nsys.exit(m.main(sys.argv[1:]))\n")


def slow_file_sum(out, *inputs) -> subprocess.Popen:
    """SLOW_FILE_SUM started as `sum OUT IN...`, once it says it is writing."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FILE_SUM, "sum", str(out), *inputs], env=cli_env(),
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "writing\n", proc.stderr.read()
    return proc


def test_sum_of_matrix_files_refuses_an_out_another_sum_is_writing(llama, sample_path, tmp_path):
    """`sum OUT.zstd A B` took no lock: a second sum into OUT while the first wrote passed the 'exists' check as
    well, and the later rename replaced the other's file (--force or not); a run --out OUT meanwhile made a
    folder there, onto which the sum's rename then failed. The sum now holds its staging folder beside OUT
    locked: both are refused in one line, exit 2, nothing written. A sum killed -9 leaves the folder, unlocked:
    it blocks nothing, and the next sum into OUT removes it (the staging folders' stale-mark rule)."""
    from test_errors import one_error_line
    rng = np.random.default_rng(5)
    a, b = str(tmp_path / "a.zstd"), str(tmp_path / "b.zstd")
    matrixfile.write_matrix(a, 2, 7, 30, symmetric_counts(rng, 7, 30))
    matrixfile.write_matrix(b, 2, 7, 20, symmetric_counts(rng, 7, 20))
    out = tmp_path / "s.zstd"
    first = slow_file_sum(out, a, b)
    busy = f"sum {out}: another mpicorr sum is writing this file now; wait until it ends or choose another output name"
    one_error_line(run_main(["sum", str(out), b, a]), busy)
    one_error_line(run_main(["sum", str(out), a, "--force"]), busy)
    one_error_line(run_main(["run", "--model", llama, "--data", sample_path, "--out", str(out), "--ctx", "64",
                             "--chunks", "2"]), f"--out {out}: another mpicorr sum is writing this file now")
    assert not out.exists()
    first.communicate("\n", timeout=60)
    assert first.returncode == 0, first.stderr
    assert matrixfile.read_matrix(str(out))[0].trials == 50 and sorted(os.listdir(tmp_path)) == ["a.zstd", "b.zstd",
                                                                                                 "s.zstd"]
    killed = slow_file_sum(tmp_path / "k.zstd", a, b)
    killed.kill()
    killed.wait()
    assert os.path.isdir(tmp_path / f".k.zstd.tmp{killed.pid}")  # marked, as the staging folders of sums are
    assert run_main(["sum", str(tmp_path / "k.zstd"), a, b]).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["a.zstd", "b.zstd", "k.zstd", "s.zstd"]
    digests = sha256_of(str(tmp_path))
    assert digests["k.zstd"] == digests["s.zstd"]


def test_commands_under_mpirun_run_once(llama, sample_path, three_runs, tmp_path):
    """`mpirun -n 2 python -m mpicorr sum ...` ran the sum on both ranks, which raced for the output folder (one
    refused by the other's lock, mpirun's status an error), and `plan` printed its table once per rank."""
    a, b, _ = three_runs
    merged = tmp_path / "m"
    result = run_cli(["sum", str(merged), a, b], ranks=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("2 runs merged") == 1 and run_main(["verify", str(merged)]).returncode == 0
    result = run_cli(["plan", "--model", llama, "--data", sample_path, "--ctx", "64", "--ranks", "3"], ranks=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("rank  host") <= 1 and result.stdout.count("chunks of") == 1, result.stdout
