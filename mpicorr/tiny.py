"""Tiny random-weight models and an offline-trained tokenizer, for the demo and the tests (no downloads).

    from mpicorr import tiny
    tiny.build("llama", "/tmp/tiny-llama")    # a folder that --model accepts
"""

from __future__ import annotations

import os
from importlib import resources

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt",
            "falcon", "bert", "roberta", "mixtral", "qwen2_moe", "qwen3_moe")
EXPERTS, TOP_K = 4, 2  # the tiny mixture-of-experts models: each token chooses 2 of 4 experts
# Weights this large make a healthy share of neurons cross |x| >= 0.5 (about 10-30 %), as in real models.
INIT_RANGE = 0.2


def sample_text() -> str:
    """The project's own sample text (shipped in the package)."""
    return resources.files("mpicorr").joinpath("demo_text.txt").read_text(encoding="utf-8")


def sample_path() -> str:
    """File path of the sample text."""
    return str(resources.files("mpicorr").joinpath("demo_text.txt"))


def build_tokenizer(text: str, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on `text`, with <s> as BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def model_config(family: str, vocab_size: int, hidden: int = 32, ffn: int = 96, layers: int = 2):
    """A transformers config of `family` with tiny shapes."""
    import transformers as tf

    ids = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    decoder = dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=4,
                   max_position_embeddings=1024, initializer_range=INIT_RANGE, **ids)
    gqa = dict(decoder, num_key_value_heads=2)
    moe = dict(gqa, num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=ffn // 2)
    make = {
        "llama": lambda: tf.LlamaConfig(**gqa),
        "mistral": lambda: tf.MistralConfig(**gqa),
        "qwen2": lambda: tf.Qwen2Config(**gqa),
        "qwen3": lambda: tf.Qwen3Config(**gqa, head_dim=hidden // 4),
        "gemma": lambda: tf.GemmaConfig(**gqa, head_dim=hidden // 4),
        "gemma2": lambda: tf.Gemma2Config(**gqa, head_dim=hidden // 4),
        "phi3": lambda: tf.Phi3Config(**gqa),
        "mixtral": lambda: tf.MixtralConfig(**gqa, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K),
        # Qwen2-MoE: a shared expert beside the routed ones, and block 1 dense (mlp_only_layers)
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**moe, shared_expert_intermediate_size=ffn, mlp_only_layers=[1]),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**moe, head_dim=hidden // 4),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**decoder),
        "bert": lambda: tf.BertConfig(**decoder),
        "roberta": lambda: tf.RobertaConfig(**decoder),
        "gpt2": lambda: tf.GPT2Config(n_embd=hidden, n_inner=ffn, n_layer=layers, n_head=4, n_positions=1024,
                                      initializer_range=INIT_RANGE, **ids),
        "opt": lambda: tf.OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers, num_attention_heads=4,
                                    word_embed_proj_dim=hidden, max_position_embeddings=1024, init_std=INIT_RANGE, **ids),
        "falcon": lambda: tf.FalconConfig(hidden_size=hidden, ffn_hidden_size=ffn, num_hidden_layers=layers,
                                          num_attention_heads=4, initializer_range=INIT_RANGE, **ids),
    }
    return make[family]()


def build(family: str, folder: str, seed: int = 0, text: str | None = None, **shape) -> str:
    """Write a random-weight model of `family` (a causal LM, or a bare encoder) and its tokenizer to `folder`."""
    from transformers.utils import logging

    from .models import auto_class

    logging.disable_progress_bar()
    tokenizer = build_tokenizer(text or sample_text())
    torch.manual_seed(seed)
    model = auto_class(family).from_config(model_config(family, len(tokenizer), **shape))
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
