"""Train a Deja Vu-style activation predictor (d -> r -> N, sigmoid) on one layer of a --dump and score it.

    python analysis/predictor.py DUMP_DIR --layer 5 [--threshold 0.5] [--rank 1024] [--epochs 20]

Holds out a share of the tokens (--holdout) and prints, on them, the recall and precision at --cutoff and
the share of the FFN's work skipped at the cut-off that keeps 99 % recall, next to an oracle's (1 - the
firing density). Reads only the dump (mpicorr.predictor_data); --save writes the trained weights.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mpicorr import analysis, predictor
from mpicorr.config import check_device
from mpicorr.errors import UserError
from mpicorr.files import atomic_path
from mpicorr.predictor_data import LayerData


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dump", metavar="DUMP_DIR", help="folder written by 'mpicorr run --dump'")
    p.add_argument("--layer", type=int, required=True, help="the layer (block number) to train on")
    p.add_argument("--threshold", type=float,
                   help="which of the dump's thresholds defines firing (default: the first)")
    p.add_argument("--rank", type=int, default=1024,
                   help="r, the predictor's inner width (default: 1024, at most d)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training tokens (default: 20)")
    p.add_argument("--batch-size", type=int, default=256, help="tokens per step (default: 256)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 0.003)")
    p.add_argument("--holdout", type=float, default=0.1, help="share of tokens held out for scoring (default: 0.1)")
    p.add_argument("--cutoff", type=float, default=0.5,
                   help="P(fires) from which a neuron is predicted to fire (default: 0.5)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the initial weights and the order (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda when there, else cpu), cpu, cuda or cuda:N"
                                                    " (default: %(default)s)")
    p.add_argument("--save", metavar="FILE", help="also write the trained weights (torch.save of the state dict: "
                                                 "down.weight [r, d], up.weight [N, r], up.bias [N])")
    return p


def pick_device(name: str) -> str:
    """--device as torch names it ('auto' resolved); one line, not torch's traceback, for a device string torch
    does not take or a GPU this machine does not have."""
    check_device(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 first")
    return name


def check(args: argparse.Namespace) -> None:
    if args.rank < 1 or args.epochs < 1 or args.batch_size < 1:
        raise UserError("--rank, --epochs and --batch-size must be whole numbers >= 1")
    if not 0 < args.holdout < 1:
        raise UserError(f"--holdout {args.holdout}: must be between 0 and 1")
    if not 0 < args.cutoff < 1:
        raise UserError(f"--cutoff {args.cutoff}: must be between 0 and 1")
    analysis.output_file(args.save, "--save")  # before training: torch.save would fail only after it


def main() -> int:
    args = parser().parse_args()

    def body() -> None:
        check(args)
        device = pick_device(args.device)
        data = LayerData(args.dump, args.layer, args.threshold)
        if len(data) < 2:
            raise UserError(f"{args.dump}: layer {args.layer} has {len(data)} token(s); dump more to train")
        rank = min(args.rank, data.hidden)
        train_idx, test_idx = predictor.split(len(data), args.holdout, args.seed)
        print(f"layer {args.layer} of {args.dump}: {len(data):,} tokens ({len(train_idx):,} to train, "
              f"{len(test_idx):,} held out), d {data.hidden} -> r {rank} -> N {data.width}, threshold "
              f"{data.threshold:g}, on {device}", flush=True)
        model = predictor.train(data, rank, args.epochs, args.batch_size, args.lr, args.seed, device, train_idx,
                                log=lambda line: print(line, file=sys.stderr, flush=True))
        s = predictor.evaluate(model, data, test_idx, args.cutoff, device=device)
        print(f"held out, cut-off {s.cutoff:g}: recall {s.recall:.4f}, precision {s.precision:.4f} "
              f"(firing density {s.density:.4f})")
        print(f"at {predictor.RECALL_TARGET:.0%} recall (cut-off {s.cutoff99:.4g}, recall {s.recall99:.4f}): "
              f"{s.skipped99:.1%} of the FFN's neuron work skipped; an oracle skips {1 - s.density:.1%}")
        if args.save:
            with atomic_path(args.save) as tmp:
                torch.save(model.state_dict(), tmp)
            print(f"weights in {args.save}")

    return analysis.run_script("predictor.py", body)


if __name__ == "__main__":
    sys.exit(main())
