"""--dump (predictor training data): the masks are the counts' firing, the inputs are the hidden states
entering the MLP, 1/2/3 ranks, either schedule, --part + sum and a SIGKILL + --resume give the same dump,
the trainer learns a planted rule, and bad inputs are one line."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpicorr import models, predictor, summary, tiny
from mpicorr.predictor_data import LayerData, read_index
from conftest import MPIRUN, ROOT, cli_env, run_main
from reference import reference_mlp_inputs, reference_run
from test_errors import one_error_line
from test_full_disk import small_disk  # noqa: F401 - a fixture
from test_pipeline import ok

CTX = 64
M64 = (1 << 64) - 1


def splitmix64(p: int) -> int:
    """The sampling hash, written out on Python integers."""
    z = (p + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def content(folder: str) -> dict:
    """Everything a dump holds, through the reader: per layer and threshold (positions, inputs, fired), and
    the values when dumped."""
    index = read_index(folder)
    found = {}
    for spec in index["layers"]:
        for t in index["thresholds"]:
            data = LayerData(folder, spec["layer"], t, values=index["values"])
            found[spec["layer"], t] = (data.positions, *(x.numpy() for x in data.take(range(len(data)))))
    return found


def same_content(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y), key


DENSE = sorted(models.MLP_INPUTS)


@pytest.mark.parametrize("family", DENSE)
def test_dump_equals_reference(tiny_models, sample_path, tmp_path, family):
    """Inputs: the norm's output before the MLP by plain transformers; masks: the brute-force firing at both
    thresholds; values: the recorded activations; positions: the hash rule."""
    model, out, dump = tiny_models[family], str(tmp_path / "out"), str(tmp_path / "dump")
    ok(run_main(["run", "--model", model, "--data", sample_path, "--out", out, "--ctx", str(CTX),
                 "--chunk-start", "3", "--chunks", "5", "--batch-size", "2", "--threshold", "0.25,0.5",
                 "--dump", dump, "--dump-rate", "0.3", "--dump-values"]))
    index = read_index(dump)
    bound = index["sample"]["bound"]
    assert bound == int(0.3 * 2.0**64) and index["dtype"] == "float32" and index["model_type"] == family
    want = np.array([p for p in range(3 * CTX, 8 * CTX) if splitmix64(p) < bound])
    assert 0.2 < len(want) / (5 * CTX) < 0.4 and index["tokens"] == len(want)
    rows = want - 3 * CTX
    inputs = reference_mlp_inputs(model, sample_path, CTX, 3, 5)
    _, acts, _, _ = reference_run(model, sample_path, CTX, 0.5, 3, 5)
    assert [s["layer"] for s in index["layers"]] == sorted(acts)
    for t in (0.25, 0.5):
        for layer, a in acts.items():
            mask = np.abs(a) >= t  # the brute-force firing
            positions, x, got, values = content_layer(dump, layer, t)
            assert np.array_equal(positions, want)
            assert np.array_equal(x, inputs[layer][rows]), (family, layer)
            assert np.array_equal(got, mask[rows]), (family, layer, t)
            assert np.array_equal(values, acts[layer][rows])
            # popcount sums: the run's firing restricted to the dumped tokens, by the brute-force reference
            assert np.array_equal(got.sum(0), mask[rows].sum(0)) and 0 < got.mean() < 1


def content_layer(folder: str, layer: int, threshold: float):
    data = LayerData(folder, layer, threshold, values=True)
    return (data.positions, *(x.numpy() for x in data.take(np.arange(len(data)))))


def test_masks_are_the_counts_firing_in_bfloat16(llama, sample_path, tmp_path):
    """Every token dumped, in bfloat16: per threshold the masks' popcounts are summary.h5's fire_count, and
    each mask is |value| >= T on the dumped bfloat16 values (--site gate: the gate's firing)."""
    out, dump = str(tmp_path / "out"), str(tmp_path / "dump")
    ok(run_main(["run", "--model", llama, "--data", sample_path, "--out", out, "--ctx", str(CTX), "--chunks", "6",
                 "--batch-size", "2", "--threshold", "0.25,0.5", "--dtype", "bfloat16", "--site", "gate",
                 "--dump", dump, "--dump-rate", "1", "--dump-values"]))
    assert read_index(dump)["tokens"] == 6 * CTX
    for t in (0.25, 0.5):
        _, layers = summary.read_summary(os.path.join(out, f"threshold-{t!r}", "summary.h5"))
        for layer, entry in layers.items():
            data = LayerData(dump, layer, t, values=True)
            x, fired, values = data.take(np.arange(len(data)))
            assert x.dtype == values.dtype == torch.bfloat16
            assert np.array_equal(fired.numpy().sum(0), entry["fire_count"]), (layer, t)
            assert torch.equal(fired, values.abs() >= t)


def test_dump_tokens_are_the_smallest_hashes(llama, sample_path, tmp_path):
    """--dump-tokens N: exactly the N positions of the chunk range with the smallest keys."""
    dump = str(tmp_path / "dump")
    ok(run_main(["run", "--model", llama, "--data", sample_path, "--out", str(tmp_path / "out"), "--ctx",
                 str(CTX), "--chunks", "4", "--dump", dump, "--dump-tokens", "50"]))
    want = sorted(sorted(range(4 * CTX), key=splitmix64)[:50])
    assert LayerData(dump, 0).positions.tolist() == want


@pytest.fixture(scope="module")
def rank_dumps(llama, sample_path, tmp_path_factory) -> dict[str, str]:
    """The same dump by 1 rank (whole, and two --part shares), by 2 ranks (static, dynamic), by 3 with uneven
    weights."""
    base = tmp_path_factory.mktemp("dumps")
    args = ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "16", "--batch-size", "2",
            "--threshold", "0.25,0.5", "--dump-tokens", "300", "--dump-values"]
    runs = {name: [*args, "--out", str(base / f"out-{name}"), "--dump", str(base / name), *extra] for name, extra
            in [("one", []), ("static", []), ("dynamic", ["--schedule", "dynamic"]), ("part0", ["--part", "0/2"]),
                ("part1", ["--part", "1/2"]), ("three", ["--hostfile", str(base / "hostfile")])]}
    (base / "hostfile").write_text(f"localhost slots=2 weight=1\n{os.uname().nodename} slots=1 weight=3\n")
    for name in ("one", "part0", "part1"):
        ok(run_main(runs[name]))
    if MPIRUN is None:
        pytest.skip("mpirun not found")
    many = [sys.executable, os.path.join(ROOT, "tests", "many_runs.py")]
    for ranks, names in [(2, ["static", "dynamic"]), (3, ["three"])]:
        ok(subprocess.run([MPIRUN, "--oversubscribe", "-n", str(ranks), *many, json.dumps([runs[n] for n in names])],
                          capture_output=True, text=True, env=cli_env(), cwd=str(base), timeout=600))
    return {name: str(base / name) for name in runs}


def test_ranks_and_schedules_give_identical_dumps(rank_dumps):
    one = content(rank_dumps["one"])
    assert read_index(rank_dumps["one"])["tokens"] == 300 and len(one) == 4
    for name in ("static", "dynamic", "three"):
        index = read_index(rank_dumps[name])
        ranks = {e["file"].split("-")[2] for e in index["shards"]}
        # every rank that counted chunks writes shards (under --schedule dynamic on a loaded machine, rank 0 can
        # take every batch before rank 1 has loaded its model)
        with open(os.path.join(os.path.dirname(rank_dumps[name]), f"out-{name}", "run.json")) as fh:
            counted = {f"r{r['rank']}" for r in json.load(fh)["ranks"] if r["chunks"]}
        assert ranks == counted and counted >= ({"r0", "r1"} if name == "static" else {"r0"}), (name, ranks, counted)
        same_content(content(rank_dumps[name]), one)


def test_parts_sum_to_the_whole_dump(rank_dumps, tmp_path):
    parts = [read_index(rank_dumps[p]) for p in ("part0", "part1")]
    assert sum(p["tokens"] for p in parts) == 300 and all(p["tokens"] for p in parts)
    merged = str(tmp_path / "merged")
    result = ok(run_main(["sum", merged, rank_dumps["part1"], rank_dumps["part0"]]))
    assert "2 dumps merged" in result.stdout
    same_content(content(merged), content(rank_dumps["one"]))
    assert read_index(merged)["chunk_ranges"] == read_index(rank_dumps["one"])["chunk_ranges"]
    one_error_line(run_main(["sum", str(tmp_path / "twice"), rank_dumps["part0"], rank_dumps["one"]]),
                   "share chunks")
    line = one_error_line(run_main(["sum", merged, rank_dumps["part0"], rank_dumps["part1"]]),
                          f"sum {merged}: already holds a dump; choose another folder, add --force to replace it")
    assert "--resume" not in line and "--dump" not in line  # a sum's line, not a run's


@pytest.fixture(scope="module")
def part_dumps(llama, sample_path, tmp_path_factory) -> list[str]:
    """Two --part shares of one small dump (1 rank each, in this process): inputs for `sum`."""
    base = tmp_path_factory.mktemp("parts")
    for k in range(2):
        ok(run_main(["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "8",
                     "--part", f"{k}/2", "--out", str(base / f"out{k}"), "--dump", str(base / f"part{k}"),
                     "--dump-rate", "0.5"]))
    return [str(base / f"part{k}") for k in range(2)]


def files_of(folder) -> dict[str, tuple[int, bytes]]:
    """Each file of a folder: its inode and bytes (a file rewritten in place or replaced shows)."""
    return {n: (os.stat(os.path.join(folder, n)).st_ino, open(os.path.join(folder, n), "rb").read())
            for n in sorted(os.listdir(folder))}


def test_sum_of_dumps_refuses_a_folder_a_run_is_dumping_into(part_dumps, tmp_path):
    """`sum` of dumps took no lock: with --force it emptied a folder a run was dumping into (the run's shards
    deleted) and wrote its own beside the run's. It holds the run's lock on the folder now: refused in one
    line, nothing touched."""
    from mpicorr.outputs import locked
    merged = str(tmp_path / "merged")
    ok(run_main(["sum", merged, *part_dumps]))
    before = files_of(merged)
    with locked(merged, "--dump"):  # what a run dumping into this folder holds for its whole run
        one_error_line(run_main(["sum", merged, *part_dumps, "--force"]),
                       f"sum {merged}: another mpicorr run or sum is using this folder now")
    assert files_of(merged) == before and sorted(os.listdir(tmp_path)) == ["merged"]
    ok(run_main(["sum", merged, *part_dumps, "--force"]))  # the lock went with its holder


def test_sum_of_dumps_accepts_one_model_folder_spelt_two_ways(llama, tiny_models, part_dumps, tmp_path):
    """As for run folders (tests/test_filetools.py): a dump whose --model was a relative path and one with the
    absolute path of the same folder were refused ('different model'); they merge now, the index records the
    folder's real path, and another model folder is still refused."""
    import shutil
    parent, name = os.path.split(llama)
    rel, other = (shutil.copytree(part_dumps[1], tmp_path / n, copy_function=os.link) for n in ("rel", "other"))
    for folder, model in ((rel, name), (other, tiny_models["mistral"])):
        index = read_index(str(folder))
        os.remove(folder / "index.json")  # a link to part_dumps[1]'s: not to be written through
        (folder / "index.json").write_text(json.dumps({**index, "model": model}, indent=1))
    ok(run_main(["sum", str(tmp_path / "m"), part_dumps[0], str(rel)], cwd=parent))
    assert read_index(str(tmp_path / "m"))["model"] == os.path.realpath(llama)
    one_error_line(run_main(["sum", str(tmp_path / "m2"), part_dumps[0], str(other)], cwd=parent),
                   "different model")
    assert not (tmp_path / "m2").exists()


def test_failed_sum_of_dumps_leaves_its_output_as_it_was(part_dumps, tmp_path):
    """`sum` of dumps wrote into OUT itself: with --force it first deleted the earlier dump there, so a merge
    that then failed (here: a shard an input's index lists is missing) lost it and left OUT half-written
    (shards, no index), and a missing OUT was left half-made; the failure was a FileNotFoundError (exit 1).
    It writes into a hidden folder beside OUT and moves it into place at the end: one line naming the shard,
    exit 2, OUT as it was (or absent), nothing left beside it."""
    import shutil
    broken = shutil.copytree(part_dumps[1], tmp_path / "broken")
    shard = read_index(str(broken))["shards"][0]["file"]
    os.remove(broken / shard)
    merged = tmp_path / "merged"
    ok(run_main(["sum", str(merged), *part_dumps]))
    before, inode, tokens = files_of(merged), os.stat(merged).st_ino, content(str(merged))
    one_error_line(run_main(["sum", str(merged), part_dumps[0], str(broken), "--force"]),
                   f"{broken / shard}: cannot read (No such file or directory)")
    assert files_of(merged) == before and os.stat(merged).st_ino == inode
    one_error_line(run_main(["sum", str(tmp_path / "new"), part_dumps[0], str(broken)]), str(broken / shard))
    assert sorted(os.listdir(tmp_path)) == ["broken", "merged"]
    ok(run_main(["sum", str(merged), *part_dumps, "--force"]))  # the dump's files replaced, the folder kept
    assert os.stat(merged).st_ino == inode and sorted(files_of(merged)) == sorted(before)
    same_content(content(str(merged)), tokens)


def test_sum_of_dumps_removes_what_a_killed_sum_left(part_dumps, tmp_path):
    """A sum killed while merging into an existing dump folder left `.mpicorr-sum.tmpPID` in it, and every later
    sum into that folder was refused ("holds files that are not a dump") until the user removed it by hand. The
    next sum deletes it (marked by this host and a process that no longer runs) and merges."""
    import json
    import socket
    import subprocess
    import sys

    from mpicorr import filetools
    merged = tmp_path / "merged"
    ok(run_main(["sum", str(merged), *part_dumps]))
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True).stdout)
    stale = merged / f"{filetools.STAGING}{pid}"
    os.makedirs(stale)
    (stale / "shard-00000-r0.safetensors").write_bytes(b"partial")
    (stale / filetools.MARK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    ok(run_main(["sum", str(merged), *part_dumps, "--force"]))
    assert not stale.exists() and filetools.MARK not in os.listdir(merged)


def test_sigkill_then_resume_gives_the_uninterrupted_dump(llama, sample_path, tmp_path):
    from test_resume import kill_rank_after_checkpoint

    def args(name: str, *extra: str) -> list[str]:
        return ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "24", "--batch-size",
                "4", "--out", str(tmp_path / f"out-{name}"), "--dump", str(tmp_path / name), "--dump-rate", "0.2",
                *extra]

    ok(run_main(args("whole")))
    kill_rank_after_checkpoint(args("cut", "--checkpoint-every", "4"), 2, str(tmp_path / "out-cut"), victim=1,
                               wait_for="g1-r1.ckpt")
    cut = str(tmp_path / "cut")
    assert not os.path.exists(os.path.join(cut, "index.json")) and os.listdir(cut), "killed after some shards"
    # an interrupted dump is not readable until its resume writes the index
    one_error_line(run_main(["sum", str(tmp_path / "m"), cut, str(tmp_path / "whole")]), "no index.json")
    before = sorted(os.listdir(cut))
    one_error_line(run_main(args("cut", "--resume", "--dump-rate", "0.3")), "different --dump")
    assert sorted(os.listdir(cut)) == before, "a refused resume changes nothing"
    ok(run_main(args("cut", "--resume")))  # on 1 rank: the killed run had 2
    same_content(content(cut), content(str(tmp_path / "whole")))
    index = read_index(cut)
    assert sorted(os.listdir(cut)) == sorted(["index.json", *(e["file"] for e in index["shards"])])
    assert any(e["file"].startswith("shard-g1-") for e in index["shards"]), "the first attempt's shards are kept"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, sample_path) -> tuple[str, str]:
    """A tiny GPT-2 whose every FFN neuron fires by a planted rank-4 linear rule on the MLP input: gelu(z) >= 0.5
    exactly when z = x W + b passes a fixed point, with W = A B of rank 4. Dumped with every token."""
    base = tmp_path_factory.mktemp("planted")
    folder = tiny.build("gpt2", str(base / "model"), seed=3)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    for block in model.transformer.h:
        d, n = block.mlp.c_fc.weight.shape
        block.mlp.c_fc.weight.data = 2 * (torch.randn(d, 4, generator=g) / d**0.5) @ torch.randn(4, n, generator=g)
        block.mlp.c_fc.bias.data = 0.5 * torch.randn(n, generator=g)
    model.save_pretrained(folder)
    dump = str(base / "dump")
    ok(run_main(["run", "--model", folder, "--data", sample_path, "--out", str(base / "out"), "--ctx", str(CTX),
                 "--dump", dump, "--dump-rate", "1"]))
    return folder, dump


@pytest.fixture
def one_thread():
    """Tiny training steps run faster on one thread than on cores shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trainer_learns_a_planted_rule(planted, one_thread):
    folder, dump = planted
    data = LayerData(dump, 1)
    x, fired = data.take(np.arange(len(data)))
    from transformers import AutoModelForCausalLM
    mlp = AutoModelForCausalLM.from_pretrained(folder).transformer.h[1].mlp
    with torch.no_grad():
        rule = mlp.act(mlp.c_fc(x)).abs() >= 0.5
    assert (rule == fired).float().mean() > 0.999 and 0.2 < fired.float().mean() < 0.8
    train_idx, test_idx = predictor.split(len(data), 0.1, seed=0)
    model = predictor.train(data, 8, epochs=40, lr=0.01, train_idx=train_idx)
    scores = predictor.evaluate(model, data, test_idx)
    assert scores.recall >= 0.95 and scores.precision >= 0.9, scores
    assert scores.recall99 >= 0.99 and scores.skipped99 > 0.8 * (1 - scores.density), scores
    # The same data with the masks shuffled across tokens: no rule to learn, and the trainer must not find one.
    shuffled = predictor.evaluate(predictor.train(Shuffled(data), 8, epochs=5, lr=0.01, train_idx=train_idx),
                                  Shuffled(data), test_idx)
    assert shuffled.skipped99 < 0.5 * scores.skipped99, shuffled


class Shuffled:
    """A LayerData whose masks belong to other tokens."""

    def __init__(self, data: LayerData):
        self.data, self.hidden, self.width = data, data.hidden, data.width
        self.other = np.random.default_rng(1).permutation(len(data))

    def __len__(self) -> int:
        return len(self.data)

    def take(self, idx):
        return self.data.take(idx)[0], self.data.take(self.other[np.asarray(idx)])[1]


def script(args: list[str], capsys) -> tuple[int, str, str]:
    """analysis/predictor.py ARGS in this process: (exit status, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["predictor.py", *args]
    try:
        runpy.run_path(os.path.join(ROOT, "analysis", "predictor.py"), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def test_trainer_script(planted, tmp_path, capsys, one_thread):
    _, dump = planted
    code, out, err = script([dump, "--layer", "0", "--rank", "8", "--epochs", "2", "--save", str(tmp_path / "p.pt")],
                            capsys)
    assert code == 0, err
    assert "recall" in out and "of the FFN's neuron work skipped" in out and "epoch 2/2" in err
    assert torch.load(tmp_path / "p.pt")["down.weight"].shape == (8, 32)
    code, out, err = script([dump, "--layer", "9"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no layer 9" in err
    code, out, err = script([dump, "--layer", "0", "--device", "gpu"], capsys)  # was torch's traceback, exit 1
    assert code == 2 and err == "predictor.py: error: --device 'gpu': choose auto, cpu, cuda or cuda:N\n"


def test_trainer_script_refuses_a_save_path_before_training(tmp_path, capsys):
    """--save naming a folder, or a file in a folder that does not exist, was torch.save's traceback after the
    whole training (exit 1); now one line, exit 2, before the dump is read."""
    for save, needle in ((tmp_path, f"--save {tmp_path}: is a folder; give a file name"),
                         (tmp_path / "no" / "p.pt", f"there is no folder {tmp_path / 'no'}; make it first")):
        code, out, err = script([str(tmp_path), "--layer", "0", "--save", str(save)], capsys)
        assert (code, out) == (2, "") and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("device,needle", [
    ("cuda", "--device cuda: CUDA is not available on this machine; use --device cpu"),
    ("cuda:0", "--device cuda:0: CUDA is not available on this machine; use --device cpu"),
    ("gpu", "--device 'gpu': choose auto, cpu, cuda or cuda:N"),
])
def test_trainer_script_refuses_a_device_it_cannot_use(tmp_path, capsys, monkeypatch, device, needle):
    """predictor.py --device cuda on a machine without CUDA, or a device torch does not name: one line, exit 2,
    before the dump is read (it was torch's traceback from moving the model, exit 1)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = script([str(tmp_path), "--layer", "0", "--device", device], capsys)
    assert (code, out) == (2, "") and err == f"predictor.py: error: {needle}\n"


@pytest.mark.parametrize("extra,needles", [
    (["--dump-max-gb", "1e-9"], ["--dump-max-gb 1e-09", "would exceed it"]),
    (["--dump-rate", "1.5"], ["--dump-rate 1.5", "0 < R <= 1"]),
    (["--dump-rate", "0.1", "--dump-tokens", "5"], ["exactly one of --dump-tokens"]),
    (["--site", "heads"], ["--dump: masks of FFN neurons only"]),
    (["--dump", "OUT"], ["needs a folder of its own"]),
    (["--out", "DUMP/out"], ["needs a folder of its own"]),  # before: IsADirectoryError, exit 1, after loading
])
def test_bad_dump_options(llama, sample_path, tmp_path, extra, needles):
    out, dump = str(tmp_path / "out"), str(tmp_path / "dump")
    rate = [] if any(e.startswith("--dump-rate") for e in extra) else ["--dump-rate", "0.5"]
    extra = [out if e == "OUT" else os.path.join(dump, "out") if e == "DUMP/out" else e for e in extra]
    one_error_line(run_main(["run", "--model", llama, "--data", sample_path, "--out", out, "--ctx", str(CTX),
                             "--dump", dump, *rate, *extra]), *needles)
    assert not os.path.exists(out) and not os.path.exists(dump), "nothing written"


def test_bad_dump_inputs(tiny_models, sample_path, tmp_path):
    base = ["--data", sample_path, "--ctx", str(CTX), "--chunks", "2"]
    out, dump = str(tmp_path / "out"), str(tmp_path / "dump")
    llama = ["run", "--model", tiny_models["llama"], *base, "--out", out]
    one_error_line(run_main([*llama, "--dump-rate", "0.5"]), "--dump-rate: only with --dump DIR")
    one_error_line(run_main(["run", "--model", tiny_models["mixtral"], *base, "--out", out, "--dump", dump,
                             "--dump-rate", "0.5"]), "--dump: mixtral is a mixture of experts")
    os.makedirs(dump)
    open(os.path.join(dump, "index.json"), "w").close()
    one_error_line(run_main([*llama, "--dump", dump, "--dump-rate", "0.5"]), f"--dump {dump}: already holds a dump")
    assert not os.path.exists(out) and os.listdir(dump) == ["index.json"], "nothing written"
    ok(run_main([*llama, "--dump", dump, "--dump-rate", "0.5", "--force"]))  # --force replaces a dump
    assert read_index(dump)["tokens"] > 0
    shards = sorted(os.listdir(dump))
    one_error_line(run_main([*llama[:-1], str(tmp_path / "new"), "--dump", dump, "--dump-rate", "0.5", "--resume"]),
                   "holds a finished dump")  # --resume without checkpoints must not empty a finished dump
    assert sorted(os.listdir(dump)) == shards
    open(os.path.join(dump, "notes.txt"), "w").close()
    one_error_line(run_main([*llama, "--dump", dump, "--dump-rate", "0.5", "--force"]), "not a dump (notes.txt)")
    one_error_line(run_main(["sum", str(tmp_path / "m"), str(tmp_path)]), "no summary.h5")


def test_plan_prints_the_estimate(llama, sample_path):
    result = ok(run_main(["plan", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--dump",
                          "/nonexistent/d", "--dump-tokens", "1000", "--dump-values", "--device", "cpu"]))
    # 1000 tokens x (2 layers x (32 float32 inputs + 96 mask bits + 96 float32 values) + an 8-byte position)
    assert "dump: 1,000 tokens x 2 layers" in result.stdout and "1.1 MB at float32" in result.stdout


def test_a_second_run_into_the_same_dump_folder_is_refused(llama, sample_path, tmp_path):
    """Two runs (other --out folders) dumping into one folder at once wrote shards of the same names, one
    run's over the other's, and both exited 0 (the last index won; the other dump was lost). Rank 0 locks the
    dump folder for the whole run: the second is refused in one line, even with --force, and deletes nothing."""
    import time
    dump = str(tmp_path / "dump")
    common = ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "20", "--dump", dump,
              "--dump-rate", "0.5"]
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "slow_rank.py"), "0", "0.2", *common,
                              "--out", str(tmp_path / "a"), "--checkpoint-every", "1"], env=cli_env(),
                             cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(n.startswith("shard-") for n in (os.listdir(dump) if os.path.isdir(dump) else [])) \
            and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    second = run_main([*common, "--out", str(tmp_path / "b"), "--force"])
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    one_error_line(second, f"--dump {dump}: another mpicorr run or sum is using this folder")
    assert read_index(dump)["chunk_ranges"] == [[0, 20]] and not os.path.exists(tmp_path / "b" / "summary.h5")


def test_sum_of_dumps_into_a_mount_point(part_dumps, small_disk, tmp_path):
    """A sum of dumps wrote into OUT itself before it was staged; staged beside OUT, a merge into a mount point
    (or a link to a folder on another disk) always failed (EXDEV), with --force after deleting the earlier
    dump there. It is staged inside a folder that existed: the merge lands, nothing hidden is left."""
    disk = small_disk(64 << 20)
    ok(run_main(["sum", disk, *part_dumps]))
    ok(run_main(["sum", disk, *part_dumps, "--force"]))
    assert sorted(os.listdir(disk)) == ["index.json", "shard-m0-g1-r0-0000.safetensors",
                                        "shard-m1-g1-r0-0000.safetensors"]
    assert read_index(disk)["tokens"] == sum(read_index(p)["tokens"] for p in part_dumps)
