"""--schedule dynamic against static: the same bytes, and a slow rank does less; whole-job progress; run.json."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from conftest import MPIRUN, ROOT, cli_env, run_cli
from mpicorr import schedule
from mpicorr.progress import JobProgress
from test_pipeline import ok, outputs

CTX = 64


def test_queue_and_coordinator():
    progress = JobProgress(6, CTX, 2, every=0.0, stream=io.StringIO())
    coord = schedule.Coordinator(schedule.WorkQueue([(0, 2), (2, 4), (4, 6)]), progress)
    assert [coord(1, ("next",)), coord(0, ("next",)), coord(1, ("next",)), coord(0, ("next",))] == \
        [(0, 2), (2, 4), (4, 6), None]
    coord(1, ("done", 2))
    coord(0, ("done", 4))
    lines = progress.stream.getvalue().splitlines()
    assert lines[0].startswith("mpicorr: chunk 2/6 (33%) on 2 rank(s)") and "ETA" in lines[0]
    assert lines[1].startswith("mpicorr: chunk 6/6 (100%)")
    assert progress.by_rank == [4, 2]


def test_rank_table():
    reports = [schedule.RankReport(0, "a", "cuda:0", 30, 10.0), schedule.RankReport(1, "b", "cpu", 10, 20.0)]
    rows = schedule.rank_rows(reports, 20.0, 512)
    assert rows[0]["tokens_per_s"] == 30 * 512 / 10 and rows[0]["busy_percent"] == 50.0
    assert rows[1]["busy_percent"] == 100.0 and rows[1]["tokens"] == 5120
    assert schedule.format_rows(rows).splitlines()[1].split() == ["0", "a", "cuda:0", "30", "1,536", "50%"]


def slowed_run(llama, sample_path, out, ranks, rank, delay, *extra):
    cmd = [MPIRUN, "--oversubscribe", "-n", str(ranks), sys.executable, os.path.join(ROOT, "tests", "slow_rank.py"),
           str(rank), str(delay), "run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "24",
           "--out", str(out), "--device", "cpu", *extra]
    return ok(subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300, cwd=os.path.dirname(out)))


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")
@pytest.mark.parametrize("ranks", [2, 3])
def test_dynamic_equals_static_and_a_slow_rank_does_less(llama, sample_path, tmp_path, ranks):
    static = tmp_path / "static"
    ok(run_cli(["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "24",
                "--out", str(static), "--device", "cpu"]))
    dynamic = tmp_path / "dynamic"
    result = slowed_run(llama, sample_path, str(dynamic), ranks, 1, 0.25, "--schedule", "dynamic")
    assert outputs(str(dynamic)) == outputs(str(static))
    doc = json.load(open(dynamic / "run.json"))
    chunks = [r["chunks"] for r in doc["ranks"]]
    assert doc["schedule"] == "dynamic" and sum(chunks) == 24
    # The slow rank does no more than any other and less than the fastest. (Not "less than every other": with
    # 3 ranks on 2 cores a fast rank that starts late can get as little as the slow one, e.g. [22, 1, 1].)
    others = [c for r, c in enumerate(chunks) if r != 1]
    assert chunks[1] <= min(others) and chunks[1] < max(others), chunks
    assert "dynamic schedule: 24 batches" in result.stdout
    assert f"chunk 24/24 (100%) on {ranks} rank(s)" in result.stdout  # every rank's chunks reach rank 0
    table = result.stdout[result.stdout.index("rank  host  device  chunks"):].splitlines()
    assert [line.split()[3] for line in table[1 : ranks + 1]] == [str(c) for c in chunks]


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found")
def test_static_slow_rank_shows_in_run_json(llama, sample_path, tmp_path):
    out = tmp_path / "static2"
    result = slowed_run(llama, sample_path, str(out), 2, 1, 0.1)
    doc = json.load(open(out / "run.json"))
    assert doc["schedule"] == "static" and [r["chunks"] for r in doc["ranks"]] == [12, 12]
    assert doc["ranks"][0]["busy_percent"] < doc["ranks"][1]["busy_percent"]  # rank 0 waited for rank 1
    assert "chunk 24/24 (100%) on 2 rank(s)" in result.stdout


def test_live_progress_redraws_one_line(monkeypatch):
    stream = io.StringIO()
    progress = JobProgress(4, CTX, 1, stream=stream, live=True)
    progress.every = 0.0
    for _ in range(4):
        progress.update(0, 1)
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "[########################] chunk 4/4 (100%)" in text
    from mpicorr import __main__ as cli
    monkeypatch.setattr(cli.sys.stdout, "isatty", lambda: True, raising=False)
    for var in cli.LAUNCHER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert cli.live_progress()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")  # mpirun gives ranks a pty: no live bar in its logs
    assert not cli.live_progress()
