"""Reproduce the README's GPU figures (needs CUDA): the counting products of every exact product kind against
the tensor-core peak, one layer's counting step, and a random-weight model with Mistral-7B's shapes counted end
to end by the real `mpicorr run`, timed against its own bare forward passes.

    python benchmarks/gpu.py products                 # N = 14336, 10 % firing, 4096..16384 tokens per call
    python benchmarks/gpu.py layer                    # where one layer's counting step spends its time
    python benchmarks/gpu.py model --data wiki.test.raw --chunks 642 --batch-size 16
    python benchmarks/gpu.py model --data wiki.test.raw --chunks 642 --batch-size 16 --memory-gib 23  # 24 GB card

products: triangle.DeviceCounts.add_transposed, as a run calls it once per layer and batch with the operand the
fused kernel writes, timed over several calls after a warm-up (int16 panels: their flushes included, the
clock stopped only once the background Flusher has added them into the host triangle), for each product kind
that is exact on this GPU (fp8, int8, bf16). The rate counts the multiply-adds of the row panels (2 x tokens
x panel cells), which is what the tensor cores execute; `triangle` is the share of them inside the lower
triangle. One bfloat16 square product gives what cuBLAS reaches here.

model: the model is built on the GPU in bfloat16 with random weights (no weights file) next to a config.json and
a BPE tokenizer trained on --data, then measured as benchmarks/overhead.py measures any model: its bare forward
passes over the run's batches, then `mpicorr run` on the same model object in this process (models.load_model
replaced). --memory-gib caps torch's allocator (set_per_process_memory_fraction) to show the run fits a smaller
card. Prints one JSON line: bare forward seconds, the run's seconds after loading, their ratio, the counting
and writing phases, peak device and host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# mpicorr before torch (as benchmarks/overhead.py): cpus.STARTED is read before torch's OpenMP pins this thread
from mpicorr import __main__ as cli, counting, models, tiny, triangle  # noqa: E402

import torch  # noqa: E402

# Dense bfloat16 tensor-core peaks (no sparsity), from NVIDIA's data sheets; matched against the device name.
PEAKS = {"H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.0e12, "H100 NVL": 835.0e12, "H200": 989.4e12,
         "A100": 312.0e12, "L40S": 362.0e12, "RTX 4090": 165.2e12, "A10": 125.0e12}
MISTRAL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
               rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def peak() -> float | None:
    """The device's dense bfloat16 peak in FLOP/s, if known."""
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), None)


def timed(fn, reps: int, wait=lambda: None) -> float:
    """Seconds per call of fn (after one warm-up call), with all the work the calls started: the device's
    (synchronize) and, through `wait`, what they handed to other threads (DeviceCounts.wait: the Flusher's copies
    and host adds of int16 panels, which would otherwise still run when the clock stops)."""
    fn()
    wait()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    wait()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def products(args) -> None:
    """One JSON line per (product kind, tokens per call, panel type, panel size), after a square bfloat16
    product for reference."""
    n = args.neurons
    a = torch.randint(0, 2, (8192, 8192), device="cuda").to(torch.bfloat16)
    seconds = timed(lambda: torch.mm(a, a), 10)
    print(json.dumps({"what": "square bfloat16 mm, 8192^3", "tflops": round(2 * 8192**3 / seconds / 1e12, 1),
                      "peak_tflops": peak() and peak() / 1e12, "device": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "exact_products": triangle.exact_products(torch.device("cuda:0")),
                      "chosen": triangle.product_kind("cuda:0")}), flush=True)
    del a
    for kind in triangle.exact_products(torch.device("cuda:0")):
        for tokens in args.tokens:
            fired = torch.rand(triangle.round_up(n, triangle.PAD), tokens, device="cuda") < args.density
            fired[n:] = False
            op = fired.to(triangle.OPERANDS[kind][2])
            del fired
            for panel in (torch.float32, torch.int16):
                for elements in args.elements:
                    counts = triangle.DeviceCounts(n, torch.int32, "cuda", panel, elements=elements, product=kind)
                    seconds = timed(lambda: counts.add_transposed(op), max(2, args.call_tokens // tokens),
                                    counts.wait)
                    cells = triangle.panel_cells(n, elements)
                    rate = 2 * tokens * cells / seconds
                    print(json.dumps({
                        "product": kind, "tokens": tokens, "panel": str(counts.panel).removeprefix("torch."),
                        "panel_elements": elements, "seconds_per_call": round(seconds, 5),
                        "tflops": round(rate / 1e12, 1), "share_of_peak": peak() and round(rate / peak(), 3),
                        "triangle": round(triangle.packed_size(n) / cells, 3),
                        "layer_tokens_per_s": round(tokens / seconds)}), flush=True)
                    del counts
                    torch.cuda.empty_cache()


def layer(args) -> None:
    """Time counting.LayerCounts.add on bfloat16 activations of one batch, then list its kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    x = (torch.randn(args.tokens, args.neurons, device="cuda") * 0.5).to(torch.bfloat16)
    counts = counting.LayerCounts(0, args.neurons, (0.5,), torch.int32, "cuda:0")
    seconds = timed(lambda: counts.add(x), 5, lambda: [pairs.wait() for pairs in counts.pairs])
    print(json.dumps({"what": "LayerCounts.add", "tokens": args.tokens, "neurons": args.neurons,
                      "panel": str(counts.pairs[0].panel), "seconds_per_call": round(seconds, 5),
                      "layer_tokens_per_s": round(args.tokens / seconds)}), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            counts.add(x)
        for pairs in counts.pairs:
            pairs.wait()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows), flush=True)


def random_mistral(name: str, dtype: torch.dtype, devices: list[str]) -> torch.nn.Module:
    """Stands in for models.load_model: Mistral-7B's shapes with random weights, built on the GPU."""
    from transformers import AutoConfig, MistralForCausalLM

    config = AutoConfig.from_pretrained(name)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(devices[0]):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    return model.eval()


def model(args) -> None:
    """Write the model folder, build the random-weight model, and measure it as benchmarks/overhead.py does
    (bare forward passes, then the run, same process and model object); print the JSON line."""
    from transformers import MistralConfig

    import overhead

    folder = os.path.join(args.work, "mistral-shapes")
    os.makedirs(folder, exist_ok=True)
    with open(args.data, encoding="utf-8") as fh:
        tiny.build_tokenizer(fh.read(), vocab_size=args.vocab).save_pretrained(folder)
    MistralConfig(**{**MISTRAL, "num_hidden_layers": args.layers}).save_pretrained(folder)
    if args.memory_gib:
        total = torch.cuda.mem_get_info(args.device)[1]  # the cap is per device: --device's, not the current one
        torch.cuda.set_per_process_memory_fraction(args.memory_gib * 2**30 / total, args.device)
    built = random_mistral(folder, torch.bfloat16, [args.device])
    options = argparse.Namespace(model=folder, data=args.data, ctx=args.ctx, chunks=args.chunks,
                                 batch_size=args.batch_size, device=args.device, dtype="bfloat16",
                                 work=args.work, extra=args.extra, repeat=1,
                                 warmup=["--site-module", r"model\.layers\.0\.mlp\.down_proj"])  # one layer to write
    result = overhead.measure(built, options)
    print(json.dumps({**result, "memory_cap_gib": args.memory_gib, "products": triangle.product_kind(args.device)
                      if args.device.startswith("cuda") else "fp32",
                      "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
                      "torch": torch.__version__}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("products", help="time the counting products")
    a.add_argument("--neurons", type=int, default=14336, help="layer width N (default: Mistral-7B's 14336)")
    a.add_argument("--density", type=float, default=0.1, help="firing probability (the rate does not depend on it)")
    a.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[4096, 8192, 16384],
                   help="tokens per call, comma-separated")
    a.add_argument("--elements", type=lambda s: [int(t) for t in s.split(",")],
                   default=[triangle.PANEL_ELEMENTS, 4 * triangle.PANEL_ELEMENTS], help="cells per row panel")
    a.add_argument("--call-tokens", type=int, default=65536, help="tokens timed per configuration")
    c = sub.add_parser("layer", help="profile one layer's counting step")
    c.add_argument("--neurons", type=int, default=14336, help="layer width N")
    c.add_argument("--tokens", type=int, default=8192, help="tokens per batch")
    c.add_argument("--rows", type=int, default=15, help="kernels listed")
    b = sub.add_parser("model", help="count a random-weight model with Mistral-7B's shapes")
    b.add_argument("--data", required=True, help="text file (wikitext-2's wiki.test.raw)")
    b.add_argument("--chunks", type=int, default=642, help="chunks counted")
    b.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    b.add_argument("--batch-size", type=int, default=16, help="chunks per forward pass")
    b.add_argument("--memory-gib", type=float, default=None, help="cap torch's GPU allocator at this many GiB")
    b.add_argument("--layers", type=int, default=32, help="transformer blocks (default: Mistral-7B's 32)")
    b.add_argument("--vocab", type=int, default=4000, help="BPE vocabulary trained on --data (< 32000)")
    b.add_argument("--device", default="cuda:0", help="where to run (cpu: a check of this script only)")
    b.add_argument("--work", default="/tmp/mpicorr-gpu", help="folder for the model folder and the outputs")
    b.add_argument("extra", nargs="*", help="more run options, after --")
    args = p.parse_args()
    {"products": products, "layer": layer, "model": model}[args.what](args)


if __name__ == "__main__":
    main()
