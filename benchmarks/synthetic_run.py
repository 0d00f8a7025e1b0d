"""Write a synthetic run folder (matrix files only) to time the analysis scripts at a real model's width.

    python benchmarks/synthetic_run.py /tmp/big --layers 2 --neurons 14336 --tokens 4096 --density 0.03
    /usr/bin/time -v python analysis/report.py /tmp/big       # the figures quoted in the README

Each neuron fires independently on each token with a Zipf-like rate (rank^-exponent, mean --density,
capped at 0.9, ranks shuffled); the counts are exact (float32 products of 0/1 stay exact below 2^24).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from mpicorr import matrixfile


def layer_counts(neurons: int, tokens: int, density: float, exponent: float, seed: int) -> np.ndarray:
    """Packed lower-triangle counts of one synthetic layer."""
    rng = np.random.default_rng(seed)
    rate = np.arange(1, neurons + 1, dtype=np.float64) ** -exponent
    p = np.minimum(0.9, density * neurons * rate / rate.sum())[rng.permutation(neurons)]
    fired = torch.from_numpy(rng.random((tokens, neurons), dtype=np.float32) < p.astype(np.float32)).float()
    full = (fired.T @ fired).to(torch.int64).numpy()
    return full[np.tril_indices(neurons)].astype(np.uint32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write correlations_block_<L>.zstd into")
    p.add_argument("--layers", type=int, default=2, help="number of layers")
    p.add_argument("--neurons", type=int, default=14336, help="layer width (Mistral-7B: 14336)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens counted")
    p.add_argument("--density", type=float, default=0.03, help="mean firing rate")
    p.add_argument("--exponent", type=float, default=0.8, help="Zipf exponent of the per-neuron rates")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for layer in range(args.layers):
        packed = layer_counts(args.neurons, args.tokens, args.density, args.exponent, seed=layer)
        path = os.path.join(args.out, matrixfile.matrix_name(layer))
        matrixfile.write_matrix(path, layer, args.neurons, args.tokens, packed)
        print(path)


if __name__ == "__main__":
    main()
