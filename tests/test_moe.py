"""Mixture of experts: a tiny Mixtral whose routing is known by construction, under the real mpirun; merging
MoE runs; checkpoints of expert and router counts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mpicorr import checkpoint, summary, tiny
from mpicorr.counting import MoeCounts, units
from mpicorr.models import Routed
from conftest import run_cli, run_main
from test_pipeline import ok, outputs, same_summaries

CTX = 64


@pytest.fixture(scope="module")
def known_routing(tmp_path_factory) -> str:
    """A tiny Mixtral whose routers send every token to experts {0, 1} or to {2, 3} (by the sign of one
    direction of its hidden state), and whose experts 0 and 1 are the same function."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path_factory.mktemp("moe")
    plain = tiny.build("mixtral", str(base / "plain"), seed=5)
    model = AutoModelForCausalLM.from_pretrained(plain)
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.model.layers:
            u = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0) * 10
            block.mlp.gate.weight.copy_(torch.stack([u, u, -u, -u]))
            block.mlp.experts.gate_up_proj[1] = block.mlp.experts.gate_up_proj[0]
    folder = str(base / "known")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(plain).save_pretrained(folder)
    return folder


def args(model: str, out: str, *extra: str) -> list[str]:
    return ["run", "--model", model, "--data", tiny.sample_path(), "--out", out, "--ctx", str(CTX),
            "--chunks", "12", "--batch-size", "2", *extra]


def test_known_routing_under_mpirun(known_routing, tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    ok(run_cli(args(known_routing, two), ranks=2))
    ok(run_main(args(known_routing, one)))
    assert outputs(two) == outputs(one) and len(outputs(one)) == 8   # 2 blocks x 4 experts, no dense block
    same_summaries(two, one)
    experts, routers = summary.read_moe(os.path.join(two, "summary.h5"))
    tokens = 12 * CTX
    for layer, router in routers.items():
        load, co = router["load"].astype(np.int64), router["coselect"].astype(np.int64)
        assert router["attrs"]["tokens"] == tokens and router["attrs"]["selected_per_token"] == 2.0
        assert load[0] == load[1] == co[0, 1] and load[2] == load[3] == co[2, 3]
        assert load[0] + load[2] == tokens and 0 < load[0] < tokens, "both halves of the routing are used"
        assert co[0, 2] == co[0, 3] == co[1, 2] == co[1, 3] == 0
        assert [experts[layer, e]["attrs"]["tokens"] for e in range(4)] == load.tolist()
        # experts 0 and 1 see the same tokens and compute the same function: the same file, byte for byte
        same = [open(os.path.join(two, f"correlations_block_{layer}_expert_{e}.zstd"), "rb").read() for e in (0, 1)]
        assert same[0] == same[1]
    assert "8 experts" in ok(run_main(["verify", two])).stdout


def test_moe_parts_sum_to_one_run(known_routing, tmp_path):
    whole = str(tmp_path / "whole")
    ok(run_main(args(known_routing, whole)))
    parts = [str(tmp_path / f"p{k}") for k in range(2)]
    for k, part in enumerate(parts):
        ok(run_main(args(known_routing, part, "--part", f"{k}/2")))
    merged = str(tmp_path / "merged")
    ok(run_main(["sum", merged, *parts]))
    assert outputs(merged) == outputs(whole)
    same_summaries(merged, whole)
    got, want = (summary.read_moe(os.path.join(f, "summary.h5")) for f in (merged, whole))
    for layer in want[1]:
        assert np.array_equal(got[1][layer]["coselect"], want[1][layer]["coselect"])
        assert got[1][layer]["attrs"] == want[1][layer]["attrs"]
    for key, entry in want[0].items():
        assert np.array_equal(got[0][key]["act_hist"], entry["act_hist"]) and got[0][key]["attrs"] == entry["attrs"]


def test_moe_counts_survive_a_checkpoint(tmp_path):
    """Expert and router counts written by checkpoint.write and read back add up to the same sums."""
    rng = torch.Generator().manual_seed(3)
    counts = MoeCounts(2, 3, 5, (0.5, 1.0), torch.int32, "cpu")
    for _ in range(3):
        picks = torch.stack([torch.randperm(3, generator=rng)[:2] for _ in range(7)])
        selected = torch.zeros(7, 3).scatter_(1, picks, 1.0)
        acts = [(e, torch.randn(int(selected[:, e].sum()), 5, generator=rng)) for e in range(3) if selected[:, e].any()]
        counts.add(Routed(selected, acts))
    names = [lc.unit.name for lc in units([counts])]
    assert names == ["block_2_expert_0", "block_2_expert_1", "block_2_expert_2", "block_2_router"]
    assert counts.router.fire_count.sum(1).tolist() == [42, 42] and counts.router.active_hist[0, 2] == 21
    ident = {"threshold": [0.5, 1.0]}
    ck = checkpoint.Checkpoint(str(tmp_path / "g1-r0.ckpt"), ident, [(0, 3)], 0, 0,
                               [(n, lc.width) for n, lc in zip(names, units([counts]))], "<i4", [])
    checkpoint.write(ck.path, ck, ((lc.packed(), lc.stats()) for lc in units([counts])))
    again = MoeCounts(2, 3, 5, (0.5, 1.0), torch.int32, "cpu")
    for lc, (pairs, stats) in zip(units([again]), checkpoint.read_layers(checkpoint.read_header(ck.path))):
        lc.load(pairs, stats)
    for a, b in zip(units([again]), units([counts])):
        assert np.array_equal(a.stats(), b.stats())
        assert all(np.array_equal(x, y) for x, y in zip(a.packed(), b.packed()))


def test_analysis_scripts_take_an_expert(known_routing, tmp_path):
    from test_analysis import script

    run = str(tmp_path / "run")
    ok(run_main(args(known_routing, run)))
    refused = script("firing.py", run)
    assert refused.returncode == 2 and "--expert E" in refused.stderr and refused.stderr.count("\n") == 1
    experts, _ = summary.read_moe(os.path.join(run, "summary.h5"))
    lines = script("firing.py", run, "--expert", "2", "--thresholds", "0.5", "--out", tmp_path / "fig").stdout
    rows = [line.split() for line in lines.splitlines()[1:3]]
    # the per-layer table (layer, width, density, ...): expert 2's, over the tokens routed to it
    assert [int(r[0]) for r in rows] == [0, 1]
    assert [r[2] for r in rows] == [f"{experts[layer, 2]['attrs']['density']:.4f}" for layer in (0, 1)]
    assert lines.splitlines()[-3:-1] == [f"{layer:5d}  {float(r[2]):8.4f}" for layer, r in zip((0, 1), rows)]
    ok(script("heatmap.py", run, "--expert", "3", "--layers", "1", "--pixels", "16", "--out", tmp_path / "fig"))
    missing = script("heatmap.py", run, "--expert", "7")
    assert missing.returncode == 2 and "correlations_block_<L>_expert_7.zstd" in missing.stderr


def test_routers_script_shows_the_known_routing(known_routing, tmp_path):
    from test_analysis import is_png, script

    run = str(tmp_path / "run")
    ok(run_main(args(known_routing, run)))
    lines = ok(script("routers.py", run, "--out", tmp_path / "fig")).stdout.splitlines()
    assert lines[0].split()[:3] == ["layer", "experts", "tokens"] and is_png(tmp_path / "fig" / "routers.png")
    _, routers = summary.read_moe(os.path.join(run, "summary.h5"))
    for line, (layer, router) in zip(lines[1:3], routers.items()):
        load = router["load"].astype(np.int64)
        tokens = 12 * CTX
        # experts 0 and 1 (or 2 and 3) always go together: the most over-represented pair is one of them
        # with lift tokens / load, against 0 for the pairs across the halves
        best = max(tokens / load[0], tokens / load[2])
        cols = line.split()
        assert int(cols[0]) == layer and int(cols[2]) == tokens and cols[5] in ("0-1", "2-3")
        assert float(cols[6]) == pytest.approx(best, abs=0.006)
    dense = str(tmp_path / "dense")
    ok(run_main(["run", "--model", tiny.build("llama", str(tmp_path / "llama")), "--data", tiny.sample_path(),
                 "--out", dense, "--ctx", str(CTX), "--chunks", "2"]))
    refused = script("routers.py", dense)
    assert refused.returncode == 2 and "no mixture-of-experts blocks" in refused.stderr
