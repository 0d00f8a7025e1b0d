"""Model loading and the site registries: which tensor of each block holds the "neurons" counted.

Three registries keyed by `config.model_type`, one per --site; each entry is a short function returning,
in block order, the module to hook:
- ffn (default): the input of the FFN down projection (act(gate) * up for gated MLPs);
- gate: the output of the activation function applied to the gate projection (gated MLPs only);
- heads: the input of the attention output projection, one "neuron" per head (its output's L2 norm).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

import torch

from . import inputs
from .errors import UserError


@dataclass(frozen=True)
class Routed:
    """One MoE forward: which experts each token chose, and each chosen expert's neurons on its tokens."""

    selected: torch.Tensor                          # [tokens, experts], 1.0 where chosen
    activations: list[tuple[int, torch.Tensor]]     # (expert, [its tokens, width]) for experts with tokens


@dataclass(frozen=True)
class Site:
    """One recorded tensor of block `layer`, `width` neurons wide: the input of `module` (named `name`),
    or its output when `output`; with `heads` > 0, the L2 norm of each of that many equal slices; with
    `experts` > 0, `module` is an MoE block's experts and each expert has `width` neurons."""

    layer: int
    name: str
    module: torch.nn.Module
    width: int
    output: bool = False
    heads: int = 0
    experts: int = 0

    def neurons(self, x: torch.Tensor, *rest, **named):
        """The values thresholded for this site, [..., width] (a Routed for experts); the arguments are the
        module's inputs (or its output)."""
        if self.experts:
            return routed(self.module, x, named.get("top_k_index", rest[0] if rest else None))
        if not self.heads:
            return x
        return torch.linalg.vector_norm(x.unflatten(-1, (self.heads, -1)).float(), dim=-1)


def routed(experts: torch.nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor) -> Routed:
    """Each chosen expert's down-projection input act(gate) * up on the tokens routed to it, recomputed from
    the experts' stored weights as transformers' eager experts compute it (whatever kernel the model ran)."""
    count = experts.num_experts
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = top_k_index.reshape(hidden.shape[0], -1).long()
    # Index `count` is transformers' placeholder for a slot no local expert fills: dropped.
    chosen = torch.zeros(hidden.shape[0], count + 1, device=hidden.device).scatter_(1, index.clamp(0, count), 1.0)
    selected = chosen[:, :count]
    activations = []
    transposed = getattr(experts, "is_transposed", False)
    for expert in torch.nonzero(selected.any(0)).flatten().tolist():
        rows = hidden[torch.nonzero(selected[:, expert]).flatten()]
        weight = experts.gate_up_proj[expert]
        gate_up = rows @ weight if transposed else torch.nn.functional.linear(rows, weight)
        activations.append((expert, experts._apply_gate(gate_up)))
    return Routed(selected, activations)


Found = list[tuple[str, torch.nn.Module]]


def _blocks(model: torch.nn.Module, path: str, inner: str) -> Found:
    """`inner` of every block in the ModuleList at `path` of the base model, named as in named_modules()."""
    prefix = model.base_model_prefix + "." if model.base_model is not model else ""
    blocks = model.base_model.get_submodule(path)
    return [(f"{prefix}{path}.{i}.{inner}", block.get_submodule(inner)) for i, block in enumerate(blocks)]


SITES: dict[str, Callable[[torch.nn.Module], Found]] = {
    # Gated MLPs: the input of down_proj is act(gate) * up (Phi-3 computes gate and up in one fused Linear).
    **{family: (lambda m: _blocks(m, "layers", "mlp.down_proj"))
       for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    "gpt2": lambda m: _blocks(m, "h", "mlp.c_proj"),                 # Conv1D: the input is act(c_fc(x))
    "gpt_neox": lambda m: _blocks(m, "layers", "mlp.dense_4h_to_h"),
    "opt": lambda m: _blocks(m, "decoder.layers", "fc2"),
    "falcon": lambda m: _blocks(m, "h", "mlp.dense_4h_to_h"),
    "bert": lambda m: _blocks(m, "encoder.layer", "output.dense"),   # intermediate -> output.dense
    "roberta": lambda m: _blocks(m, "encoder.layer", "output.dense"),
}
# Mixture-of-experts blocks: the experts module (3-D stacked weights, chosen per token by the router); a
# shared expert (Qwen2-MoE) and the dense blocks some models interleave are recorded as ordinary blocks.
MOE: dict[str, Callable[[torch.nn.Module], Found]] = {
    family: (lambda m: _blocks(m, "layers", "mlp")) for family in ("mixtral", "qwen2_moe", "qwen3_moe")}
SITES.update(MOE)  # supported for ffn; find_sites splits each block into its experts (and dense parts)
GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
# --site gate: the activation module's output; Phi-3 applies it to the gate half of its fused projection.
GATES: dict[str, Callable[[torch.nn.Module], Found]] = {
    **{family: (lambda m: _blocks(m, "layers", "mlp.act_fn")) for family in GATED if family != "phi3"},
    "phi3": lambda m: _blocks(m, "layers", "mlp.activation_fn"),
}
# --site heads: the attention output projection, whose input is the heads' outputs side by side.
HEADS: dict[str, Callable[[torch.nn.Module], Found]] = {
    **{family: (lambda m: _blocks(m, "layers", "self_attn.o_proj")) for family in (*GATED, *MOE)},
    "gpt2": lambda m: _blocks(m, "h", "attn.c_proj"),
    "gpt_neox": lambda m: _blocks(m, "layers", "attention.dense"),
    "opt": lambda m: _blocks(m, "decoder.layers", "self_attn.out_proj"),
    "falcon": lambda m: _blocks(m, "h", "self_attention.dense"),
    "bert": lambda m: _blocks(m, "encoder.layer", "attention.output.dense"),
    "roberta": lambda m: _blocks(m, "encoder.layer", "attention.output.dense"),
}
# --dump: the module whose input is the hidden state entering each block's MLP, after the block's norm (what
# a Deja Vu-style predictor sees); MoE blocks have no dense firing mask to predict, so no entries.
MLP_INPUTS: dict[str, Callable[[torch.nn.Module], Found]] = {
    # post_attention_layernorm (Gemma-2: pre_feedforward_layernorm) -> mlp
    **{family: (lambda m: _blocks(m, "layers", "mlp")) for family in GATED},
    "gpt2": lambda m: _blocks(m, "h", "mlp"),                        # ln_2 -> mlp
    "gpt_neox": lambda m: _blocks(m, "layers", "mlp"),               # post_attention_layernorm -> mlp
    "opt": lambda m: _blocks(m, "decoder.layers", "fc1"),            # final_layer_norm -> fc1
    "falcon": lambda m: _blocks(m, "h", "mlp"),                      # ln_mlp / input_layernorm -> mlp
    "bert": lambda m: _blocks(m, "encoder.layer", "intermediate"),   # attention output (after its LayerNorm)
    "roberta": lambda m: _blocks(m, "encoder.layer", "intermediate"),
}
# Encoders are loaded without a language-model head: they predict no next token, so no perplexity.
ENCODERS = {"bert", "roberta"}


def auto_class(family: str):
    """The transformers Auto class a family is loaded with: bare encoders, else a causal LM."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if family in ENCODERS else AutoModelForCausalLM


def _check_family(family: str, where: str) -> None:
    if family not in SITES:
        raise UserError(f"{where}: family '{family}' is not supported (supported: {', '.join(sorted(SITES))}); "
                        f"name the modules to record with --site-module REGEX, e.g. 'model\\.layers\\.\\d+\\.mlp\\.down_proj' "
                        f"('python -m mpicorr inspect --model ...' lists the model's linear layers)")


def _width(module: torch.nn.Module) -> int:
    """Input features of a Linear, or of a GPT-2 Conv1D (whose weight is stored as [in, out])."""
    return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]


def find_sites(model: torch.nn.Module, site_module: str | None = None, site: str = "ffn") -> list[Site]:
    """The recorded sites of a loaded model, one per block, in block order.

    With `site_module`, the modules whose full name matches that regular expression, in module order,
    replace the ffn registry's choice (for families it lacks, or to record another linear layer's input).
    """
    if site_module is not None:
        return [Site(i, name, mod, _width(mod)) for i, (name, mod) in enumerate(_matching(model, site_module))]
    family = model.config.model_type
    _check_family(family, "--model")
    if site == "ffn" and family in MOE:
        return [s for i, (name, mlp) in enumerate(MOE[family](model)) for s in _moe_sites(i, name, mlp)]
    if site == "ffn":
        return [Site(i, name, mod, _width(mod)) for i, (name, mod) in enumerate(SITES[family](model))]
    if site == "gate":
        _check_gated(family)
        found = GATES[family](model)
        width = _width(SITES[family](model)[0][1])
        return _distinct([Site(i, name, mod, width, output=True) for i, (name, mod) in enumerate(found)])
    heads = model.config.num_attention_heads
    return [Site(i, name, mod, heads, heads=heads) for i, (name, mod) in enumerate(HEADS[family](model))]


def find_mlp_inputs(model: torch.nn.Module) -> Found:
    """The modules whose input is each block's MLP input (--dump), in block order."""
    family = model.config.model_type
    if family in MOE:
        raise UserError(f"--dump: {family} is a mixture of experts, whose neurons fire per expert on the tokens "
                        f"routed to it, not as one mask per token; leave out --dump for this model")
    if family not in MLP_INPUTS:
        raise UserError(f"--dump: family '{family}' has no MLP-input entry (mpicorr.models.MLP_INPUTS; dense "
                        f"families: {', '.join(sorted(MLP_INPUTS))}); leave out --dump for this model")
    return MLP_INPUTS[family](model)


def _moe_sites(layer: int, name: str, mlp: torch.nn.Module) -> list[Site]:
    """An MoE block's sites: its shared expert's down projection (if any), then its experts; a dense block's
    down projection."""
    if not hasattr(mlp, "experts"):
        return [Site(layer, f"{name}.down_proj", mlp.down_proj, _width(mlp.down_proj))]
    shared = getattr(mlp, "shared_expert", None)
    sites = [Site(layer, f"{name}.shared_expert.down_proj", shared.down_proj, _width(shared.down_proj))
             ] if shared else []
    experts = mlp.experts
    return sites + [Site(layer, f"{name}.experts", experts, experts.intermediate_dim, experts=experts.num_experts)]


def _matching(model: torch.nn.Module, site_module: str) -> Found:
    """The linear layers whose full names match --site-module."""
    found = [(n, m) for n, m in model.named_modules() if re.fullmatch(site_module, n)]
    linear = [n for n, m in model.named_modules() if _is_linear(m)]
    partly = [n for n in linear if re.search(site_module, n)]
    if not found and partly:  # `q_proj` for model.layers.0.self_attn.q_proj: names are matched whole
        raise UserError(f"--site-module {site_module}: matches only part of {partly[0]}; the expression must match "
                        f"the whole module name, e.g. '.*{site_module}'")
    if not found:
        raise UserError(f"--site-module {site_module}: matches no module; linear layers are named like "
                        f"{', '.join(linear[:4])}")
    for name, mod in found:
        if getattr(mod, "weight", None) is None or mod.weight.dim() != 2 or isinstance(mod, torch.nn.Embedding):
            raise UserError(f"--site-module {site_module}: '{name}' is not a linear layer; match the layer "
                            f"whose input is the FFN activation (the down projection)")
    return found


def _is_linear(module: torch.nn.Module) -> bool:
    """A torch Linear or a GPT-2 Conv1D (a linear layer with its weight stored as [in, out])."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _check_gated(family: str) -> None:
    if family in MOE:
        raise UserError(f"--site gate: not available for the experts of {family}; use --site ffn (every "
                        f"expert's down-projection input) or --site heads")
    if family not in GATES:
        raise UserError(f"--site gate: {family} has no gated MLP (its FFN input is act(fc(x)) already); "
                        f"use --site ffn")


def _distinct(sites: list[Site]) -> list[Site]:
    """Refuse one module shared by several blocks: its hook would count every block's call in each."""
    if len({id(s.module) for s in sites}) != len(sites):
        raise UserError(f"--site gate: this model shares one activation module between blocks "
                        f"({sites[0].name}); use --site ffn")
    return sites


def resolve_devices(device: str, local_rank: int, per_rank: int = 1) -> list[str]:
    """This rank's devices on this node (devices_for with the GPUs CUDA shows here)."""
    return devices_for(device, local_rank, per_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def devices_for(device: str, local_rank: int, per_rank: int, gpus: int) -> list[str]:
    """The devices of the rank of local rank `local_rank` on a node with `gpus` CUDA GPUs (0: none), for a run
    and for `plan`: 'auto' is the local GPU (local rank modulo the GPU count) when there is one, else the CPU;
    with `per_rank` > 1, that many GPUs, the local_rank-th group of them (from N on with --device cuda:N)."""
    if per_rank == 1 and device == "auto":
        return [f"cuda:{local_rank % gpus}"] if gpus else ["cpu"]
    if per_rank == 1:
        if device.startswith("cuda") and not gpus:
            raise UserError(f"--device {device}: CUDA is not available on this node; use --device cpu")
        return [device]
    if not gpus:
        raise UserError(f"--gpus-per-rank {per_rank}: CUDA is not available on this node; use 1 (the default)")
    first = int(device.partition(":")[2]) if device.startswith("cuda:") else local_rank * per_rank
    if first + per_rank > gpus:
        raise UserError(f"--gpus-per-rank {per_rank}: local rank {local_rank} would need GPUs {first}..."
                        f"{first + per_rank - 1}, but this node has {gpus}; start one rank per {per_rank} GPUs "
                        f"(mpirun --map-by ppr:{max(gpus // per_rank, 1)}:node)")
    return [f"cuda:{first + i}" for i in range(per_rank)]


def make_current(device: str) -> None:
    """Make a rank's first GPU its current CUDA device (nothing for the CPU): rank 1 of `--device auto` works on
    cuda:1, and whatever still defaults to the current device (a bare synchronize, the pinned-memory and
    Triton machinery) then finds that GPU, not cuda:0. Counting guards its own launches (fused.on_device)."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))


def device_label(devices: list[str]) -> str:
    """How the plan and the rank table show a rank's devices: cuda:0, or cuda:0,1,2,3."""
    return devices[0] if len(devices) == 1 else "cuda:" + ",".join(d.partition(":")[2] for d in devices)


def site_device(model: torch.nn.Module, name: str, default: str) -> str:
    """The device of the module `name` under accelerate's device map (the longest mapped prefix of its
    name), or `default` for a model on one device: where that site's counts are kept."""
    mapped = getattr(model, "hf_device_map", None) or {}
    keys = [k for k in mapped if k == "" or name == k or name.startswith(k + ".")]
    if not keys:
        return default
    where = mapped[max(keys, key=len)]
    return f"cuda:{where}" if isinstance(where, int) else str(where)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the token ids go: the device of the input embeddings (the first GPU of a split model)."""
    return model.get_input_embeddings().weight.device


def device_identity(device: str) -> str | None:
    """The physical GPU behind a device (its UUID, the same whatever CUDA_VISIBLE_DEVICES says); None for CPU."""
    if not device.startswith("cuda"):
        return None
    return str(torch.cuda.get_device_properties(torch.device(device)).uuid)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' is bfloat16 on GPUs that have it (else float16), float32 on the CPU."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def check_model(name: str, site_module: str | None = None, site: str = "ffn") -> str:
    """Check a model reference before loading weights; return its family (config.model_type)."""
    from transformers import AutoConfig

    inputs.model_folder(name)  # a missing folder or an uncached hub id: a clear message, no network
    try:
        family = AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError) as exc:
        hint = ("give a folder written by save_pretrained (with config.json)" if os.path.isdir(name)
                else f"fetch it first with 'hf download {name}', or give a model folder")
        raise UserError(f"--model {name}: cannot load its config ({_first_line(exc)}); {hint}") from None
    if site_module is None:
        _check_family(family, f"--model {name}")
        if site == "gate":
            _check_gated(family)
    return family


def check_loadable(name: str, site_module: str | None, site: str, ctx: int) -> None:
    """What would otherwise fail after the output folder exists: the sites on the model built on the meta
    device (no weights read), --ctx against the model's positions, and the weight files against config.json
    (their headers only)."""
    model = meta_model(name)
    sites = find_sites(model, site_module, site)
    if not sites:
        raise UserError(f"--model {name}: a run would record no layer ({model.config.num_hidden_layers} layers in "
                        f"config.json); fix num_hidden_layers or --site-module")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if isinstance(limit, int) and ctx > limit:
        raise UserError(f"--ctx {ctx}: {name} takes at most {limit} positions (config.json); use --ctx {limit} "
                        f"or less")
    check_weights(inputs.model_folder(name), model)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weights(folder: str, model: torch.nn.Module) -> None:
    """Refuse a folder without weights, a truncated or foreign .safetensors file (its header against the
    file size and the shapes config.json gives). Reads only the headers: milliseconds even for 70B models."""
    present = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
    if not present:
        raise UserError(f"--model {folder}: no weights (none of {', '.join(WEIGHT_FILES)}); give a folder written "
                        f"by save_pretrained")
    if not present[0].startswith("model.safetensors"):
        return  # pickled weights: transformers reads (and checks) them itself
    files = ["model.safetensors"]
    if present[0].endswith(".json"):
        files = sorted(set(_index(os.path.join(folder, present[0]))["weight_map"].values()))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") + "."
    for file in files:
        for key, shape in _safetensors_shapes(os.path.join(folder, file)).items():
            want = shapes.get(key, shapes.get(key.removeprefix(prefix), shapes.get(prefix + key)))
            if want is not None and want != shape:
                raise UserError(f"--model {folder}: {file} holds {key} of shape {list(shape)} but config.json "
                                f"gives {list(want)}; the weights belong to another model")


def _index(path: str) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {path}: cannot read the weight index ({exc}); re-download the model") from None


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a .safetensors header, after checking that the file holds all their bytes."""
    import json

    problem = "missing"
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            length = int.from_bytes(fh.read(8), "little")
            problem = "truncated or not a safetensors file"
            if 8 + length > size:
                raise ValueError
            header = json.loads(fh.read(length))
            end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"], default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"--model {path}: {problem}; re-download or re-save the model") from None
    if 8 + length + end > size:
        raise UserError(f"--model {path}: truncated ({size} bytes, its header needs {8 + length + end}); "
                        f"re-download or re-save the model")
    return {k: tuple(t["shape"]) for k, t in header.items() if k != "__metadata__"}


def load_model(name: str, dtype: torch.dtype, devices: list[str]) -> torch.nn.Module:
    """The model in eval mode, gradients off: on devices[0], or split over several GPUs by accelerate
    ("balanced": about the same share of the weights on each, leaving room for the counts)."""
    from transformers import AutoConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    cls = auto_class(AutoConfig.from_pretrained(name).model_type)
    if len(devices) == 1:
        model = cls.from_pretrained(name, dtype=dtype).to(devices[0])
    else:
        try:
            import accelerate  # noqa: F401  (transformers' device_map needs it)
        except ImportError:
            raise UserError("--gpus-per-rank: needs the accelerate package: pip install accelerate") from None
        gpus = [int(d.partition(":")[2]) for d in devices]
        memory = {i: torch.cuda.mem_get_info(i)[0] for i in gpus}
        model = cls.from_pretrained(name, dtype=dtype, device_map="balanced", max_memory=memory)
    model.requires_grad_(False)
    return model.eval()


def describe(name: str, site_module: str | None = None, site: str = "ffn") -> str:
    """What a run would record for a model, built on the meta device (no weights read, no memory used)."""
    family = check_model(name, site_module, site)
    model = meta_model(name)
    sites = find_sites(model, site_module, site)
    where = f"--site {site}" if site_module is None else f"--site-module {site_module}"
    lines = [f"{name}: family '{family}', {len({s.layer for s in sites})} layers recorded ({where}):"]
    lines += [f"  layer {s.layer}: {_what(s)}" for s in sites]
    if site_module is None:
        lines.append("sites: ffn" + (", gate" if family in GATES else "") + ", heads (choose with --site)")
    shapes = dict.fromkeys(re.sub(r"\.\d+\.", ".<L>.", n) for n, m in model.named_modules()
                           if _is_linear(m))
    lines.append("linear layers (<L> = block number): " + ", ".join(shapes))
    return "\n".join(lines)


def meta_model(name: str) -> torch.nn.Module:
    """The model built from its config on PyTorch's meta device: shapes and module names, no weights read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        return auto_class(config.model_type).from_config(config)


def _what(s: Site) -> str:
    """How inspect describes one site."""
    if s.heads:
        return f"{s.heads} heads, the L2 norm of each head's slice of the input of {s.name}"
    if s.experts:
        return (f"{s.experts} experts of {s.width} neurons, each expert's down-projection input in {s.name} "
                f"on the tokens routed to it, and the router's co-selection of the {s.experts} experts")
    return f"{'output' if s.output else 'input'} of {s.name} ({s.width} neurons)"


def quiet_transformers() -> None:
    """transformers' warnings off in this process (a tokenizer received over MPI on another rank warns about
    documents longer than the model's positions, which chunks never are)."""
    from transformers.utils import logging

    logging.set_verbosity_error()


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
    return model.config.model_type not in ENCODERS and model.get_output_embeddings() is not None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
