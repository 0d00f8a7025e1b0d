"""Write a model folder with a real model's shapes and random weights (no download), for the benchmarks.

    python benchmarks/random_model.py bert-base /tmp/bert-base --data wiki.test.raw
    python benchmarks/overhead.py --model /tmp/bert-base --data wiki.test.raw --chunks 24

A forward pass costs what the real model's costs (the same shapes); the firing pattern is not the trained
model's, so the co-firing counts, and the CPU kernel chosen for them, can differ. The tokenizer is a BPE of
--vocab words trained on --data (the embedding is the only part of the cost it changes).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpicorr import tiny  # noqa: E402

# transformers config classes and their arguments; defaults of those classes are the published shapes.
SHAPES = {
    "bert-base": ("BertConfig", "BertModel", {}),                    # 12 x 768, FFN 3072
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),                    # 12 x 768, FFN 3072
    "pythia-410m": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=1024, num_hidden_layers=24,
                    num_attention_heads=16, intermediate_size=4096)),
}


def build(shape: str, folder: str, data: str, vocab: int, seed: int = 0) -> str:
    """Write the folder (config, random weights, tokenizer); return it."""
    import transformers

    config_name, model_name, extra = SHAPES[shape]
    with open(data, encoding="utf-8") as fh:
        tokenizer = tiny.build_tokenizer(fh.read(), vocab_size=vocab)
    ids = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if shape == "bert-base":
        ids = dict(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id or 0)
    config = getattr(transformers, config_name)(**extra, **ids)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=sorted(SHAPES), help="which real model's shapes")
    p.add_argument("folder", help="folder to write")
    p.add_argument("--data", required=True, help="text the tokenizer is trained on (wiki.test.raw)")
    p.add_argument("--vocab", type=int, default=4000, help="BPE vocabulary size (default: 4000)")
    args = p.parse_args()
    print(build(args.shape, args.folder, args.data, args.vocab))


if __name__ == "__main__":
    main()
