"""End to end: the real CLI, serially and under the real mpirun, against the brute-force reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mpicorr import counting, matrixfile, summary, tiny, triangle
from conftest import MPIRUN, cli_env, run_cli, run_main
from reference import GATED, MOE, pair_loop, reference_chunks, reference_run

CTX = 64


def outputs(folder: str) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".zstd")}


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def same_summaries(folder: str, ref: str) -> None:
    """Every dataset and layer attribute of two summary.h5 files equal, and the run totals."""
    root, layers = summary.read_summary(os.path.join(folder, "summary.h5"))
    root_ref, layers_ref = summary.read_summary(os.path.join(ref, "summary.h5"))
    for key in ("nll_fixed", "tokens", "threshold", "chunk_ranges"):
        assert np.array_equal(root[key], root_ref[key]), key
    assert sorted(layers) == sorted(layers_ref)
    for layer, entry in layers_ref.items():
        for name, value in entry.items():
            if name != "attrs":
                assert np.array_equal(layers[layer][name], value), (layer, name)
        assert layers[layer]["attrs"] == entry["attrs"]


FAMILY_SITES = [(f, "ffn") for f in tiny.FAMILIES] + [(f, "gate") for f in GATED] + \
    [(f, "heads") for f in tiny.FAMILIES]


@pytest.mark.parametrize("family,site", FAMILY_SITES)
def test_counts_equal_brute_force_reference(tiny_models, sample_path, tmp_path, family, site):
    model, out = tiny_models[family], str(tmp_path / "out")
    # heads: threshold 2.0 on the L2 norms, so that some heads fire and some do not
    threshold = 2.0 if site == "heads" else 0.5
    ok(run_main(["run", "--model", model, "--data", sample_path, "--out", out, "--ctx", str(CTX),
                 "--chunk-start", "3", "--chunks", "9", "--batch-size", "2", "--site", site,
                 "--threshold", str(threshold)]))
    fired, acts, ppl, (experts, routers) = reference_run(model, sample_path, CTX, threshold, 3, 9, site)
    root, layers = summary.read_summary(os.path.join(out, "summary.h5"))
    assert sorted(layers) == sorted(fired) and root["tokens"] == 9 * CTX and root["site"] == site
    for layer, mask in fired.items():
        header, packed = matrixfile.read_matrix(os.path.join(out, matrixfile.matrix_name(layer)))
        assert (header.trials, header.block, header.width) == (9 * CTX, layer, mask.shape[1])
        assert np.array_equal(packed, pair_loop(mask)), f"{family} {site} layer {layer}"
        assert 0 < mask.mean() < 1, "a site where nothing or everything fires tests little"
        got = layers[layer]
        assert np.array_equal(got["fire_count"], mask.sum(0))
        assert np.array_equal(got["active_hist"], np.bincount(mask.sum(1), minlength=mask.shape[1] + 1))
        assert np.allclose(got["act_sum"], acts[layer].astype(np.float64).sum(0), atol=1e-3)
        # act_hist: signed magnitude classes cut at the float32 edges, as numpy's searchsorted puts them
        a = acts[layer].astype(np.float32)
        bins = counting.HIST_MAGNITUDES - 1 + np.sign(a).astype(np.int64) * np.searchsorted(
            got["act_hist_edges"], np.abs(a), side="right")
        want = np.stack([np.bincount(bins[:, i], minlength=counting.HIST_BINS) for i in range(a.shape[1])])
        assert np.array_equal(got["act_hist"], want)
        assert np.array_equal(got["act_hist"].sum(1), np.full(a.shape[1], 9 * CTX))
        assert np.allclose(got["act_sumsq"], (acts[layer].astype(np.float64) ** 2).sum(0), rtol=1e-5, atol=1e-2)
    if ppl is None:
        assert "perplexity" not in root and root["predictions"] == 0
    else:
        assert root["perplexity"] == pytest.approx(ppl, rel=1e-4)
    check_experts(out, family, site, experts, routers)


def check_experts(out: str, family: str, site: str, experts: dict, routers: dict) -> None:
    """MoE: each expert's matrix over the tokens routed to it, and the routers' co-selection, as the reference."""
    got_experts, got_routers = summary.read_moe(os.path.join(out, "summary.h5"))
    if family not in MOE or site != "ffn":
        assert not got_experts and not got_routers and not experts
        return
    assert sorted(routers) == sorted(got_routers) and routers
    assert sorted(got_experts) == [(i, e) for i in sorted(routers) for e in range(tiny.EXPERTS)]
    for (layer, expert), entry in got_experts.items():
        acts = experts.get((layer, expert), np.zeros((0, entry["attrs"]["width"]), np.float32))
        mask = np.abs(acts) >= 0.5
        header, packed = matrixfile.read_matrix(os.path.join(out, matrixfile.matrix_name(layer, expert)))
        assert header.trials == len(acts) == routers[layer][:, expert].sum() == entry["attrs"]["tokens"]
        assert np.array_equal(packed, pair_loop(mask)), (family, layer, expert)
        assert np.array_equal(entry["fire_count"], mask.sum(0))
        assert np.allclose(entry["act_sum"], acts.astype(np.float64).sum(0), atol=1e-3)
    for layer, mask in routers.items():
        got = got_routers[layer]
        assert (mask.sum(1) == tiny.TOP_K).all() and got["attrs"]["tokens"] == len(mask)
        assert np.array_equal(got["coselect"], mask.T.astype(np.int64) @ mask.astype(np.int64))
        assert np.array_equal(got["load"], mask.sum(0))


def test_chunks_follow_the_data_convention(llama, sample_path):
    from mpicorr import data, models
    tok = models.load_tokenizer(llama)
    text, _ = data.read_text(sample_path)
    ours = data.make_chunks(data.tokenize(text, tok), CTX, tok.bos_token_id)
    assert ours.tolist() == reference_chunks(llama, sample_path, CTX)
    assert (ours[:, 0] == tok.bos_token_id).all()


@pytest.fixture(scope="module")
def multi_rank_runs(llama, sample_path, tmp_path_factory):
    """The same job with 1, 2 and 3 ranks (3 with uneven hostfile weights)."""
    base = tmp_path_factory.mktemp("ranks")
    hostfile = base / "hostfile"
    hostfile.write_text(f"localhost slots=2 weight=1\n{os.uname().nodename} slots=1 weight=3\n")
    args = ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--batch-size", "2"]
    runs = {}
    # The 2-rank run also stages the model (--stage-model) and loads it from the copy.
    staged = ["--stage-model", str(base / "node-local")]
    for ranks, extra in [(1, []), (2, staged), (3, ["--hostfile", str(hostfile)])]:
        out = str(base / f"r{ranks}")
        runs[ranks] = (out, ok(run_cli(args + ["--out", out] + extra, ranks=ranks)))
    return runs


def test_ranks_give_identical_bytes(multi_rank_runs, llama):
    one = outputs(multi_rank_runs[1][0])
    assert len(one) == 2
    staged = os.path.join(os.path.dirname(multi_rank_runs[2][0]), "node-local", os.path.basename(llama))
    assert os.path.exists(os.path.join(staged, ".mpicorr-staged.json"))
    assert sorted(os.listdir(staged)) == sorted([".mpicorr-staged.json", *os.listdir(llama)])
    for ranks in (2, 3):
        assert outputs(multi_rank_runs[ranks][0]) == one, f"{ranks} ranks differ from 1"


def test_ranks_give_identical_summaries(multi_rank_runs):
    root1, layers1 = summary.read_summary(os.path.join(multi_rank_runs[1][0], "summary.h5"))
    for ranks in (2, 3):
        root, layers = summary.read_summary(os.path.join(multi_rank_runs[ranks][0], "summary.h5"))
        assert root["ranks"] == ranks and root["perplexity"] == root1["perplexity"]
        for layer, entry in layers1.items():
            for name, value in entry.items():
                if name != "attrs":
                    assert np.array_equal(layers[layer][name], value), (ranks, layer, name)
            assert layers[layer]["attrs"] == entry["attrs"]


def test_plan_is_printed_and_weighted(multi_rank_runs):
    text = multi_rank_runs[3][1].stdout
    # 50 chunks in batches of 2 = 25 units, weights 1, 1, 3 -> 5, 5, 15 units
    assert "[0, 10)" in text and "[10, 20)" in text and "[20, 50)" in text
    assert "perplexity" in text and "ETA" in text


def test_summary_agrees_with_matrices(multi_rank_runs):
    out = multi_rank_runs[2][0]
    root, layers = summary.read_summary(os.path.join(out, "summary.h5"))
    for layer, entry in layers.items():
        header, packed = matrixfile.read_matrix(os.path.join(out, matrixfile.matrix_name(layer)))
        width = header.width
        assert np.array_equal(entry["fire_count"], triangle.diagonal(packed, width))
        hist = entry["active_hist"]
        assert int((np.arange(len(hist)) * hist).sum()) == int(entry["fire_count"].sum())
        assert int(hist.sum()) == root["tokens"] == entry["attrs"]["tokens"]
        full = triangle.unpack(packed, width).astype(np.int64)
        np.fill_diagonal(full, 0)
        for i in (0, width // 2, width - 1):
            partners = entry["top_partners"][i]
            counts = entry["top_partner_counts"][i]
            assert np.array_equal(counts, full[i, partners])
            assert list(counts) == sorted(full[i], reverse=True)[:16]
        assert entry["attrs"]["dead"] == int((entry["fire_count"] == 0).sum())


def test_config_file_and_overrides(llama, sample_path, tmp_path):
    (tmp_path / "mpicorr.toml").write_text(
        f'model = "{llama}"\ndata = "{sample_path}"\nout = "o"\nctx = {CTX}\nchunks = 5\n')
    ok(run_cli([], cwd=str(tmp_path)))
    root, _ = summary.read_summary(str(tmp_path / "o" / "summary.h5"))
    assert (root["chunks"], root["ctx"]) == (5, CTX)
    ok(run_cli(["--chunks", "2", "--out", "p"], cwd=str(tmp_path)))
    root, _ = summary.read_summary(str(tmp_path / "p" / "summary.h5"))
    assert root["chunks"] == 2


def test_plan_command_matches_hand_computed_table(llama, sample_path, tmp_path):
    (tmp_path / "hostfile").write_text("gpu01 slots=2 # weight=2\ngpu02 slots=1\n")
    result = ok(run_cli(["plan", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "-n", "3"],
                        cwd=str(tmp_path)))
    rows = [line.split() for line in result.stdout.splitlines()[2:5]]
    # 50 chunks, weights 2, 2, 1: quotas 20, 20, 10; gpu01 and gpu02 are not this machine: the device --device
    # auto would take on a node with GPUs, or the CPU (tests/test_preview.py)
    assert rows == [["0", "gpu01", "cuda:0", "or", "cpu", "2", "[0,", "20)", "20"],
                    ["1", "gpu01", "cuda:1", "or", "cpu", "2", "[20,", "40)", "20"],
                    ["2", "gpu02", "cuda:0", "or", "cpu", "1", "[40,", "50)", "10"]]
    assert result.stdout.startswith(f"{sample_path}: 50 chunks of {CTX} tokens")


def test_demo_runs_offline_with_and_without_mpirun(tmp_path):
    serial = ok(run_cli(["demo", "--out", str(tmp_path / "one")]))
    assert "building a tiny random-weight model" in serial.stdout and "statistics in" in serial.stdout
    ok(run_cli(["demo", "--out", str(tmp_path / "two")], ranks=2))
    assert outputs(str(tmp_path / "one")) == outputs(str(tmp_path / "two"))
    assert len(outputs(str(tmp_path / "one"))) == 2 and (tmp_path / "two" / "summary.h5").exists()
    again = ok(run_cli(["demo", "--out", str(tmp_path / "one")]))  # reuses the model, overwrites outputs
    assert "building" not in again.stdout


def test_demo_refuses_a_folder_holding_another_run(llama, sample_path, tmp_path):
    """`demo --out` replaces only an earlier demo's outputs: before, it deleted a real run's there (the demo
    always runs with force) without being asked to. Nor does it build its model over a model/ folder of the
    user's (before: tiny.build wrote over model.safetensors there)."""
    out = tmp_path / "real"
    ok(run_main(["run", "--model", llama, "--data", sample_path, "--out", str(out), "--ctx", str(CTX), "--chunks",
                 "2", "--threshold", "0.25,0.5"]))
    before = {p: open(p, "rb").read() for p in map(str, out.rglob("*")) if os.path.isfile(p)}
    result = run_main(["demo", "--out", str(out)])
    assert result.returncode == 2 and "--out" in result.stderr and "not a demo" in result.stderr, result.stderr
    assert {p: open(p, "rb").read() for p in map(str, out.rglob("*")) if os.path.isfile(p)} == before
    mine = tmp_path / "home" / "model" / "model.safetensors"  # a folder named model/ of the user's
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's weights")
    result = run_main(["demo", "--out", str(tmp_path / "home")])
    assert result.returncode == 2 and "is not the demo's model" in result.stderr, result.stderr
    assert mine.read_bytes() == b"the user's weights" and os.listdir(mine.parent) == ["model.safetensors"]


@pytest.mark.parametrize("kernel", ["gemm", "popcount", "sparse"])
def test_every_kernel_gives_the_same_bytes(llama, sample_path, tmp_path, kernel):
    common = ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "6", "--batch-size", "2"]
    for name, extra in [("auto", []), (kernel, ["--kernel", kernel])]:
        result = run_main(common + ["--out", str(tmp_path / name), *extra])
        assert result.returncode == 0, result.stderr
    assert outputs(str(tmp_path / kernel)) == outputs(str(tmp_path / "auto"))


def hub_cache(tmp_path, model_dir: str, repo: str) -> str:
    """A Hugging Face hub cache holding `model_dir` as `repo` (the layout `hf download` leaves)."""
    cache = tmp_path / "hub"
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return str(cache)


def test_hub_id_runs_offline_from_the_local_cache(llama, sample_path, tmp_path):
    """HF_HUB_OFFLINE=1: a hub id is read from the cache (and staged by its name); a missing one is one line."""
    env = {**cli_env(), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub_cache(tmp_path, llama, "mpicorr-test/tiny")}
    args = ["--data", sample_path, "--ctx", str(CTX), "--chunks", "4", "--device", "cpu"]

    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "mpicorr", "run", *args, *extra], capture_output=True,
                              text=True, env=env, cwd=str(tmp_path), timeout=300)

    ok(cli("--model", "mpicorr-test/tiny", "--out", str(tmp_path / "hub"), "--stage-model", str(tmp_path / "local")))
    ok(cli("--model", llama, "--out", str(tmp_path / "folder")))
    assert outputs(str(tmp_path / "hub")) == outputs(str(tmp_path / "folder"))
    assert os.path.exists(tmp_path / "local" / "mpicorr-test--tiny" / "config.json")
    result = cli("--model", "mpicorr-test/absent", "--out", str(tmp_path / "absent"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--model mpicorr-test/absent" in result.stderr and "hf download mpicorr-test/absent" in result.stderr


def test_every_family_and_site_under_mpirun(tiny_models, sample_path, tmp_path):
    """Each family's runs (every site it has) under the real mpirun -n 2 give the bytes of the in-process
    1-rank runs that test_counts_equal_brute_force_reference checks against the brute-force reference."""
    if MPIRUN is None:
        pytest.skip("mpirun not found")
    common = ["--data", sample_path, "--ctx", str(CTX), "--chunks", "5", "--device", "cpu"]
    jobs = [(f, s, ["run", "--model", tiny_models[f], "--site", s, *common]) for f, s in FAMILY_SITES]
    argvs = [args + ["--out", str(tmp_path / f"{f}-{s}-2")] for f, s, args in jobs]
    result = subprocess.run([MPIRUN, "--oversubscribe", "-n", "2", sys.executable,
                             os.path.join(os.path.dirname(__file__), "many_runs.py"), json.dumps(argvs)],
                            capture_output=True, text=True, env=cli_env(), timeout=600, cwd=str(tmp_path))
    ok(result)
    for f, s, args in jobs:
        ok(run_main(args + ["--out", str(tmp_path / f"{f}-{s}-1")]))
        assert outputs(str(tmp_path / f"{f}-{s}-2")) == outputs(str(tmp_path / f"{f}-{s}-1")), (f, s)


def test_several_thresholds_in_one_pass_under_mpirun(llama, sample_path, tmp_path):
    """--threshold 1,0.25,0.5 with 2 ranks writes, per threshold, the bytes of a 1-rank run at that threshold."""
    base = ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "14", "--batch-size", "2"]
    multi = str(tmp_path / "multi")
    ok(run_cli(base + ["--out", multi, "--threshold", "1,0.25,0.5"], ranks=2))
    assert sorted(os.listdir(multi)) == ["run.json", "threshold-0.25", "threshold-0.5", "threshold-1.0"]
    density = []
    for t in ("0.25", "0.5", "1.0"):
        single = str(tmp_path / t)
        ok(run_main(base + ["--out", single, "--threshold", t]))
        part = os.path.join(multi, f"threshold-{t}")
        assert len(outputs(single)) == 2 and outputs(part) == outputs(single), t
        same_summaries(part, single)
        density.append(summary.read_summary(os.path.join(part, "summary.h5"))[1][0]["attrs"]["density"])
    assert density[0] > density[1] > density[2] > 0
    assert "threshold-0.25" in ok(run_main(["verify", multi])).stdout
