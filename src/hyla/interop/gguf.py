"""GGUF export: a hyla model as the file llama.cpp's ``minimax-01`` architecture reads.

llama.cpp computes MiniMax-Text-01 with what it reads from the file's metadata: which layers are lightning
(``{arch}.attention.recurrent_layers``, one flag per layer), one DeepNorm factor ``{arch}.residual_scale`` that
scales the normed residual of every sub-layer, and the rotary width ``{arch}.rope.dimension_count`` (NeoX-style
rotation of the first ``rotary_dim`` channels). It cannot express per-sub-layer factors, betas other than 1,
pre-norm residuals or a one-layer model (its depth scaling of the decay divides by ``layers - 1``), so those
configs are refused with the reason. Its decay rates are hyla's (``2^(-8 (h + 1) / H)`` times the depth factor);
the depth factor differs in the sixth digit (llama.cpp omits transformers' ``1e-5`` in the denominator).

Tensors use llama.cpp's names (``gguf.TENSOR_NAMES``), the experts stacked per layer (``ffn_{gate,up,down}_exps``).
The tokenizer travels as a GPT-2-style byte-level BPE (``tokenizer.ggml.model = gpt2``, pre-tokenizer ``gpt-2``,
whose split rule is the one ``tokenizers``' ``ByteLevel`` uses), padded with unused tokens to the model's vocab.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

from hyla.config import LIGHTNING, HylaConfig
from hyla.data.tokenizer import END_OF_TEXT
from hyla.errors import CheckpointError, ConfigError
from hyla.model import HylaForCausalLM

ARCH = "minimax-01"
OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Kept in float32 whatever the output type, as llama.cpp's own converter does: vectors (norms) and the router,
# whose top-k choice a rounded weight can flip.
_FLOAT32 = (gguf.MODEL_TENSOR.FFN_GATE_INP,)


def check_exportable(config: HylaConfig) -> None:
    """Raise :class:`ConfigError` if llama.cpp's MiniMax-01 would compute another function than hyla does."""
    alphas = {config.linear_attn_alpha_factor, config.full_attn_alpha_factor, config.mlp_alpha_factor}
    betas = {config.linear_attn_beta_factor, config.full_attn_beta_factor, config.mlp_beta_factor}
    if not config.postnorm:
        raise ConfigError("llama.cpp's MiniMax-01 implements post-norm residuals only; this model has postnorm=False")
    if len(alphas) != 1:
        raise ConfigError(
            f"llama.cpp's MiniMax-01 has one residual scale for every sub-layer; this model's DeepNorm alphas "
            f"differ ({sorted(alphas)})"
        )
    if betas != {1.0}:
        raise ConfigError(f"llama.cpp's MiniMax-01 needs DeepNorm betas of 1; this model has {sorted(betas)}")
    if config.lightning_qk_conv:
        raise ConfigError(f"llama.cpp's MiniMax-01 has no lightning q/k convolution; this model has "
                          f"lightning_qk_conv={config.lightning_qk_conv} (a recall-study option)")  # fmt: skip
    if config.num_hidden_layers < 2 and LIGHTNING in config.layer_types:
        raise ConfigError("llama.cpp's MiniMax-01 scales lightning decay by depth / (layers - 1): give >= 2 layers")


def _names(config: HylaConfig) -> dict[str, tuple[gguf.MODEL_TENSOR, int | None]]:
    """hyla's parameter names -> llama.cpp's tensor kinds (and block index); expert weights are split later."""
    t = gguf.MODEL_TENSOR
    names: dict[str, tuple[gguf.MODEL_TENSOR, int | None]] = {
        "model.embed_tokens.weight": (t.TOKEN_EMBD, None),
        "model.norm.weight": (t.OUTPUT_NORM, None),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (t.OUTPUT, None)
    per_layer = {
        "input_layernorm.weight": t.ATTN_NORM,
        "post_attention_layernorm.weight": t.FFN_NORM,
        "mlp.gate.weight": t.FFN_GATE_INP,
        "mlp.down_proj": t.FFN_DOWN_EXP,
    }
    lightning = {
        "self_attn.qkv_proj.weight": t.ATTN_QKV,
        "self_attn.output_gate.weight": t.ATTN_GATE,
        "self_attn.out_proj.weight": t.ATTN_OUT,
        "self_attn.norm.weight": t.ATTN_NORM_2,
    }
    softmax = {
        "self_attn.q_proj.weight": t.ATTN_Q,
        "self_attn.k_proj.weight": t.ATTN_K,
        "self_attn.v_proj.weight": t.ATTN_V,
        "self_attn.o_proj.weight": t.ATTN_OUT,
    }
    for i, kind in enumerate(config.layer_types):
        for leaf, tensor in (per_layer | (lightning if kind == LIGHTNING else softmax)).items():
            names[f"model.layers.{i}.{leaf}"] = (tensor, i)
    return names


def gguf_tensors(model: HylaForCausalLM) -> Iterator[tuple[str, gguf.MODEL_TENSOR, np.ndarray]]:
    """``(llama.cpp name, kind, float32 array)`` for every weight, in numpy's (row-major) shapes.

    The experts' fused ``gate_up_proj [E, 2I, H]`` becomes ``ffn_gate_exps`` and ``ffn_up_exps`` ``[E, I, H]``.
    """
    config = model.config
    names = _names(config)
    inter = config.intermediate_size
    for name, tensor in model.state_dict().items():
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        if name.endswith(".mlp.gate_up_proj"):
            block = int(name.split(".")[2])
            halves = {gguf.MODEL_TENSOR.FFN_GATE_EXP: array[:, :inter], gguf.MODEL_TENSOR.FFN_UP_EXP: array[:, inter:]}
            for kind, part in halves.items():
                yield gguf.TENSOR_NAMES[kind].format(bid=block) + ".weight", kind, np.ascontiguousarray(part)
            continue
        if name not in names:
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            raise CheckpointError(f"no llama.cpp tensor for hyla's {name!r}")
        kind, block = names[name]
        yield gguf.TENSOR_NAMES[kind].format(bid=block) + ".weight", kind, array


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int, chat_template: str | None) -> None:
    spec = json.loads(tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise ConfigError(
            "GGUF export needs a byte-level BPE tokenizer (what `hyla train` makes); this one is "
            f"{model.get('type')} with pre-tokenizer {pre.get('type')}"
        )
    vocab: dict[str, int] = model["vocab"]
    special = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    size = max([*vocab.values(), *special]) + 1
    if size > vocab_size:
        raise ConfigError(f"the tokenizer has {size} ids but the model only {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, text in special.items():
        tokens[i], types[i] = text, gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # gguf writes no empty array, and llama.cpp refuses a gpt2 vocabulary without merges
        raise ConfigError(
            "llama.cpp's BPE needs merges and this tokenizer has none (plain bytes): export a model trained with "
            "its own BPE tokenizer (`hyla train` makes one), or pass --tokenizer"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    end = tokenizer.token_to_id(END_OF_TEXT)
    if end is not None:
        writer.add_eos_token_id(end)
        writer.add_bos_token_id(end)
    if chat_template:
        writer.add_chat_template(chat_template)


def _add_metadata(writer: gguf.GGUFWriter, config: HylaConfig, name: str, file_type: int) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_residual_scale(config.mlp_alpha_factor)
    writer.add_array(f"{ARCH}.attention.recurrent_layers", [kind == LIGHTNING for kind in config.layer_types])


def export_gguf(
    model: HylaForCausalLM,
    tokenizer: Tokenizer,
    output: str | Path,
    outtype: str = "f32",
    name: str = "hyla",
    chat_template: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write ``model`` and ``tokenizer`` to the GGUF file ``output`` (atomically: a temporary sibling renamed
    into place once complete). Refuses an existing ``output`` unless ``overwrite``.

    ``outtype`` is ``f32``, ``bf16`` or ``q8_0`` for the matrices; vectors and the router stay float32, and a
    matrix whose rows do not split into whole quantization blocks (32 for q8_0) is written as float32.
    Returns the names of the matrices written as float32 that ``outtype`` asked to round.
    """
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype must be one of {sorted(OUTTYPES)}, got {outtype!r}")
    config = model.config
    check_exportable(config)
    output = Path(output)
    if output.exists() and not overwrite:
        raise CheckpointError(f"{output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise CheckpointError(f"{output.parent} is not a directory")
    qtype, file_type = OUTTYPES[outtype]
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, ARCH)
    kept: list[str] = []
    try:
        _add_metadata(writer, config, name, file_type)
        _add_tokenizer(writer, tokenizer, config.vocab_size, chat_template)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        for tensor_name, kind, array in gguf_tensors(model):
            rounded = qtype != gguf.GGMLQuantizationType.F32 and array.ndim > 1 and kind not in _FLOAT32
            if rounded and array.shape[-1] % block:
                kept.append(tensor_name)
                rounded = False
            if rounded:
                data = gguf.quants.quantize(array, qtype)
                writer.add_tensor(tensor_name, data, raw_shape=data.shape, raw_dtype=qtype)
            else:
                writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(output)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return kept
