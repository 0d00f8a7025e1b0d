"""Model loading and the site registry: which module's input is "the FFN neurons" of each block.

The registry is keyed by `config.model_type`; each entry is a short function returning, in block order,
the module whose *input* is recorded (the input of the FFN down projection: act(gate) * up for gated MLPs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UserError


@dataclass(frozen=True)
class Site:
    """One recorded tensor: the input of `module` (named `name`) in block `layer`, `width` neurons wide."""

    layer: int
    name: str
    module: torch.nn.Module
    width: int


def _decoder_down_proj(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Llama-style decoders: model.layers[i].mlp.down_proj."""
    return [(f"model.layers.{i}.mlp.down_proj", block.mlp.down_proj) for i, block in enumerate(model.model.layers)]


SITES: dict[str, Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module]]]] = {
    "llama": _decoder_down_proj,
    "mistral": _decoder_down_proj,
    "qwen2": _decoder_down_proj,
    "gemma": _decoder_down_proj,
}


def find_sites(model: torch.nn.Module) -> list[Site]:
    """The recorded sites of a loaded model, one per block, in block order."""
    family = model.config.model_type
    if family not in SITES:
        raise UserError(f"--model: family '{family}' is not supported; supported: {', '.join(sorted(SITES))}")
    return [Site(i, name, mod, mod.in_features) for i, (name, mod) in enumerate(SITES[family](model))]


def resolve_device(device: str, local_rank: int) -> str:
    """'auto' means this rank's local GPU (local rank modulo GPU count) when CUDA is there, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank % torch.cuda.device_count()}"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this node; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' is bfloat16 on GPUs that have it (else float16), float32 on the CPU."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def check_model(name: str) -> str:
    """Check a model reference before loading weights; return its family (config.model_type)."""
    from transformers import AutoConfig

    if _looks_local(name) and not os.path.isdir(name):
        raise UserError(f"--model {name}: no such folder; give a model folder or a hub id like org/name")
    try:
        family = AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError) as exc:
        hint = ("give a folder written by save_pretrained (with config.json)" if os.path.isdir(name)
                else f"fetch it first with 'hf download {name}', or give a model folder")
        raise UserError(f"--model {name}: cannot load its config ({_first_line(exc)}); {hint}") from None
    if family not in SITES:
        raise UserError(f"--model {name}: family '{family}' is not supported; supported: {', '.join(sorted(SITES))}")
    return family


def load_model(name: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model in eval mode on `device`, gradients off."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except ValueError:  # not a causal LM: no perplexity, same sites
        model = AutoModel.from_pretrained(name, dtype=dtype)
    model.requires_grad_(False)
    return model.to(device).eval()


def load_tokenizer(name: str):
    """The model's tokenizer (it decides the chunks)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {name}: cannot load its tokenizer ({_first_line(exc)})") from None


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True when the model predicts the next token (so a perplexity can be computed)."""
    return hasattr(model, "lm_head") or model.__class__.__name__.endswith("ForCausalLM")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or os.path.exists(name)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
