"""What a run costs over the model's own forward passes, for any model folder, measured in one process.

    python benchmarks/overhead.py --model DIR --data wiki.test.raw --chunks 24                 # CPU
    python benchmarks/overhead.py --model DIR --data wiki.test.raw --chunks 642 --batch-size 16 --device cuda:0

The model is loaded once. First the bare forward passes: the same model object without hooks, over the same
batches of the same chunks (the run's data convention), `use_cache=False`, logits computed, as a run computes
them. Then `mpicorr run` in this process on that same model object (models.load_model is replaced for this
process only), after a one-batch warm-up run that compiles the kernels (as a user's second run finds them
cached). Prints one JSON line: the bare forward seconds, the run's seconds after loading (counting, then
reducing and writing every file), their ratio, and peak memory; with --repeat N, the pair (bare forward, run)
is measured N times in turn, and the line gives the median pair and every ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# mpicorr before torch: it records the CPUs the process started with (cpus.STARTED) before torch's OpenMP
# runtime pins the main thread to one of them (OMP_PROC_BIND), so that the run can give them back.
from mpicorr import __main__ as cli, data, models  # noqa: E402

import torch  # noqa: E402


def sync(device: str) -> None:
    """Wait for every GPU (a model may be split over several; a bare synchronize() waits for the current one)."""
    if device.startswith("cuda"):
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def batches(folder: str, path: str, ctx: int, chunks: int, batch_size: int) -> list[torch.Tensor]:
    """The run's batches of token ids: the data convention of mpicorr.data, the first `chunks` chunks."""
    tokenizer = models.load_tokenizer(folder)
    text, _ = data.read_text(path)
    ids = data.make_chunks(data.tokenize(text, tokenizer), ctx, tokenizer.bos_token_id)[:chunks]
    return [torch.from_numpy(ids[b : b + batch_size]) for b in range(0, len(ids), batch_size)]


def bare_forward(model, work: list[torch.Tensor], device: str) -> float:
    """Seconds for the forward passes alone."""
    first = models.input_device(model)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in work:
            out = model(input_ids=ids.to(first), use_cache=False)
            del out
    sync(device)
    return time.perf_counter() - started


def timed_run(model, args: argparse.Namespace, chunks: int, out: str) -> tuple[float, str]:
    """(seconds from the model's 'loading' to the end, the run's output) of `mpicorr run` on `model`."""
    loaded: list[float] = []

    def load(*_):
        loaded.append(time.monotonic())
        return model

    models.load_model = load
    # The model object stands in for the folder's weights (benchmarks/gpu.py writes no 14 GB of random ones):
    # the run's check of the weight files before --out is made has nothing to read there.
    models.check_weights = lambda *_: None
    argv = ["run", "--model", args.model, "--data", args.data, "--ctx", str(args.ctx), "--chunks", str(chunks),
            "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", args.device, "--out", out,
            "--force", "--checkpoint-every", "0", *args.extra]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        status = cli.main(argv)
    done = time.monotonic()
    if status != 0:
        raise SystemExit(f"overhead: the run failed ({status}):\n{text.getvalue()}")
    return done - loaded[0], text.getvalue()


def measure(model, args: argparse.Namespace) -> dict:
    """Bare forward passes, then the run, on one model object, `--repeat` times in turn; the JSON fields (the
    figures of the median pair when repeated: on a shared machine one pair can be off by several per cent)."""
    work = batches(args.model, args.data, args.ctx, args.chunks, args.batch_size)
    chunks = sum(len(b) for b in work)
    bare_forward(model, work[:1], args.device)  # warm-up: first-call costs of the model's kernels
    scratch = os.path.join(args.work, "warm-up")
    warm = argparse.Namespace(**{**vars(args), "extra": [*args.extra, *getattr(args, "warmup", [])]})
    timed_run(model, warm, args.batch_size, scratch)  # compiles the counting kernels once, as a cache would
    shutil.rmtree(scratch, ignore_errors=True)
    pairs = [pair(model, args, work, chunks) for _ in range(args.repeat)]
    ratios = [p["ratio"] for p in pairs]
    fields = sorted(pairs, key=lambda p: p["ratio"])[(len(pairs) - 1) // 2]
    return {"chunks": chunks, "ctx": args.ctx, "batch_size": args.batch_size, "device": args.device, **fields,
            **({"ratios": ratios} if args.repeat > 1 else {}),
            "peak_device_bytes": torch.cuda.max_memory_allocated(args.device) if args.device.startswith("cuda") else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def pair(model, args: argparse.Namespace, work: list[torch.Tensor], chunks: int) -> dict:
    """One measurement: the bare forward passes, then the run right after them."""
    bare = bare_forward(model, work, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    after_load, text = timed_run(model, args, chunks, os.path.join(args.work, "out"))
    phases = re.search(r"counted .* in ([\d.]+) s, reduced and wrote them in ([\d.]+) s", text)
    return {"bare_forward_s": round(bare, 2), "run_after_load_s": round(after_load, 2),
            "ratio": round(after_load / bare, 2),
            "counting_s": phases and float(phases[1]), "writing_s": phases and float(phases[2])}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (or hub id in the local cache)")
    p.add_argument("--data", required=True, help="UTF-8 text file (wikitext-2's wiki.test.raw)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default: 512)")
    p.add_argument("--chunks", type=int, default=24, help="chunks counted (default: 24)")
    p.add_argument("--batch-size", type=int, default=1, help="chunks per forward pass (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="auto", help="the run's --dtype (default: auto)")
    p.add_argument("--work", default="/tmp/mpicorr-overhead", help="folder for the outputs")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure bare forward then run this many times in turn and report the median pair's "
                        "figures, with every ratio (default: 1)")
    p.add_argument("extra", nargs="*", help="more run options, after --")
    return p


def main() -> None:
    args = parser().parse_args()
    dtype = models.resolve_dtype(args.dtype, args.device)
    model = models.load_model(args.model, dtype, [args.device])
    print(json.dumps(measure(model, args)), flush=True)


if __name__ == "__main__":
    main()
