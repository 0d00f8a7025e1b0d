#!/usr/bin/env bash
# Every GPU check and figure of the README in one call, for one machine with a CUDA GPU:
#
#     bash benchmarks/gpu_all.sh OUTDIR wiki.test.raw     # wikitext-2's test split, or any text file
#
# Runs, in this order, each under its own time limit so that a slow step cannot starve the others (a step
# that runs out of time or fails is noted, and the next one runs): the GPU tests (tests/test_gpu.py, and
# tests/test_fused.py, which runs the Triton kernels on the GPU when there is one), one layer's counting step,
# the products, the Mistral-7B-shaped model against its bare forward passes (the 1.5x target; 642 chunks), the
# same on a 24 GB budget (the 2.5x target; half the chunks, to fit the time), and the write phase alone with its
# profile. Each step's output goes to OUTDIR/<step>.log, and every JSON line of them, tagged with its step, to
# OUTDIR/figures.jsonl. At most 8.5 minutes (the limits' sum). MPICORR_GPU_SCALE=0.1 shrinks the model runs and
# the write phase (a check that the script runs, not a measurement). Needs zstandard, h5py, numba, triton.
set -u
out=${1:?usage: bash benchmarks/gpu_all.sh OUTDIR DATA}
data=$(realpath "${2:?usage: bash benchmarks/gpu_all.sh OUTDIR DATA}")
scale=${MPICORR_GPU_SCALE:-1}
mkdir -p "$out"
out=$(realpath "$out")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
chunks=$(python3 -c "print(max(16, int(642 * $scale)))")
half=$(python3 -c "print(max(16, int(321 * $scale)))")
writes=$(python3 -c "print(max(2, int(32 * $scale)))")

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a limit, its output in OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    echo "gpu_all: $name: exit $status after $((SECONDS - started)) s (limit $limit s)"
    grep -h '^{' "$out/$name.log" | sed "s/^{/{\"step\": \"$name\", /" >>"$out/figures.jsonl"
}

python3 -c "import zstandard, h5py, numba, triton" || { echo "gpu_all: install what is missing first"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fused.py
step layer 30 python3 benchmarks/gpu.py layer
step products 45 python3 benchmarks/gpu.py products --tokens 8192 --call-tokens 32768
step model 130 python3 benchmarks/gpu.py model --data "$data" --chunks "$chunks" --batch-size 16 --work /tmp/gpu-all-model
step model_24gb 130 python3 benchmarks/gpu.py model --data "$data" --chunks "$half" --batch-size 4 --memory-gib 23 \
    --work /tmp/gpu-all-24gb
step writes 60 python3 benchmarks/writes.py --layers "$writes" --profile --out /tmp/gpu-all-writes
echo "gpu_all: figures in $out/figures.jsonl"
