"""Brute-force reference: the data convention and the pair loop written out plainly, independent of mpicorr."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
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
# Mixture-of-experts families: `mlp` is either an MoE block (router `gate`, stacked `experts`, maybe a
# `shared_expert`) or, in some blocks, a dense MLP.
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
HEAD.update({f: "model.layers.{i}.self_attn.o_proj" for f in MOE})


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


def _dense_path(model, family: str, site: str, i: int) -> str | None:
    """The module of block i whose input (output for gate) is recorded; MoE blocks: the shared expert's."""
    if site != "ffn" or family not in MOE:
        return {"ffn": DOWN_PROJ, "gate": GATE, "heads": HEAD}[site][family].format(i=i)
    mlp = model.get_submodule(f"model.layers.{i}.mlp")
    if not hasattr(mlp, "experts"):
        return f"model.layers.{i}.mlp.down_proj"
    return f"model.layers.{i}.mlp.shared_expert.down_proj" if hasattr(mlp, "shared_expert") else None


def _capture(model, family: str, site: str, seen: dict):
    """Hook handles that append each layer's recorded values [tokens, N] to seen[layer]."""
    heads = model.config.num_attention_heads
    handles = []
    for i in range(model.config.num_hidden_layers):
        path = _dense_path(model, family, site, i)
        if path is None:
            continue
        def keep(x, i=i):
            x = x.reshape(-1, x.shape[-1]).clone()
            if site == "heads":  # one value per head: the L2 norm of its slice
                x = torch.linalg.vector_norm(x.reshape(x.shape[0], heads, -1).float(), dim=-1)
            seen.setdefault(i, []).append(x)
        module = model.get_submodule(path)
        if site == "gate":
            handles.append(module.register_forward_hook(lambda mod, args, out, keep=keep: keep(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda mod, args, keep=keep: keep(args[0])))
    return handles


class ExpertInputs(TorchFunctionMode):
    """Records the input of every F.linear whose weight is one expert's slice of a stacked `down_proj`: what
    transformers' eager experts feed each expert's down projection, keyed by (block, expert)."""

    def __init__(self, model, seen: dict):
        super().__init__()
        self.seen = seen
        self.stacks = [(i, mlp.experts.down_proj) for i in range(model.config.num_hidden_layers)
                       if hasattr(mlp := model.get_submodule(f"model.layers.{i}.mlp"), "experts")]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            weight = args[1]
            for i, stack in self.stacks:
                if weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr():
                    expert = (weight.storage_offset() - stack.storage_offset()) // weight.numel()
                    self.seen.setdefault((i, expert), []).append(args[0].clone())
        return func(*args, **(kwargs or {}))


def _capture_routers(model, chosen: dict):
    """Hook handles that append each MoE block's router choice (top-k expert indices per token) to chosen[layer]."""
    handles = []
    for i in range(model.config.num_hidden_layers):
        mlp = model.get_submodule(f"model.layers.{i}.mlp")
        if hasattr(mlp, "experts"):
            handles.append(mlp.gate.register_forward_hook(
                lambda mod, args, out, i=i: chosen.setdefault(i, []).append(out[-1].reshape(-1, out[-1].shape[-1]))))
    return handles


def reference_run(model_dir: str, data_path: str | None, ctx: int, threshold: float, start: int, count: int,
                  site: str = "ffn", chunks: list[list[int]] | None = None):
    """(per-layer fired masks [tokens, N] and activations, perplexity or None, MoE) by plain transformers.
    MoE: ({(block, expert): activations of the tokens routed to it}, {block: [tokens, experts] chosen}), run
    with transformers' eager experts; empty for dense models. `chunks`: these token ids instead of the text
    file's chunks."""
    chunks = (chunks if chunks is not None else reference_chunks(model_dir, data_path, ctx))[start : start + count]
    family = AutoModel.from_pretrained(model_dir).config.model_type
    causal = family not in ENCODERS
    extra = {"experts_implementation": "eager"} if family in MOE else {}
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(model_dir, dtype=torch.float32,
                                                                             **extra).eval()
    seen: dict[int, list[torch.Tensor]] = {}
    handles = _capture(model, family, site, seen)
    expert_seen: dict[tuple[int, int], list[torch.Tensor]] = {}
    chosen: dict[int, list[torch.Tensor]] = {}
    if family in MOE and site == "ffn":
        handles += _capture_routers(model, chosen)
    nll, n = 0.0, 0
    with torch.no_grad(), (ExpertInputs(model, expert_seen) if family in MOE and site == "ffn" else nullcontext()):
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
    experts = {k: torch.cat(v).numpy() for k, v in expert_seen.items()}
    routers = {}
    for i, picks in chosen.items():
        picks = torch.cat(picks)
        mask = np.zeros((picks.shape[0], model.get_submodule(f"model.layers.{i}.mlp.experts").num_experts), bool)
        for t, row in enumerate(picks.tolist()):
            mask[t, row] = True
        routers[i] = mask
    return fired, acts, float(np.exp(nll / n)) if causal else None, (experts, routers)


# --dump: the norm whose output enters each block's MLP, written out independently of mpicorr's MLP_INPUTS
# (which hooks the MLP's input): the tiny Falcon is parallel-attention, so its MLP reads input_layernorm.
NORM_BEFORE_MLP = {
    **{f: "model.layers.{i}.post_attention_layernorm" for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")},
    "gemma2": "model.layers.{i}.pre_feedforward_layernorm",
    "gpt2": "transformer.h.{i}.ln_2",
    "gpt_neox": "gpt_neox.layers.{i}.post_attention_layernorm",
    "opt": "model.decoder.layers.{i}.final_layer_norm",
    "falcon": "transformer.h.{i}.input_layernorm",
    "bert": "encoder.layer.{i}.attention.output.LayerNorm",
    "roberta": "encoder.layer.{i}.attention.output.LayerNorm",
}


def reference_mlp_inputs(model_dir: str, data_path: str, ctx: int, start: int, count: int) -> dict[int, np.ndarray]:
    """Per layer, the output of the norm before the MLP [tokens, hidden] for chunks [start, start + count), by
    plain transformers, one chunk at a time."""
    chunks = reference_chunks(model_dir, data_path, ctx)[start : start + count]
    family = AutoModel.from_pretrained(model_dir).config.model_type
    cls = AutoModel if family in ENCODERS else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [model.get_submodule(NORM_BEFORE_MLP[family].format(i=i)).register_forward_hook(
        lambda mod, args, out, i=i: seen.setdefault(i, []).append(out.reshape(-1, out.shape[-1]).clone()))
        for i in range(model.config.num_hidden_layers)]
    with torch.no_grad():
        for chunk in chunks:
            model(input_ids=torch.tensor([chunk]))
    for h in handles:
        h.remove()
    return {i: torch.cat(v).numpy() for i, v in seen.items()}
