"""The SLURM scripts on a real one-node SLURM: outputs byte-identical to a plain mpirun run.

Runs where `sbatch` answers, or anywhere with MPICORR_SLURM_TEST=1, which first runs
tests/slurm/cluster.sh (installs slurm-wlm and munge with apt-get when missing, as root; CI does this).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, cli_env, run_cli
from test_pipeline import outputs

WAIT_S = 600


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("MPICORR_SLURM_TEST") == "1":
        subprocess.run(["bash", os.path.join(ROOT, "tests", "slurm", "cluster.sh")], check=True, timeout=900)
    elif shutil.which("sbatch") is None:
        pytest.skip("no SLURM here; MPICORR_SLURM_TEST=1 installs and starts a one-node cluster (root, apt)")
    if subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        pytest.skip("sbatch is installed but no SLURM controller answers")


def submit(args: list[str], cwd: str, **env: str) -> str:
    """sbatch ARGS from cwd (the job sees the repository's slurm/ through MPICORR_SLURM_DIR); the job id."""
    job_env = {**cli_env(), "MPICORR_PYTHON": sys.executable, "MPICORR_SLURM_DIR": os.path.join(ROOT, "slurm"),
               **env}
    result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=job_env, cwd=cwd,
                            check=True)
    return result.stdout.strip().split(";")[0]


def wait_for(cwd: str, *jobs: str) -> None:
    """Until none of the jobs (or jobs they submitted, like the merge) is queued or running."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout
        if not any(line.split()[0].split("_")[0] in jobs or "mpicorr" in line for line in queue.splitlines()):
            return
        time.sleep(2)
    logs = "\n".join(open(os.path.join(cwd, f)).read()[-2000:] for f in os.listdir(cwd) if f.endswith(".log"))
    pytest.fail(f"SLURM jobs {jobs} still queued after {WAIT_S} s\n{logs}")


def logs(cwd: str) -> str:
    return "\n".join(f"--- {f}\n" + open(os.path.join(cwd, f)).read()[-3000:]
                     for f in sorted(os.listdir(cwd)) if f.endswith(".log"))


def test_sbatch_scripts_match_plain_mpirun(cluster, llama, sample_path, tmp_path):
    run_args = ["--model", llama, "--data", sample_path, "--ctx", "64", "--chunks", "10", "--device", "cpu"]
    plain = tmp_path / "plain"
    result = run_cli(["run", *run_args, "--out", str(plain)], ranks=2)
    assert result.returncode == 0, result.stderr
    cwd = str(tmp_path)
    one = submit(["--ntasks=2", os.path.join(ROOT, "slurm", "mpicorr.sbatch"), *run_args, "--out", "one"], cwd)
    array = submit(["--array=0-2", "--ntasks=1", os.path.join(ROOT, "slurm", "array.sbatch"), *run_args,
                    "--out", "arr"], cwd, MPICORR_LAUNCH="mpirun")
    wait_for(cwd, one, array)
    assert outputs(str(tmp_path / "one")) == outputs(str(plain)), logs(cwd)
    assert sorted(os.listdir(tmp_path / "arr")) == [".merge-submitted", "merged", "part-0", "part-1", "part-2"]
    assert outputs(str(tmp_path / "arr" / "merged")) == outputs(str(plain)), logs(cwd)
    assert os.path.exists(tmp_path / f"mpicorr-{one}.log") and os.path.exists(tmp_path / f"mpicorr-{array}-merge.log")
    assert "3 runs merged, chunks [0, 10)" in open(tmp_path / f"mpicorr-{array}-merge.log").read()


def test_hostfile_helper_expands_tasks_per_node(tmp_path):
    """slurm/hostfile.sh with a stand-in scontrol: '2(x2),1' gives 2, 2 and 1 slots; weights as comments."""
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\nprintf 'gpu01\\ngpu02\\ncpu07\\n'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[01-02],cpu07",
           "SLURM_TASKS_PER_NODE": "2(x2),1", "SLURM_JOB_ID": "42", "MPICORR_WEIGHTS": "gpu02=3"}
    result = subprocess.run(["bash", os.path.join(ROOT, "slurm", "hostfile.sh")], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "hostfile.42", result.stderr
    assert (tmp_path / "hostfile.42").read_text().splitlines() == [
        "gpu01 slots=2", "gpu02 slots=2  # weight=3", "cpu07 slots=1"]
    from mpicorr import plan
    hosts = plan.parse_hostfile((tmp_path / "hostfile.42").read_text())
    assert [(h.host, h.slots, h.weight) for h in hosts] == [("gpu01", 2, 1.0), ("gpu02", 2, 3.0), ("cpu07", 1, 1.0)]


def array_task(tmp_path, args: list[str], task: int, first: int, count: int, last: int | None = None,
               status: int = 0) -> list[str]:
    """slurm/array.sbatch ARGS as task `task` of an array of `count` tasks from `first` (step 1) to `last` (a
    list when that is not first + count - 1), with stand-ins for sbatch and launch.sh that print their
    arguments; its output lines (its log), or with `status` != 0 its error lines."""
    for name in ("sbatch", "launch.sh"):
        (tmp_path / name).write_text(f'#!/bin/sh\necho {name} "$@"\n')
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "MPICORR_SLURM_DIR": str(tmp_path),
           "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(first),
           "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_ARRAY_JOB_ID": "7",
           "SLURM_ARRAY_TASK_MAX": str(first + count - 1 if last is None else last)}
    result = subprocess.run(["bash", os.path.join(ROOT, "slurm", "array.sbatch"), *args], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert result.returncode == status, result.stdout + result.stderr
    return (result.stderr if status else result.stdout).splitlines()


def test_an_array_given_as_a_list_is_refused(tmp_path):
    """--array=1,3,7: part K is computed from the task id as if the ids were a range, so task 3 counted part 2/3
    and task 7 part 6/3 (refused by the run), part 1 by no task, and the merge never ran; now every task ends
    at once with one line saying to submit a range. No part is started and no merge submitted."""
    lines = array_task(tmp_path, ["--model", "M", "--out", "runs/big"], 3, 1, 3, last=7, status=2)
    assert lines == ["array.sbatch: --array must be a range (--array=A-B or A-B:S, with %M if you like), not a "
                     "list; resubmit with --array=0-2"]


@pytest.mark.parametrize("out", [["--out", "runs/big"], ["--out=runs/big"]])
def test_array_script_takes_out_in_either_spelling(tmp_path, out):
    """slurm/array.sbatch with stand-ins for sbatch and launch.sh: task K writes OUT/part-K and the merge
    reads OUT/part-*, whether --out is given as '--out DIR' or '--out=DIR' (the latter once reached every
    task unchanged, so all tasks wrote DIR itself and the merge found no parts)."""
    _, sbatch, launch = array_task(tmp_path, ["--model", "M", *out, "--data", "D"], 0, 0, 2)
    assert "sum 'runs/big/merged' 'runs/big'/part-*" in sbatch
    assert launch == "launch.sh --part 0/2 --out runs/big/part-0 --resume --model M --data D"
    assert not os.path.exists(tmp_path / "runs" / "7")


def test_an_array_task_log_names_its_part(tmp_path):
    """The log is named by SLURM's task id (mpicorr-<array id>_<task id>.log), which is the part K only for an
    array from 0: task 5 of --array=4-7 counts part 1/4. Its log's first line says so, so a user finds the
    log of part K (the README said the logs were mpicorr-<array id>_<K>.log)."""
    lines = array_task(tmp_path, ["--model", "M", "--out", "runs/big"], 5, 4, 4)
    assert lines == ["mpicorr array job 7 task 5: part 1/4 into runs/big/part-1",
                     "launch.sh --part 1/4 --out runs/big/part-1 --resume --model M"]
    assert "#SBATCH --output=mpicorr-%A_%a.log" in open(os.path.join(ROOT, "slurm", "array.sbatch")).read()


def test_sbatch_scripts_ask_for_sigterm_before_the_time_limit():
    """mpicorr saves a checkpoint on SIGTERM while counting; SLURM sends one before the kill only when asked
    (--signal), with time to finish a batch and save."""
    for name in ("mpicorr.sbatch", "array.sbatch"):
        text = open(os.path.join(ROOT, "slurm", name)).read()
        assert "#SBATCH --signal=TERM@120" in text, name
