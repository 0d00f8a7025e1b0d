"""Brute-force reference: the data convention and the pair loop written out plainly, independent of mpicorr."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

# Where each family's FFN down projection sits, written out independently of mpicorr's registry.
DOWN_PROJ = {
    **{f: "model.layers.{i}.mlp.down_proj" for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    "gpt2": "transformer.h.{i}.mlp.c_proj",
    "gpt_neox": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    "opt": "model.decoder.layers.{i}.fc2",
    "falcon": "transformer.h.{i}.mlp.dense_4h_to_h",
    "bert": "encoder.layer.{i}.output.dense",
    "roberta": "encoder.layer.{i}.output.dense",
}
# --site gate: the activation module applied to the gate projection (gated MLPs only).
GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
GATE = {**{f: "model.layers.{i}.mlp.act_fn" for f in GATED}, "phi3": "model.layers.{i}.mlp.activation_fn"}
# --site heads: the attention output projection; its input is the heads' outputs side by side.
HEAD = {
    **{f: "model.layers.{i}.self_attn.o_proj" for f in GATED},
    "gpt2": "transformer.h.{i}.attn.c_proj",
    "gpt_neox": "gpt_neox.layers.{i}.attention.dense",
    "opt": "model.decoder.layers.{i}.self_attn.out_proj",
    "falcon": "transformer.h.{i}.self_attention.dense",
    "bert": "encoder.layer.{i}.attention.output.dense",
    "roberta": "encoder.layer.{i}.attention.output.dense",
}
ENCODERS = ("bert", "roberta")


def reference_chunks(model_dir: str, data_path: str, ctx: int) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(data_path, encoding="utf-8") as fh:
        ids = tok(fh.read(), add_special_tokens=False)["input_ids"]
    chunks = [list(ids[i * ctx : (i + 1) * ctx]) for i in range(len(ids) // ctx)]
    if tok.bos_token_id is not None:
        for c in chunks:
            c[0] = tok.bos_token_id
    return chunks


def pair_loop(fired: np.ndarray) -> np.ndarray:
    """Packed lower triangle C[i, j], j <= i, counted token by token and pair by pair."""
    width = fired.shape[1]
    packed = np.zeros(width * (width + 1) // 2, dtype=np.int64)
    for row in fired:
        active = np.flatnonzero(row)
        for a, i in enumerate(active):
            packed[i * (i + 1) // 2 + active[: a + 1]] += 1
    return packed


def _capture(model, family: str, site: str, seen: dict):
    """Hook handles that append each layer's recorded values [tokens, N] to seen[layer]."""
    heads = model.config.num_attention_heads
    handles = []
    for i in range(model.config.num_hidden_layers):
        def keep(x, i=i):
            x = x.reshape(-1, x.shape[-1]).clone()
            if site == "heads":  # one value per head: the L2 norm of its slice
                x = torch.linalg.vector_norm(x.reshape(x.shape[0], heads, -1).float(), dim=-1)
            seen.setdefault(i, []).append(x)
        module = model.get_submodule({"ffn": DOWN_PROJ, "gate": GATE, "heads": HEAD}[site][family].format(i=i))
        if site == "gate":
            handles.append(module.register_forward_hook(lambda mod, args, out, keep=keep: keep(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda mod, args, keep=keep: keep(args[0])))
    return handles


def reference_run(model_dir: str, data_path: str, ctx: int, threshold: float, start: int, count: int,
                  site: str = "ffn"):
    """(per-layer fired masks [tokens, N] and activations, perplexity or None) by plain transformers."""
    chunks = reference_chunks(model_dir, data_path, ctx)[start : start + count]
    family = AutoModel.from_pretrained(model_dir).config.model_type
    causal = family not in ENCODERS
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[int, list[torch.Tensor]] = {}
    handles = _capture(model, family, site, seen)
    nll, n = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            out = model(input_ids=ids)
            if causal:
                nll += torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="sum").item()
                n += len(chunk) - 1
    for h in handles:
        h.remove()
    acts = {i: torch.cat(v).numpy() for i, v in seen.items()}
    fired = {i: np.abs(a) >= threshold for i, a in acts.items()}
    return fired, acts, float(np.exp(nll / n)) if causal else None
