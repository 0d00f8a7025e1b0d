"""User-facing failures: one line on stderr, exit status 2, nothing written, every rank ends."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import cli_env, run_cli, run_main, MPIRUN
from mpicorr import outputs as output_files
from mpicorr.errors import UserError
from test_pipeline import outputs

CTX = 64


def one_error_line(result, *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("mpicorr: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(llama, tmp_path_factory) -> dict[str, str]:
    """Inputs that are wrong in one way each."""
    base = tmp_path_factory.mktemp("bad")
    files = {"HOSTFILE0": "localhost slots=1 weight=0\n", "HOSTFILE_SYNTAX": "localhost slots=1 speed=2\n",
             "HOSTFILE_OTHER": "elsewhere slots=1\n", "EMPTY": "", "SHORT": "a few words\n"}
    paths = {}
    for name, text in files.items():
        (base / name).write_text(text)
        paths[name] = str(base / name)
    olmo = base / "olmo"  # a family the registry lacks: the llama weights under another model_type
    shutil.copytree(llama, olmo)
    config = json.loads((olmo / "config.json").read_text())
    config.update(model_type="olmo", architectures=["OlmoForCausalLM"])
    (olmo / "config.json").write_text(json.dumps(config))
    paths["OLMO"] = str(olmo)
    return paths


@pytest.mark.parametrize("args,needles", [
    ([], ["--model is required"]),
    (["--model", "MODEL"], ["--data is required"]),
    (["--model", "/nonexistent/model", "--data", "DATA"], ["/nonexistent/model", "no such folder"]),
    (["--model", "MODEL", "--data", "/nonexistent.txt"], ["--data /nonexistent.txt", "cannot read"]),
    (["--model", "MODEL", "--data", "EMPTY"], ["EMPTY", "the file is empty"]),
    (["--model", "MODEL", "--data", "DATA", "--chunks", "100000"], ["--chunks 100000", "has 50 chunks"]),
    (["--model", "MODEL", "--data", "DATA", "--chunk-start", "50"], ["--chunk-start 50", "only 50 chunks"]),
    (["--model", "MODEL", "--data", "DATA", "--threshold", "-1"], ["--threshold", "positive"]),
    (["--model", "MODEL", "--data", "DATA", "--threshold", "0"], ["--threshold", "positive"]),
    (["--model", "MODEL", "--data", "DATA", "--threshold", "abc"], ["--threshold", "not a positive number"]),
    (["--model", "MODEL", "--data", "DATA", "--threshold", "0.5,,1"], ["--threshold", "'' is not a positive"]),
    (["--model", "MODEL", "--data", "DATA", "--threshold", "0.5,1,0.50"], ["--threshold", "given twice"]),
    (["--model", "MODEL", "--data", "DATA", "--gpus-per-rank", "0"], ["--gpus-per-rank 0", ">= 1"]),
    (["--model", "MODEL", "--data", "DATA", "--gpus-per-rank", "2", "--device", "cpu"],
     ["--gpus-per-rank 2", "needs GPUs"]),
    (["--model", "MODEL", "--data", "SHORT"], ["too short for one chunk"]),
    (["--model", "MODEL", "--data", "DATA", "--ctx", "100000"], ["--ctx 100000", "at most 1024 positions"]),
    (["--model", "MODEL", "--data", "DATA", "--hostfile", "HOSTFILE0"], ["HOSTFILE0:1", "weight '0'"]),
    (["--model", "MODEL", "--data", "DATA", "--hostfile", "HOSTFILE_SYNTAX"], ["HOSTFILE_SYNTAX:1", "speed=2"]),
    (["--model", "MODEL", "--data", "DATA", "--hostfile", "HOSTFILE_OTHER"], ["HOSTFILE_OTHER", "no line for host"]),
    (["--model", "MODEL", "--data", "DATA", "--hostfile", "/nonexistent/hosts"], ["/nonexistent/hosts", "cannot read"]),
    (["--model", "MODEL", "--data", "DATA", "--device", "cuda"], ["CUDA is not available"]),
    (["--model", "MODEL", "--data", "DATA", "--device", "cuda:x"], ["--device 'cuda:x': choose auto, cpu, cuda"]),
    (["--model", "MODEL", "--data", "DATA", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["--model", "MODEL", "--data", "DATA", "--checkpoint-every", "-1"], ["--checkpoint-every", ">= 0"]),
    (["--model", "MODEL", "--data", "DATA", "--part", "4/4"], ["--part '4/4'", "0 <= K < N"]),
    (["--model", "MODEL", "--data", "DATA", "--stage-model", "/proc/mpicorr"], ["--stage-model", "cannot create"]),
    (["--model", "MODEL", "--data", "DATA", "--part", "x"], ["--part 'x'", "e.g. 0/4"]),
    (["--model", "MODEL", "--data", "DATA", "--part", "0/999"], ["--part 0/999", "use at most"]),
    (["--model", "MODEL", "--data", "DATA", "--force", "--resume"], ["--force", "--resume"]),
    (["--model", "OLMO", "--data", "DATA"], ["family 'olmo' is not supported", "--site-module"]),
    (["--model", "GPT2", "--data", "DATA", "--site", "gate"], ["--site gate: gpt2 has no gated MLP", "--site ffn"]),
    (["--model", "MODEL", "--data", "DATA", "--site", "heads", "--site-module", "x"], ["--site-module", "--site heads"]),
    (["--model", "MODEL", "--data", "DATA", "--site", "neurons"], ["--site", "invalid choice"]),
    (["--model", "MODEL", "--data", "DATA", "--site-module", "("], ["--site-module", "not a regular expression"]),
    (["--model", "MODEL", "--data", "DATA", "--site-module", "nothing"], ["--site-module nothing", "matches no"]),
])
def test_bad_input_is_one_line_exit_2(llama, tiny_models, sample_path, bad_files, tmp_path, args, needles):
    subst = {"MODEL": llama, "GPT2": tiny_models["gpt2"], "DATA": sample_path, **bad_files}
    args = [subst.get(a, a) for a in args]
    out = tmp_path / "out"
    result = run_main(["run", *args, "--out", str(out), "--ctx", str(CTX)] if "--ctx" not in args
                      else ["run", *args, "--out", str(out)], cwd=str(tmp_path))
    one_error_line(result, *[subst.get(n, n) for n in needles])
    assert not out.exists()


def test_default_hostfile_is_named_and_hostfile_none_gives_equal_weights(llama, sample_path, tmp_path):
    """A ./hostfile nobody asked for says so in its messages; --hostfile none ignores it."""
    (tmp_path / "hostfile").write_text("elsewhere slots=1\n")
    common = ["--model", llama, "--data", sample_path, "--ctx", str(CTX)]
    label = "./hostfile (read by default; --hostfile none for equal weights)"
    one_error_line(run_main(["plan", "-n", "2", *common], cwd=str(tmp_path)), label, "2 ranks need 2 slots")
    out = tmp_path / "out"
    one_error_line(run_main(["run", *common, "--out", str(out)], cwd=str(tmp_path)), label, "no line for host")
    assert not out.exists()
    result = run_main(["plan", "-n", "2", *common, "--hostfile", "none"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert [line.split()[3] for line in result.stdout.splitlines()[2:4]] == ["1", "1"]
    line = one_error_line(run_main(["plan", "-n", "2", *common, "--hostfile", str(tmp_path / "hostfile")],
                                   cwd=str(tmp_path)), "2 ranks need 2 slots")
    assert "read by default" not in line


def test_site_module_replaces_the_registry(llama, sample_path, bad_files, tmp_path):
    """The registry's sites named by regex give the same bytes; a family the registry lacks then runs."""
    common = ["--data", sample_path, "--ctx", str(CTX), "--chunks", "3"]
    regex = r"model\.layers\.\d+\.mlp\.down_proj"
    for name, model, extra in [("a", llama, []), ("b", llama, ["--site-module", regex]),
                               ("c", bad_files["OLMO"], ["--site-module", regex])]:
        result = run_main(["run", "--model", model, "--out", str(tmp_path / name), *common, *extra])
        assert result.returncode == 0, result.stderr
    assert outputs(str(tmp_path / "a")) == outputs(str(tmp_path / "b"))
    assert sorted(outputs(str(tmp_path / "c"))) == sorted(outputs(str(tmp_path / "a")))


def test_gpu_out_of_memory_names_the_options():
    from mpicorr.config import Config
    from mpicorr.errors import UserError
    from mpicorr.run import guard_memory

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(UserError, match=r"out of memory on cuda:1: lower --batch-size \(now 4\)"):
        guard_memory(oom, Config(model="m", data="d", batch_size=4), "cuda:1")


def test_existing_outputs_are_kept_without_force(llama, sample_path, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--model", llama, "--data", sample_path, "--out", str(out), "--ctx", str(CTX), "--chunks", "2"]
    assert run_cli(args).returncode == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    one_error_line(run_main(args), "already holds outputs", "--force")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert run_main(args + ["--force"]).returncode == 0


def test_output_folders_that_are_files_are_refused_before_counting(llama, sample_path, tmp_path):
    """A file where a run puts a folder (OUT/checkpoints, OUT/threshold-<T>): one line before counting; before,
    FileExistsError (exit 1) once counting was done, when the folder was first made."""
    args = ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "2"]
    for name, extra in (("checkpoints", ["--checkpoint-every", "1"]), ("threshold-0.5", ["--threshold", "0.25,0.5"])):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text("the user's own")
        result = run_main([*args, "--out", str(out), *extra])
        one_error_line(result, f"--out {out}: {out / name} is not a folder")
        assert "chunk " not in result.stdout and sorted(os.listdir(out)) == [name]


def test_a_run_failing_after_making_its_folders_leaves_none(llama, sample_path, tmp_path):
    """A run refused once it has made --out and --dump (here --stage-model finding the user's folder where it
    would copy the model) removes both again, with their missing parents; before, both stayed, empty. A folder
    that existed stays, and so does the user's folder."""
    root = tmp_path / "node-local"
    (root / os.path.basename(llama)).mkdir(parents=True)
    (root / os.path.basename(llama) / "mine.txt").write_text("the user's own")
    out, dump, kept = tmp_path / "new" / "out", tmp_path / "dump", tmp_path / "kept"
    kept.mkdir()
    args = ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "2",
            "--stage-model", str(root)]
    one_error_line(run_main([*args, "--out", str(out), "--dump", str(dump), "--dump-tokens", "8"]),
                   "was not made by --stage-model")
    assert not (tmp_path / "new").exists() and not dump.exists()
    one_error_line(run_main([*args, "--out", str(kept)]), "was not made by --stage-model")
    assert kept.is_dir() and (root / os.path.basename(llama) / "mine.txt").read_text() == "the user's own"


def test_a_failed_run_removes_only_the_folders_it_made(llama, sample_path, tmp_path, monkeypatch):
    """The folders a refused run removes are those its own mkdir made, as the kernel named them: a parent
    folder someone else made while the run made --out (and left empty) is not the run's, and --out given
    through a link (`link/../new`, which is not `./new`) is removed where it was made, not at its spelling's
    place (where an empty folder of the user's went instead)."""
    root = tmp_path / "node-local"
    (root / os.path.basename(llama)).mkdir(parents=True)  # --stage-model finds the user's folder: refused
    args = ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "2",
            "--stage-model", str(root)]
    theirs, real = tmp_path / "theirs", os.mkdir

    def made_by_another_meanwhile(path, *rest, **kw):
        if str(path) == str(theirs):
            real(path, *rest, **kw)  # the other process's; this run's own mkdir then finds it there
        return real(path, *rest, **kw)

    monkeypatch.setattr(os, "mkdir", made_by_another_meanwhile)
    one_error_line(run_main([*args, "--out", str(theirs / "out")]), "was not made by --stage-model")
    monkeypatch.undo()
    assert os.listdir(theirs) == []
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere" / "deep", tmp_path / "link")
    real_locked = output_files.locked

    def the_user_makes_a_folder(folder, *rest, **kw):
        (tmp_path / "new").mkdir()  # empty, at the place --out is spelled
        return real_locked(folder, *rest, **kw)

    monkeypatch.setattr(output_files, "locked", the_user_makes_a_folder)
    one_error_line(run_main([*args, "--out", str(tmp_path / "link" / ".." / "new")]), "was not made by")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "elsewhere" / "new").exists()


def test_an_out_or_dump_that_links_to_nothing_is_named_so(llama, sample_path, tmp_path):
    """--out (--dump) a link to nothing was refused as 'folder is not writable' (make_folder took the link
    for a folder that existed): it is named as what it is, as sum names it."""
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    args = ["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--chunks", "2"]
    one_error_line(run_main([*args, "--out", str(tmp_path / "dangling")]),
                   f"--out {tmp_path / 'dangling'}: exists and is not a folder (a link to nothing?)")
    one_error_line(run_main([*args, "--out", str(tmp_path / "o"), "--dump", str(tmp_path / "dangling"),
                             "--dump-rate", "0.5"]), f"--dump {tmp_path / 'dangling'}: exists and is not a folder")
    assert sorted(os.listdir(tmp_path)) == ["dangling"]


def test_shared_error_under_mpirun_is_reported_once(llama, sample_path, tmp_path):
    result = run_cli(["run", "--model", llama, "--data", sample_path, "--out", str(tmp_path / "o"),
                      "--ctx", str(CTX), "--chunks", "999"], ranks=2)
    one_error_line(result, "--chunks 999")


def test_failure_in_one_rank_ends_the_job(llama, sample_path, tmp_path):
    """An exception in rank 1 only, in the middle of counting: one rank-tagged line, no hang."""
    script = (
        "import sys, mpicorr.run as r, mpicorr.__main__ as m\n"
        "orig = r.count_chunks\n"
        "def boom(*a, **k):\n"
        "    from mpicorr.dist import world\n"
        "    if world().rank == 1: raise RuntimeError('injected failure')\n"
        "    return orig(*a, **k)\n"
        "r.count_chunks = boom\n"
        "sys.exit(m.main(sys.argv[1:]))\n")
    if MPIRUN is None:
        pytest.skip("mpirun not found")
    import subprocess
    cmd = [MPIRUN, "--oversubscribe", "-n", "2", sys.executable, "-c", script, "run", "--model", llama,
           "--data", sample_path, "--out", str(tmp_path / "o"), "--ctx", str(CTX)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=120, cwd=str(tmp_path))
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if "mpicorr: error:" in ln]  # (beside MPI_Abort's banner)
    assert len(lines) == 1 and "rank 1" in lines[0] and "injected failure" in lines[0], result.stderr
    assert not (tmp_path / "o" / "summary.h5").exists()


def test_inspect_lists_the_registry_sites_of_every_family(tiny_models):
    """inspect builds the model on the meta device; its sites are those a run records."""
    from mpicorr import models

    for family, path in tiny_models.items():
        result = run_main(["inspect", "--model", path])
        assert result.returncode == 0, (family, result.stderr)
        loaded = models.find_sites(models.load_model(path, torch.float32, ["cpu"]))
        for site in loaded:
            what = (f"{site.experts} experts of {site.width} neurons, each expert's down-projection input in "
                    f"{site.name}" if site.experts else f"input of {site.name} ({site.width} neurons)")
            assert f"layer {site.layer}: {what}" in result.stdout, family
        assert f"{len({s.layer for s in loaded})} layers recorded" in result.stdout


def test_inspect_with_site_module(bad_files):
    one_error_line(run_main(["inspect", "--model", bad_files["OLMO"]]), "not supported", "inspect")
    result = run_main(["inspect", "--model", bad_files["OLMO"], "--site-module", r"model\.layers\.\d+\.mlp\.up_proj"])
    assert result.returncode == 0 and "input of model.layers.1.mlp.up_proj" in result.stdout
    assert "model.layers.<L>.mlp.down_proj" in result.stdout


def test_inspect_checks_site_and_site_module_as_run_does(llama):
    """inspect with a --site-module that is no regular expression, or with --site gate: one line, exit 2, as
    run refuses them. Before, the first ended with status 1 ('error: error: missing ), ...', as an unexpected
    error) and the second listed the modules of --site-module, --site dropped without a word."""
    one_error_line(run_main(["inspect", "--model", llama, "--site-module", "(("]), "--site-module '(('",
                   "not a regular expression")
    one_error_line(run_main(["inspect", "--model", llama, "--site", "gate", "--site-module", ".*q_proj"]),
                   "--site-module replaces the ffn registry", "--site gate")


def test_site_module_is_matched_whole_and_a_partial_match_says_so(tiny_models, tmp_path):
    """--site-module is matched against whole module names (re.fullmatch, as the README says): 'q_proj' alone
    is refused with the name it matches part of and the expression that would match it; GPT-2's Conv1D layers
    are listed among the linear layers. Before: 'matches no module' beside the very layer meant, and for
    GPT-2 'linear layers are named like lm_head'."""
    one_error_line(run_main(["inspect", "--model", tiny_models["llama"], "--site-module", "q_proj"]),
                   "matches only part of model.layers.0.self_attn.q_proj", "'.*q_proj'")
    one_error_line(run_main(["inspect", "--model", tiny_models["gpt2"], "--site-module", r"mlp\.c_proj"]),
                   "matches only part of transformer.h.0.mlp.c_proj")
    one_error_line(run_main(["inspect", "--model", tiny_models["gpt2"], "--site-module", "nothing"]),
                   "linear layers are named like transformer.h.0.attn.c_attn")
    result = run_main(["inspect", "--model", tiny_models["gpt2"], "--site-module", r".*mlp\.c_proj"])
    assert result.returncode == 0 and "layer 1: input of transformer.h.1.mlp.c_proj" in result.stdout, result.stderr


def test_two_ranks_on_one_gpu_are_refused_with_device_auto():
    from mpicorr.run import check_gpu_sharing
    hosts, devices = ["a", "a", "b", "b"], ["cuda:0", "cuda:0", "cuda:0", "cuda:1"]
    with pytest.raises(UserError, match=r"ranks 0 and 1 on a would share GPU cuda:0; start one rank per GPU"):
        check_gpu_sharing("auto", hosts, devices, [["U0"], ["U0"], ["U0"], ["U1"]])
    check_gpu_sharing("auto", hosts, devices, [["U0"], ["U1"], ["U0"], ["U1"]])  # SLURM binding: one GPU each
    check_gpu_sharing("cuda:0", hosts, devices, [["U0"], ["U0"], ["U0"], ["U0"]])  # explicit: on purpose
    check_gpu_sharing("auto", hosts, ["cpu"] * 4, [[None]] * 4)
    # --gpus-per-rank 2: groups may not overlap
    check_gpu_sharing("auto", ["a", "a"], ["cuda:0,1", "cuda:2,3"], [["U0", "U1"], ["U2", "U3"]])
    with pytest.raises(UserError, match="ranks 0 and 1 on a would share GPU"):
        check_gpu_sharing("auto", ["a", "a"], ["cuda:0,1", "cuda:1,2"], [["U0", "U1"], ["U1", "U2"]])


def test_a_cpu_kernel_is_refused_where_device_auto_takes_a_gpu(llama, sample_path, monkeypatch):
    """--kernel popcount (or sparse) with the default --device auto on a GPU node: one line naming --kernel,
    before the model loads. Before, config refused only an explicit --device cuda, and the run failed after
    loading the model: 'ValueError: the popcount kernel runs on the CPU only', exit 1."""
    from mpicorr import models, run
    from mpicorr.config import Config
    from mpicorr.dist import Comm

    monkeypatch.setattr(models, "resolve_devices", lambda *args: ["cuda:0"])  # as on a node with a GPU
    for kernel in ("popcount", "sparse"):
        cfg = Config(model=llama, data=sample_path, ctx=CTX, kernel=kernel)
        with pytest.raises(UserError, match=f"--kernel {kernel}: runs on the CPU only, and --device auto took "
                                            f"cuda:0 here"):
            run.place(cfg, Comm())


def test_gpus_per_rank_devices_and_device_map(monkeypatch):
    from mpicorr import models
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--gpus-per-rank 2: CUDA is not available"):
        models.resolve_devices("auto", 0, 2)
    assert models.resolve_devices("cpu", 3, 1) == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert models.resolve_devices("auto", 1, 4) == ["cuda:4", "cuda:5", "cuda:6", "cuda:7"]
    assert models.resolve_devices("cuda:2", 0, 2) == ["cuda:2", "cuda:3"]
    with pytest.raises(UserError, match=r"local rank 2 would need GPUs 6\.\.\.8, but this node has 8; .*ppr:2:node"):
        models.resolve_devices("auto", 2, 3)
    assert models.device_label(["cuda:4", "cuda:5"]) == "cuda:4,5" and models.device_label(["cpu"]) == "cpu"
    # each site's counts go to the device that accelerate's map gives its module (longest prefix)
    model = torch.nn.Module()
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    assert models.site_device(model, "model.layers.1.mlp.down_proj", "cuda:0") == "cuda:1"
    assert models.site_device(model, "model.layers.0.mlp.experts", "cuda:9") == "cuda:0"
    assert models.site_device(model, "model.layers.10.mlp", "cuda:9") == "cuda:9"  # not "model.layers.1"
    model.hf_device_map = {"": "cuda:3"}
    assert models.site_device(model, "anything", "cpu") == "cuda:3"
    assert models.site_device(torch.nn.Linear(2, 2), "x", "cpu") == "cpu"


def test_device_identity():
    from mpicorr import models
    assert models.device_identity("cpu") is None
    if torch.cuda.is_available():
        a, b = models.device_identity("cuda:0"), models.device_identity("cuda")
        assert a == b and len(a) >= 32


def test_ranks_count_with_rank_0s_configuration(llama, sample_path, tmp_path):
    """Ranks started in different folders (mpirun --wdir, MPMD) with different ./mpicorr.toml files count
    with rank 0's: the same bytes as one rank with A's file (before, each rank read its own)."""
    if MPIRUN is None:
        pytest.skip("mpirun not found")
    import subprocess
    for name, threshold in (("A", 0.25), ("B", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mpicorr.toml").write_text(
            f'model = "{llama}"\ndata = "{sample_path}"\nctx = {CTX}\nchunks = 4\nthreshold = {threshold}\n')
    ref = run_main(["run", "--out", str(tmp_path / "ref")], cwd=str(tmp_path / "A"))
    assert ref.returncode == 0, ref.stderr
    python = [sys.executable, "-m", "mpicorr", "run", "--out", str(tmp_path / "o")]
    cmd = [MPIRUN, "--oversubscribe", "-n", "1", "--wdir", str(tmp_path / "A"), *python, ":",
           "-n", "1", "--wdir", str(tmp_path / "B"), *python]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert outputs(str(tmp_path / "o")) == outputs(str(tmp_path / "ref"))


def test_failure_in_rank_0s_service_thread_ends_the_job(llama, sample_path, tmp_path):
    """--schedule dynamic: an exception in rank 0's background thread (answering rank 1) aborts the job
    within seconds, one line, non-zero exit (before, the job hung until killed)."""
    script = (
        "import sys, mpicorr.schedule as s, mpicorr.__main__ as m\n"
        "orig = s.Coordinator.__call__\n"
        "def boom(self, rank, message):\n"
        "    if rank == 1: raise RuntimeError('injected service failure')\n"
        "    return orig(self, rank, message)\n"
        "s.Coordinator.__call__ = boom\n"
        "sys.exit(m.main(sys.argv[1:]))\n")
    if MPIRUN is None:
        pytest.skip("mpirun not found")
    import subprocess
    cmd = [MPIRUN, "--oversubscribe", "-n", "2", sys.executable, "-c", script, "run", "--model", llama,
           "--data", sample_path, "--out", str(tmp_path / "o"), "--ctx", str(CTX), "--schedule", "dynamic"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=60, cwd=str(tmp_path))
    assert result.returncode != 0
    # Open MPI's abort banner is written beside the rank's line and may leave characters before it on that line.
    lines = [ln for ln in result.stderr.splitlines() if "mpicorr: error:" in ln]
    assert len(lines) == 1 and "injected service failure" in lines[0] and "mpicorr-service" in lines[0], result.stderr
    assert not (tmp_path / "o" / "summary.h5").exists()


@pytest.fixture(scope="module")
def bad_configs(llama, tmp_path_factory) -> dict[str, str]:
    """TOML files with a value of the wrong type, and model folders broken in one way each."""
    base = tmp_path_factory.mktemp("badcfg")
    paths = {}
    for name, text in {"T_DEVICE": "device = 5\n", "T_MODEL": "model = 5\n", "T_DATA": "data = [1, 2]\n",
                       "T_SITE": "site_module = 5\n", "T_OUT": "out = 3\n", "T_CTX": "ctx = \"64\"\n"}.items():
        (base / name).write_text(text)
        paths[name] = str(base / name)
    (base / "T_LATIN1").write_bytes("model = \"caf\xe9\"\n".encode("latin-1"))
    paths["T_LATIN1"] = str(base / "T_LATIN1")

    def broken(name: str, config: dict | None = None, weights=None) -> None:
        folder = base / name
        shutil.copytree(llama, folder)
        if config:
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**cfg, **config}))
        if weights is not None:
            weights(folder / "model.safetensors")
        paths[name] = str(folder)
    broken("M_SHAPE", {"intermediate_size": 80})
    broken("M_NOLAYERS", {"num_hidden_layers": -3})
    broken("M_MISSING", weights=lambda p: p.unlink())
    broken("M_TRUNC", weights=lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    return paths


@pytest.mark.parametrize("args,needles", [
    (["--config", "T_DEVICE"], ["T_DEVICE", "device = 5", "a string"]),
    (["--config", "T_MODEL"], ["T_MODEL", "model = 5"]),
    (["--config", "T_DATA"], ["T_DATA", "data = [1, 2]"]),
    (["--config", "T_SITE"], ["T_SITE", "site_module = 5"]),
    (["--config", "T_OUT"], ["T_OUT", "out = 3"]),
    (["--config", "T_CTX"], ["T_CTX", "ctx = '64'", "a whole number"]),
    (["--config", "T_LATIN1"], ["T_LATIN1", "UTF-8"]),
    (["--model", "M_SHAPE"], ["M_SHAPE", "config.json gives", "another model"]),
    (["--model", "M_NOLAYERS"], ["M_NOLAYERS", "no layer", "num_hidden_layers"]),
    (["--model", "M_MISSING"], ["M_MISSING", "no weights"]),
    (["--model", "M_TRUNC"], ["model.safetensors", "truncated"]),
    (["--model", "GPT2", "--ctx", "2048"], ["--ctx 2048", "at most 1024"]),
    (["--site-module", r"model\.embed_tokens"], ["embed_tokens", "not a linear layer"]),
])
def test_bad_config_and_model_is_one_line_exit_2_and_no_output_folder(
        llama, tiny_models, sample_path, bad_configs, tmp_path, args, needles):
    """Each of these failed after the output folder existed, with a traceback or exit 1 (or exit 0 for a
    model without layers)."""
    subst = {"GPT2": tiny_models["gpt2"], **bad_configs}
    args = [subst.get(a, a) for a in args]
    if "--model" not in args and "--config" not in args:
        args = ["--model", llama, *args]
    out = tmp_path / "out"
    common = ["--data", sample_path, "--out", str(out)] + ([] if "--ctx" in args else ["--ctx", str(CTX)])
    result = run_main(["run", *args, *common], cwd=str(tmp_path))
    one_error_line(result, *[subst.get(n, n) for n in needles])
    assert not out.exists()


def test_a_true_boolean_of_the_toml_file_is_turned_off_on_the_command_line(tmp_path):
    """resume = true in mpicorr.toml, and one run that should start over: --no-resume --force. Before, the
    booleans had no --no- form, so a true in the file could not be overridden ('the command line overrides the
    file') and --force was refused beside it. A 'config' key is named as such."""
    from mpicorr.__main__ import parser
    from mpicorr.config import build_config

    toml = tmp_path / "m.toml"
    toml.write_text('model = "m"\ndata = "d"\nresume = true\ndebug = true\n')
    args = ["run", "--config", str(toml)]
    assert build_config(parser().parse_args(args), "x").resume
    with pytest.raises(UserError, match="give only one of them"):
        build_config(parser().parse_args(args + ["--force"]), "x")
    cfg = build_config(parser().parse_args(args + ["--no-resume", "--force", "--no-debug"]), "x")
    assert (cfg.resume, cfg.force, cfg.debug) == (False, True, False)
    toml.write_text('model = "m"\ndata = "d"\nconfig = "other.toml"\n')
    with pytest.raises(UserError, match="a config file cannot name another; give --config FILE"):
        build_config(parser().parse_args(args), "x")


@pytest.mark.parametrize("option", ["--stage-data", "--stage-model", "--dump"])
def test_an_empty_path_option_is_refused(llama, sample_path, tmp_path, option):
    """--stage-data '' (say stage_data = "$LOCAL" in a TOML file written by a script, $LOCAL unset): one line,
    exit 2, nothing written. Before, an empty --stage-data or --stage-model meant no staging without a word,
    and --dump '' said '--dump : the dump needs a folder of its own'."""
    out = tmp_path / "out"
    extra = ["--dump-tokens", "4"] if option == "--dump" else []
    result = run_main(["run", "--model", llama, "--data", sample_path, "--ctx", str(CTX), "--out", str(out),
                       option, "", *extra])
    one_error_line(result, f"{option} '': an empty path")
    assert not out.exists()


def test_plan_refuses_absurd_rank_counts(llama, sample_path, tmp_path):
    """plan -n 30000000 planned 30 million rows (gigabytes); slots= beyond the limit likewise."""
    common = ["--model", llama, "--data", sample_path, "--ctx", str(CTX)]
    one_error_line(run_main(["plan", "-n", "30000000", *common]), "--ranks 30000000", "from 1 to")
    (tmp_path / "hosts").write_text("localhost slots=100000000000\n")
    one_error_line(run_main(["plan", "-n", "2", *common, "--hostfile", str(tmp_path / "hosts")]),
                   "hosts:1", "slots '100000000000'")


def test_ctrl_c_says_how_to_go_on(monkeypatch, capsys):
    """Ctrl-C printed 'mpicorr: interrupted', naming nothing to do (cluster walkthrough); now one line that says
    to rerun with --resume, and exit status 130."""
    from mpicorr import __main__ as cli

    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "dispatch", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", "nothing"])
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err.count("\n") == 1 and "rerun the same command with --resume" in err
