"""`python -m mpicorr plan` (mpicorr/preview.py) says what the run would do: the dynamic queue rather than shares,
the devices the run would take, what staging would copy where, and the run's refusals it can see."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from mpicorr import preview
from conftest import run_main

CTX = 64
HOSTS = "gpu01 slots=2 # weight=2\ngpu02 slots=1\n"  # hosts that are not this machine


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def plan(llama: str, data: str, tmp_path, *extra: str, hosts: str | None = None, ranks: int = 3) -> str:
    """plan's output for RANKS ranks, with HOSTS as the hostfile (none without)."""
    hostfile = ["--hostfile", "none"]
    if hosts is not None:
        (tmp_path / "hosts").write_text(hosts)
        hostfile = ["--hostfile", str(tmp_path / "hosts")]
    return ok(run_main(["plan", "--model", llama, "--data", data, "--ctx", str(CTX), "-n", str(ranks), *hostfile,
                        *extra])).stdout


def table(text: str) -> list[list[str]]:
    """The rank table's rows (split at runs of two or more spaces: a device may read 'cuda:0 or cpu')."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rank  host"))
    rows = []
    for line in lines[start + 1:]:
        if not line[:1].isdigit():
            break
        rows.append([cell for cell in line.split("  ") if cell.strip()])
    return [[c.strip() for c in row] for row in rows]


def test_dynamic_plan_shows_the_queue_not_static_shares(llama, sample_path, tmp_path):
    """--schedule dynamic once printed the static split by weight ([0, 20) for rank 0 ...), which a dynamic run
    never follows; it now lists the batches in the order rank 0 hands them out and no per-rank ranges. The
    static plan is as it was."""
    shown = plan(llama, sample_path, tmp_path, "--schedule", "dynamic", "--batch-size", "4", hosts=HOSTS)
    assert "on 3 rank(s), --schedule dynamic (no weights);" in shown.splitlines()[0]
    assert ("dynamic schedule: 13 batches of up to 4 chunk(s), 50 chunks, handed out in this order as ranks ask: "
            "[0, 4) [4, 8) [8, 12) ... [44, 48) [48, 50); a rank asks for the next when it is free") in shown
    assert table(shown) == [["0", "gpu01", "cuda:0 or cpu"], ["1", "gpu01", "cuda:1 or cpu"],
                            ["2", "gpu02", "cuda:0 or cpu"]]
    assert "[0, 20)" not in shown and "weight" not in shown.split("rank  host")[1]
    static = plan(llama, sample_path, tmp_path, "--batch-size", "4", hosts=HOSTS)
    assert "weights from" in static.splitlines()[0] and "dynamic schedule" not in static
    # 13 batches, weights 2, 2, 1: quotas 5.2, 5.2, 2.6 -> 5, 5, 3 batches
    assert [row[3:] for row in table(static)] == [["2", "[0, 20)", "20"], ["2", "[20, 40)", "20"],
                                                  ["1", "[40, 50)", "10"]]


@pytest.mark.parametrize("gpus,extra,ranks,devices,refusal", [
    (0, [], 3, ["cpu", "cpu", "cpu"], None),
    (2, [], 2, ["cuda:0", "cuda:1"], None),
    (2, [], 3, ["cuda:0", "cuda:1", "cuda:0"], "--device auto: ranks 0 and 2 on {host} would share GPU cuda:0"),
    (0, ["--device", "cuda"], 2, ["-", "-"], "rank 0 on localhost: --device cuda: CUDA is not available"),
    (4, ["--gpus-per-rank", "2"], 2, ["cuda:0,1", "cuda:2,3"], None),
    (2, ["--gpus-per-rank", "2"], 2, ["cuda:0,1", "-"], "rank 1 on localhost: --gpus-per-rank 2: local rank 1"),
])
def test_plan_devices_on_this_machine_are_the_runs(llama, sample_path, tmp_path, monkeypatch, gpus, extra, ranks,
                                                   devices, refusal):
    """plan printed 'gpu N' for every rank whatever the machine had; for ranks on this machine it now shows the
    devices run would take (models.devices_for, with this machine's GPU count, faked here) and the run's refusal."""
    monkeypatch.setattr(preview, "gpus_here", lambda: gpus)
    shown = plan(llama, sample_path, tmp_path, *extra, hosts="localhost\n", ranks=ranks)
    assert [row[2] for row in table(shown)] == devices
    refusals = [line for line in shown.splitlines() if line.startswith("the run would refuse to start: ")]
    host = preview.plan.short(socket.gethostname())
    assert refusals == ([] if refusal is None else [refusals[0]]) and (refusal is None or
                                                                       refusal.format(host=host) in refusals[0])


def test_plan_device_is_the_one_the_run_takes(llama, sample_path, tmp_path):
    """On this machine, with the real GPU count: plan's device column equals the run's opening table."""
    (tmp_path / "hostfile").write_text("localhost\n")
    common = ["--model", llama, "--data", sample_path, "--ctx", str(CTX), "--hostfile", str(tmp_path / "hostfile")]
    shown = ok(run_main(["plan", *common])).stdout
    ran = ok(run_main(["run", *common, "--chunks", "1", "--out", str(tmp_path / "out")])).stdout
    assert table(shown)[0][2] == table(ran)[0][2] == ("cuda:0" if preview.gpus_here() else "cpu")


def test_plan_names_other_hosts_devices_as_unknown(llama, sample_path, tmp_path):
    shown = plan(llama, sample_path, tmp_path, hosts=HOSTS)
    assert [row[2] for row in table(shown)] == ["cuda:0 or cpu", "cuda:1 or cpu", "cuda:0 or cpu"]
    assert "devices: plan cannot see the GPUs of gpu01, gpu02 (not this machine)" in shown
    assert [row[2] for row in table(plan(llama, sample_path, tmp_path, "--device", "cpu", hosts=HOSTS))] == ["cpu"] * 3
    shown = plan(llama, sample_path, tmp_path)
    assert [row[2] for row in table(shown)] == ["auto"] * 3
    assert "devices: without a hostfile plan cannot know where the ranks run" in shown


def test_plan_says_what_staging_copies_where(llama, sample_path, tmp_path):
    """plan ignored --stage-data: it now says what rank 0 would copy, how much, to which folder on which nodes
    and what every rank then reads, copying nothing; and a copy the run would refuse is named as the run
    names it."""
    corp = tmp_path / "corp"
    (corp / "sub").mkdir(parents=True)
    shutil.copy(sample_path, corp / "a.txt")
    shutil.copy(sample_path, corp / "sub" / "b.txt")
    scratch = tmp_path / "scratch"
    shown = plan(llama, str(corp), tmp_path, "--stage-data", str(scratch), "--device", "cpu", hosts=HOSTS)
    size = 2 * os.path.getsize(sample_path)
    line = next(line for line in shown.splitlines() if line.startswith("--stage-data: "))
    assert line.startswith(f"--stage-data: rank 0 copies --data's shards, 2 file(s), {size / 1e3:.1f} kB, to "
                           f"{scratch / 'corp'} on each of gpu01, gpu02 (one rank per node receives them")
    assert line.endswith(f"every rank then reads {scratch / 'corp' / 'a.txt'} (and 1 more file(s) there)")
    assert "would refuse" not in shown and not scratch.exists()
    inside = str(corp / "local")
    shown = plan(llama, str(corp), tmp_path, "--stage-data", inside, "--device", "cpu", ranks=1)
    refusal = next(line for line in shown.splitlines() if line.startswith("the run would refuse to start: "))
    run = run_main(["run", "--model", llama, "--data", str(corp), "--ctx", str(CTX), "--stage-data", inside,
                    "--device", "cpu", "--out", str(tmp_path / "out")])
    assert run.returncode == 2 and "lie one inside the other" in refusal
    assert run.stderr.strip() == "mpicorr: error: " + refusal.removeprefix("the run would refuse to start: ")
