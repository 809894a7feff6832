"""GGUF export: read back with the ``gguf`` package's reader and run through a naive forward written from
llama.cpp's MiniMax-01 graph (src/models/minimax-01.cpp: its decay formula, its metadata, its tensor layout);
where ``llama-cpp-python`` is installed, llama.cpp's greedy tokens equal hyla's."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch

from hyla.config import LIGHTNING, SOFTMAX, preset
from hyla.data.tokenizer import byte_level_tokenizer, train_bpe
from hyla.errors import CheckpointError, ConfigError
from hyla.interop.gguf import export_gguf, gguf_tensors
from hyla.model import HylaForCausalLM
from tests.conftest import rel_err

TEXTS = ["def parse(self, line):\n    return line.split(',')\n" * 3, "for i in range(10):\n    print(i * 2)\n" * 3]

BPE = train_bpe(TEXTS, 300)
BPE_LESS = byte_level_tokenizer()  # bytes only, no merges


def _model(**changes) -> HylaForCausalLM:
    """A float32 model whose every weight (norms included) is random, so a misplaced tensor shows."""
    model = HylaForCausalLM(preset("tiny").replace(**changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.2) + (1.0 if p.ndim == 1 else 0.0))
    return model


class Gguf:
    """A GGUF file's metadata, and its tensors as float64 torch tensors in numpy's (row-major) shape."""

    def __init__(self, path):
        reader = gguf.GGUFReader(path)
        self.meta = {name: field.contents() for name, field in reader.fields.items()}
        self.types = {t.name: t.tensor_type for t in reader.tensors}
        self.tensors = {}
        for t in reader.tensors:
            array = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type != 0 else np.asarray(t.data)
            self.tensors[t.name] = torch.from_numpy(np.array(array, np.float64).reshape(tuple(reversed(t.shape))))

    def __getitem__(self, key: str):
        return self.meta[key.format(arch=self.meta["general.architecture"])]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_logits(f: Gguf, tokens: list[int]) -> torch.Tensor:
    """``[T, V]`` logits (float64) computed token by token from the file alone, as llama.cpp's graph defines them."""
    t, a = f.tensors, "{arch}"
    layers, heads, kv_heads = f[f"{a}.block_count"], f[f"{a}.attention.head_count"], f[f"{a}.attention.head_count_kv"]
    d, n_rot, theta = f[f"{a}.attention.key_length"], f[f"{a}.rope.dimension_count"], f[f"{a}.rope.freq_base"]
    eps, alpha = f[f"{a}.attention.layer_norm_rms_epsilon"], f[f"{a}.residual_scale"]
    top_k = f[f"{a}.expert_used_count"]
    recurrent = f[f"{a}.attention.recurrent_layers"]
    start = 2 ** (-(2 ** (-(math.log2(heads) - 3))))
    slopes = torch.tensor([start * start**h for h in range(heads)], dtype=torch.float64)
    x = t["token_embd.weight"][tokens]  # [T, H]
    n = len(tokens)
    for il in range(layers):
        b = f"blk.{il}."
        x = _rms(x, t[b + "attn_norm.weight"], eps)
        if recurrent[il]:
            qkv = torch.nn.functional.silu(x @ t[b + "attn_qkv.weight"].T).view(n, heads, 3, d)
            q, k, v = qkv.unbind(2)
            decay = torch.exp(-slopes * (1.0 - il / (layers - 1) + 1e-5))
            state, out = torch.zeros(heads, d, d, dtype=torch.float64), []
            for i in range(n):
                state = decay[:, None, None] * state + k[i, :, :, None] * v[i, :, None, :]
                out.append(torch.einsum("hd,hde->he", q[i], state).reshape(-1))
            o = _rms(torch.stack(out), t[b + "attn_norm_2.weight"], eps)
            attn = (torch.sigmoid(x @ t[b + "attn_gate.weight"].T) * o) @ t[b + "attn_output.weight"].T
        else:
            q = (x @ t[b + "attn_q.weight"].T).view(n, heads, d)
            k = (x @ t[b + "attn_k.weight"].T).view(n, kv_heads, d)
            v = (x @ t[b + "attn_v.weight"].T).view(n, kv_heads, d)
            inv = theta ** (-torch.arange(0, n_rot, 2) / n_rot)
            angle = torch.arange(n)[:, None, None] * inv  # NeoX: channel i pairs with i + n_rot / 2
            for z in (q, k):
                lo, hi = z[..., : n_rot // 2].clone(), z[..., n_rot // 2 : n_rot].clone()
                z[..., : n_rot // 2] = lo * angle.cos() - hi * angle.sin()
                z[..., n_rot // 2 : n_rot] = hi * angle.cos() + lo * angle.sin()
            k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
            scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            attn = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).reshape(n, -1) @ t[b + "attn_output.weight"].T
        x = alpha * x + attn
        x = _rms(x, t[b + "ffn_norm.weight"], eps)
        probs = (x @ t[b + "ffn_gate_inp.weight"].T).softmax(-1)
        weights, chosen = probs.topk(top_k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        moe = torch.zeros_like(x)
        for i in range(n):
            for w, e in zip(weights[i], chosen[i], strict=True):
                gate, up = t[b + "ffn_gate_exps.weight"][e] @ x[i], t[b + "ffn_up_exps.weight"][e] @ x[i]
                moe[i] += w * (t[b + "ffn_down_exps.weight"][e] @ (torch.nn.functional.silu(gate) * up))
        x = alpha * x + moe
    x = _rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T


@pytest.mark.parametrize(
    "changes",
    [
        {},  # tiny: 3 lightning layers then softmax, GQA
        {"layer_types": [SOFTMAX, LIGHTNING, LIGHTNING, LIGHTNING], "rotary_dim": 8, "tie_word_embeddings": True},
        {"num_hidden_layers": 2, "layer_types": [LIGHTNING, LIGHTNING], "num_attention_heads": 2,
         "num_key_value_heads": 1, "mlp_alpha_factor": 1.7, "linear_attn_alpha_factor": 1.7,
         "full_attn_alpha_factor": 1.7},
    ],
)  # fmt: skip
def test_llama_cpp_graph_on_the_exported_file_gives_hylas_logits(tmp_path, changes):
    model = _model(**changes)
    path = tmp_path / "m.gguf"
    assert export_gguf(model, BPE, path) == []
    f = Gguf(path)
    tokens = torch.randint(0, model.config.vocab_size, (37,)).tolist()  # more than two lightning blocks of 16
    with torch.no_grad():
        expected = model.double()(torch.tensor([tokens])).logits[0]
    # A misplaced or mis-shaped tensor moves these logits by O(1); what is left (~1e-5 measured) is hyla's float32
    # tables (rotary angles, decay rates) and llama.cpp's depth factor, which has no epsilon in its denominator.
    assert rel_err(reference_logits(f, tokens), expected) < 1e-4
    assert ("output.weight" in f.tensors) != model.config.tie_word_embeddings
    assert f["general.architecture"] == "minimax-01" and f["general.file_type"] == 0


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_rounded_outtypes_round_the_matrices_and_keep_vectors_and_router_float32(tmp_path, outtype):
    model = _model(hidden_size=64, intermediate_size=96)
    path = tmp_path / "m.gguf"
    assert export_gguf(model, BPE, path, outtype) == []
    f = Gguf(path)
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    for name, _, array in gguf_tensors(model):
        ours, theirs = torch.from_numpy(array).double(), f.tensors[name]
        if array.ndim == 1 or "ffn_gate_inp" in name:
            assert f.types[name] == gguf.GGMLQuantizationType.F32 and torch.equal(theirs, ours), name
        elif outtype == "bf16":
            assert f.types[name] == qtype and torch.equal(theirs, ours.to(torch.bfloat16).double()), name
        else:  # q8_0: blocks of 32 share one float16 scale, max |x| / 127; each value within half a step (+ fp16)
            blocks = ours.reshape(-1, 32)
            step = blocks.abs().amax(-1, keepdim=True) / 127
            error = (theirs.reshape(-1, 32) - blocks).abs()
            assert f.types[name] == qtype and (error <= 0.6 * step).all() and error.max() > 0, name


def test_rows_that_are_not_whole_q8_blocks_stay_float32_and_are_named(tmp_path):
    model = _model(intermediate_size=40)  # down_proj rows of 40: not a multiple of 32
    kept = export_gguf(model, BPE, tmp_path / "m.gguf", "q8_0")
    assert kept == [f"blk.{i}.ffn_down_exps.weight" for i in range(4)]


def test_tokenizer_travels_as_gpt2_bpe_padded_to_the_model_vocab(tmp_path):
    tokenizer = BPE
    model = _model()  # vocab 512 > the tokenizer's 300
    export_gguf(model, tokenizer, tmp_path / "m.gguf")
    f = Gguf(tmp_path / "m.gguf")
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 512
    for text, i in tokenizer.get_vocab().items():
        assert tokens[i] == text
    end = tokenizer.token_to_id("<|endoftext|>")
    assert types[end] == gguf.TokenType.CONTROL and f["tokenizer.ggml.eos_token_id"] == end
    assert types[400] == gguf.TokenType.UNUSED and tokens[400] == "[PAD400]"
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.merges"]) == 300 - 257 and f["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"postnorm": False}, "post-norm"),
        ({"mlp_alpha_factor": 2.0}, "alphas differ"),
        ({"linear_attn_beta_factor": 0.5, "full_attn_beta_factor": 0.5, "mlp_beta_factor": 0.5}, "betas of 1"),
        ({"num_hidden_layers": 1, "layer_types": [LIGHTNING]}, ">= 2 layers"),
    ],
)
def test_configs_llama_cpp_would_compute_differently_are_refused(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        export_gguf(_model(**changes), BPE, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_without_merges_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="needs merges"):
        export_gguf(_model(), BPE_LESS, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_text("keep me")
    with pytest.raises(CheckpointError, match="--overwrite"):
        export_gguf(_model(), BPE, path)
    assert path.read_text() == "keep me"
    export_gguf(_model(), BPE, path, overwrite=True)
    assert Gguf(path)["general.architecture"] == "minimax-01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left


def test_llama_cpp_python_logits_and_greedy_tokens_equal_hylas(tmp_path):
    """llama.cpp itself on the exported file: every position's logits within float32 distance of hyla's, and
    greedy tokens equal up to the first near tie (hyla's top two within 1e-3, where float32 order decides)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer = train_bpe(TEXTS, 320)
    model = _model(vocab_size=320, hidden_size=64, intermediate_size=64)
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path)
    # float32 KV cache (llama.cpp keeps float16 by default), so that both sides compute in float32
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, type_k=0, type_v=0, verbose=False)
    prompt = tokenizer.encode("def parse(self").ids
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(40):  # a full forward per step: the slow, trusted reference
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        ours = model(torch.tensor([tokens])).logits[0]
    llm.eval(tokens)
    theirs = torch.from_numpy(np.array(llm.scores[: len(tokens)]))
    assert rel_err(theirs, ours) < 1e-3
    llm.reset()
    generated = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        generated.append(token)
        if len(generated) == 40:
            break
    top2 = ours[len(prompt) - 1 : -1].topk(2).values
    ties = ((top2[:, 0] - top2[:, 1]) < 1e-3).nonzero()
    agree = int(ties[0]) if len(ties) else 40
    assert agree >= 10 and generated[:agree] == tokens[len(prompt) : len(prompt) + agree]
