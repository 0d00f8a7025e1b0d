"""A Deja Vu-style activation predictor trained on one layer of a --dump: d -> r -> N, sigmoid.

Used by analysis/predictor.py. From the hidden state entering a block's MLP the predictor says which of the
block's N neurons will fire, so that a runtime computes only those. Measured on held-out tokens: recall and
precision at a cut-off, and the share of the FFN's (token, neuron) work skipped at the cut-off that keeps
99 % of the firings (the neurons predicted not to fire are skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .predictor_data import LayerData

RECALL_TARGET = 0.99


class LowRank(torch.nn.Module):
    """d -> r -> N: a rank-r linear map to one logit per neuron; sigmoid(logit) is P(neuron fires)."""

    def __init__(self, hidden: int, rank: int, width: int):
        super().__init__()
        self.down = torch.nn.Linear(hidden, rank, bias=False)
        self.up = torch.nn.Linear(rank, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


@dataclass(frozen=True)
class Scores:
    """How a predictor does on held-out tokens."""

    tokens: int
    density: float      # share of (token, neuron) pairs that fire
    cutoff: float
    recall: float       # at `cutoff`: fired and predicted / fired
    precision: float    # at `cutoff`: fired and predicted / predicted
    cutoff99: float     # the largest cut-off that keeps RECALL_TARGET of the firings
    recall99: float
    skipped99: float    # share of (token, neuron) pairs predicted not to fire at cutoff99: FFN work skipped


def split(tokens: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) item indices: a seeded shuffle, the last `holdout` share held out."""
    order = np.random.default_rng(seed).permutation(tokens)
    test = max(1, int(round(tokens * holdout))) if tokens > 1 else 0
    return np.sort(order[: tokens - test]), np.sort(order[tokens - test :])


def batches(indices: np.ndarray, size: int) -> list[np.ndarray]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def train(data: LayerData, rank: int, epochs: int = 20, batch: int = 256, lr: float = 3e-3, seed: int = 0,
          device: str = "cpu", train_idx: np.ndarray | None = None,
          log: Callable[[str], None] = lambda line: None) -> LowRank:
    """Fit the low-rank predictor to the layer's firing (binary cross-entropy, Adam) on `train_idx`."""
    torch.manual_seed(seed)
    model = LowRank(data.hidden, rank, data.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = np.random.default_rng(seed + 1)
    train_idx = np.arange(len(data)) if train_idx is None else train_idx
    for epoch in range(epochs):
        total = 0.0
        for idx in batches(order.permutation(train_idx), batch):
            x, fired = data.take(idx)
            loss = loss_fn(model(x.float().to(device)), fired.float().to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / max(len(train_idx), 1):.4f}")
    return model


@torch.no_grad()
def probabilities(model: LowRank, data: LayerData, idx: np.ndarray, batch: int, device: str):
    """(P(fires) [k, N], fired [k, N]) for the items, a batch at a time."""
    model.eval()
    for part in batches(idx, batch):
        x, fired = data.take(part)
        yield torch.sigmoid(model(x.float().to(device))).cpu(), fired


def evaluate(model: LowRank, data: LayerData, idx: np.ndarray, cutoff: float = 0.5, batch: int = 1024,
             device: str = "cpu") -> Scores:
    """Recall and precision at `cutoff`, and the work skipped at RECALL_TARGET recall, over the items `idx`."""
    hit = predicted = firings = 0
    positives = []
    for p, fired in probabilities(model, data, idx, batch, device):
        hit += int((fired & (p >= cutoff)).sum())
        predicted += int((p >= cutoff).sum())
        firings += int(fired.sum())
        positives.append(p[fired])
    pairs = len(idx) * data.width
    positives = torch.sort(torch.cat(positives)).values if positives else torch.empty(0)
    if not len(positives):
        return Scores(len(idx), 0.0, cutoff, float("nan"), float("nan"), 1.0, float("nan"), 1.0)
    # The firings' probabilities ascending: cutting at the k-th keeps the n - k above it.
    cut99 = float(positives[int(np.floor((1 - RECALL_TARGET) * len(positives)))])
    kept = sum(int((p >= cut99).sum()) for p, _ in probabilities(model, data, idx, batch, device))
    return Scores(len(idx), firings / pairs, cutoff, hit / firings, hit / predicted if predicted else float("nan"),
                  cut99, float((positives >= cut99).float().mean()), 1 - kept / pairs)
