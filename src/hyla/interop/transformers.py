"""transformers' MiniMax <-> hyla: configuration fields and weight names, nothing else.

On disk, transformers' ``MiniMaxForCausalLM.save_pretrained`` writes experts one by one
(``block_sparse_moe.experts.{e}.w1|w2|w3.weight``: gate, down, up); hyla stacks them into
``mlp.gate_up_proj [E, 2I, H]`` and ``mlp.down_proj [E, H, I]``. Every other tensor keeps its name.
MiniMax's original remote-code config (``attn_type_list``, ``rotary_dim``, ``layernorm_*_alpha/beta``,
``postnorm``) is read too.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from hyla.config import LIGHTNING, SOFTMAX, ConfigError, HylaConfig
from hyla.errors import CheckpointError
from hyla.ops.lightning.decay import lightning_slopes

ARCHITECTURE = "MiniMaxForCausalLM"
MODEL_TYPE = "minimax"
# transformers' name, and the original remote-code checkpoints' (MiniMax-Text-01, MiniMax-M1).
# A model with a lightning q/k convolution (the recall study's option) is no MiniMax: its config.json names a type
# of its own, which transformers refuses to load instead of computing another function.
QK_CONV_MODEL_TYPE = "hyla_minimax_qk_conv"
MODEL_TYPES = (MODEL_TYPE, "minimax_text_01", "minimax_m1", QK_CONV_MODEL_TYPE)

# (hyla field, transformers field, original remote-code field)
_FACTORS = (
    ("linear_attn_alpha_factor", "linear_attn_alpha_factor", "layernorm_linear_attention_alpha"),
    ("linear_attn_beta_factor", "linear_attn_beta_factor", "layernorm_linear_attention_beta"),
    ("full_attn_alpha_factor", "full_attn_alpha_factor", "layernorm_full_attention_alpha"),
    ("full_attn_beta_factor", "full_attn_beta_factor", "layernorm_full_attention_beta"),
    ("mlp_alpha_factor", "mlp_alpha_factor", "layernorm_mlp_alpha"),
    ("mlp_beta_factor", "mlp_beta_factor", "layernorm_mlp_beta"),
)
_SAME = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_experts_per_tok",
    "max_position_embeddings",
    "block_size",
    "rms_norm_eps",
    "tie_word_embeddings",
    "initializer_range",
    "hidden_act",
    "router_aux_loss_coef",
)
# Buffers transformers saves that hyla derives from the config.
_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


# Partial rotary: MiniMax-Text-01's own code rotates the first ``rotary_dim`` dims of each head, and so does
# hyla, whatever the config's source; transformers' MiniMax ignores the setting and rotates all of them. A
# transformers-format config (model_type "minimax") that asks for it is therefore one that transformers computes
# differently: hyla follows the config (the model's math, as published) and says so.
_PARTIAL_ROTARY = (
    "this MiniMax config rotates {rotary_dim} of {head_dim} dims per head (partial rotary); hyla applies that, as "
    "MiniMax-Text-01's own code does, but transformers' MiniMax rotates all {head_dim}: the two give different "
    "logits for this model"
)


def _token_id(value) -> int | None:
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None


def config_from_hf(raw: Mapping) -> HylaConfig:
    """A :class:`HylaConfig` from a MiniMax ``config.json`` (transformers' or the original remote code's)."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"config.json describes a {model_type!r} model; hyla reads MiniMax checkpoints "
            f"(model_type one of {MODEL_TYPES})"
        )
    if raw.get("sliding_window") is not None:
        raise ConfigError(f"sliding_window={raw['sliding_window']} is not supported; MiniMax uses full attention")
    if raw.get("shared_intermediate_size"):
        raise ConfigError("shared experts (shared_intermediate_size > 0) are not supported by hyla")
    layers = raw["num_hidden_layers"]
    if raw.get("layer_types"):
        layer_types = list(raw["layer_types"])
    elif raw.get("attn_type_list"):
        layer_types = [LIGHTNING if a == 0 else SOFTMAX for a in raw["attn_type_list"]]
    else:  # transformers' default: alternating, starting with softmax
        layer_types = [SOFTMAX if (i + 1) % 2 else LIGHTNING for i in range(layers)]
    rope = raw.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported; hyla implements default RoPE")
    fields = {name: raw[name] for name in _SAME if name in raw}
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    rotary_dim = raw.get("rotary_dim") or int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if rotary_dim < head_dim and model_type == MODEL_TYPE:
        warnings.warn(_PARTIAL_ROTARY.format(rotary_dim=rotary_dim, head_dim=head_dim), stacklevel=3)
    fields.update(
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        num_experts=raw.get("num_local_experts", raw.get("num_experts", 8)),
        layer_types=layer_types,
        rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 1_000_000.0))),
        postnorm=bool(raw.get("postnorm", True)),
        lightning_qk_conv=raw.get("lightning_qk_conv", 0),
        bos_token_id=_token_id(raw.get("bos_token_id")),
        eos_token_id=_token_id(raw.get("eos_token_id")),
        pad_token_id=_token_id(raw.get("pad_token_id")),
    )
    for ours, theirs, original in _FACTORS:
        fields[ours] = float(raw.get(theirs, raw.get(original, 1.0)))
    try:
        return HylaConfig(**fields)
    except TypeError as e:  # a field of the wrong type (a string where a number belongs, ...)
        raise ConfigError(f"config.json has a field of the wrong type: {e}") from None


def config_to_hf(config: HylaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` transformers' ``MiniMaxConfig`` reads; ``rotary_dim`` and ``postnorm`` ride along
    (a model with ``lightning_qk_conv`` gets a type of its own, :data:`QK_CONV_MODEL_TYPE`, that only hyla reads).

    transformers' MiniMax implements full rotary and post-norm only: a config with ``rotary_dim < head_dim``
    or ``postnorm=False`` round-trips through hyla, but transformers would compute another function.
    """
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rotary_dim != config.head_dim:
        rope["partial_rotary_factor"] = config.rotary_dim / config.head_dim
        warnings.warn(_PARTIAL_ROTARY.format(rotary_dim=config.rotary_dim, head_dim=config.head_dim), stacklevel=3)
    out = {
        "architectures": [ARCHITECTURE if not config.lightning_qk_conv else "HylaQKConvForCausalLM"],
        "model_type": MODEL_TYPE if not config.lightning_qk_conv else QK_CONV_MODEL_TYPE,
        **{name: getattr(config, name) for name in _SAME},
        "head_dim": config.head_dim,
        "num_key_value_heads": config.num_key_value_heads,
        "num_local_experts": config.num_experts,
        "layer_types": list(config.layer_types),
        "rope_parameters": rope,
        "rotary_dim": config.rotary_dim,
        "postnorm": config.postnorm,
        **({"lightning_qk_conv": config.lightning_qk_conv} if config.lightning_qk_conv else {}),
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "dtype": str(dtype).removeprefix("torch."),
    }
    for ours, theirs, _ in _FACTORS:
        out[theirs] = getattr(config, ours)
    return out


def state_dict_from_hf(tensors: Mapping[str, Tensor], config: HylaConfig) -> dict[str, Tensor]:
    """transformers' tensor names (per-expert ``w1/w2/w3``, or its fused in-memory names) -> hyla's."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[int, str], dict[int, Tensor]] = {}
    for name, tensor in tensors.items():
        if _DERIVED.match(name):
            continue
        if m := _EXPERT.match(name):
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = tensor
            continue
        name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        name = name.replace(".mlp.experts.gate_up_proj", ".mlp.gate_up_proj")
        name = name.replace(".mlp.experts.down_proj", ".mlp.down_proj")
        out[name] = tensor
    for layer in sorted({layer for layer, _ in experts}):
        parts = {w: experts.get((layer, w), {}) for w in ("w1", "w2", "w3")}
        for w, found in parts.items():
            missing = sorted(set(range(config.num_experts)) - set(found))
            if missing:
                raise CheckpointError(
                    f"missing tensor model.layers.{layer}.block_sparse_moe.experts.{missing[0]}.{w}.weight"
                )
        prefix = f"model.layers.{layer}.mlp."
        out[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat((parts["w1"][e], parts["w3"][e])) for e in range(config.num_experts)]
        )
        out[prefix + "down_proj"] = torch.stack([parts["w2"][e] for e in range(config.num_experts)])
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def lightning_decay_buffers(config: HylaConfig, layer_idx: int) -> dict[str, Tensor]:
    """The decay tables transformers' lightning layer keeps as saved buffers, computed as it does (float32).

    hyla derives them from the config and ignores them on load; writing them lets transformers load a hyla
    checkpoint with no missing key.
    """
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    slope = lightning_slopes(heads, layer_idx, layers)[:, None, None]  # [H, 1, 1]
    steps = torch.arange(config.block_size) + 1
    diagonal = slope * (steps[:, None] - steps[None, :])[None, None]
    return {
        "slope_rate": slope,
        "query_decay": torch.exp(-slope * steps[:, None]),
        "key_decay": torch.exp(-slope * (config.block_size - steps[:, None])),
        "diagonal_decay": torch.exp(torch.where(diagonal >= 0, -diagonal, float("-inf"))),
    }


def state_dict_to_hf(state: Mapping[str, Tensor], config: HylaConfig) -> dict[str, Tensor]:
    """hyla's tensor names -> the per-expert layout transformers writes and reads (``w1/w2/w3``).

    The lightning layers' decay tables (:func:`lightning_decay_buffers`) are added, as transformers saves them.
    """
    out: dict[str, Tensor] = {}
    dtype = next(iter(state.values())).dtype
    for i, kind in enumerate(config.layer_types):
        if kind == LIGHTNING:
            for name, tensor in lightning_decay_buffers(config, i).items():
                out[f"model.layers.{i}.self_attn.{name}"] = tensor.to(dtype)
    inter = config.intermediate_size
    for name, tensor in state.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        prefix, _, leaf = name.rpartition(".mlp.")
        if leaf == "gate_up_proj":
            for e in range(tensor.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = tensor[e, :inter]
                out[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = tensor[e, inter:]
        elif leaf == "down_proj":
            for e in range(tensor.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = tensor[e]
        elif leaf == "gate.weight":
            out[f"{prefix}.block_sparse_moe.gate.weight"] = tensor
        else:
            out[name] = tensor
    return out
