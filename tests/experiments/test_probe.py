"""Mechanism probes: the attention weights are the ones the layer applies; the linear probe finds what is there."""

import torch

from hyla.checkpoint import save_pretrained
from hyla.config import HylaConfig
from hyla.data.synthetic import word_tokenizer
from hyla.experiments.probe import _ridge_accuracy, attention_weights, probe
from hyla.experiments.sweep import model_fields
from hyla.model.decoder import HylaForCausalLM
from hyla.ops.rope import rope_cos_sin
from tests.helpers import random_model


def test_attention_weights_are_what_the_softmax_layer_applies():
    model = random_model(layer_types=["full_attention"], hidden_size=64, num_attention_heads=4,
                         num_key_value_heads=2).double()  # fmt: skip
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 11, 64, dtype=torch.float64)
    rope = rope_cos_sin(torch.arange(11)[None], model.model.inv_freq, torch.float64)
    weights = attention_weights(attn, x, rope)  # [B, H, T, T]
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4, 11, dtype=torch.float64))
    assert weights.triu(1).abs().max() == 0  # causal
    v = attn.v_proj(x).view(3, 11, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    expected = attn.o_proj((weights @ v).transpose(1, 2).reshape(3, 11, 64))
    torch.testing.assert_close(expected, attn(x, rope))


def test_the_ridge_probe_decodes_a_feature_that_is_there_and_not_one_that_is_not():
    torch.manual_seed(0)
    labels = torch.randint(0, 8, (600,))
    codes = torch.randn(8, 32)
    present = codes[labels] + 0.3 * torch.randn(600, 32)
    absent = torch.randn(600, 32)
    assert _ridge_accuracy(present, labels, 8, 300) > 0.95
    assert _ridge_accuracy(absent, labels, 8, 300) < 0.3  # chance is 1/8


def test_a_probe_reads_every_layer_and_each_softmax_heads_attention(tmp_path):
    config = HylaConfig(vocab_size=97, num_experts=2, **model_fields("SLLL", 4, 16))
    model = HylaForCausalLM(config)
    model.reset_parameters(seed=1)
    save_pretrained(model, tmp_path / "m", tokenizer=word_tokenizer(96))
    result = probe(tmp_path / "m", length=32, pairs=4, contexts=16)
    assert [p.kind for p in result.layers] == ["embedding", "softmax"] + ["lightning"] * 3
    assert result.chance == 1 / 32 and result.contexts == 16
    head = result.layers[1]
    assert len(head.to_value) == 2 and all(
        0 <= a + b + c <= 1 + 1e-6 for a, b, c in zip(head.to_value, head.to_key, head.to_other_values, strict=True)
    )
    assert result.layers[2].to_value is None and all(0 <= p.previous_key <= 1 for p in result.layers)
    assert result.table().count("\n") == 1 + len(result.layers)
