import pytest

from hyla.config import LIGHTNING, SOFTMAX, ConfigError, HylaConfig, hybrid_layer_types, preset


def test_small_preset_is_a_70m_hybrid():
    config = preset("small")
    assert 60e6 < config.num_parameters() < 80e6
    assert config.layer_types == [LIGHTNING] * 7 + [SOFTMAX]
    assert config.num_parameters(active=True) < config.num_parameters()


def test_hybrid_pattern():
    assert hybrid_layer_types(16).count(SOFTMAX) == 2
    assert hybrid_layer_types(16)[7] == SOFTMAX


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(hidden_size=100, num_attention_heads=8), "num_attention_heads .* must divide hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads .* must divide num_attention_heads"),
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok .* cannot exceed"),
        (dict(block_size=48), "block_size must be a power of two, got 48"),
        (dict(rotary_dim=7), "rotary_dim must be even"),
        (dict(num_hidden_layers=2, layer_types=[LIGHTNING]), "layer_types has 1 entries"),
        (dict(num_hidden_layers=1, layer_types=["mamba"]), "layer_types may hold only"),
        (dict(hidden_act="gelu"), "hidden_act must be 'silu'"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(eos_token_id=10**6), "eos_token_id .* below vocab_size"),
    ],
)
def test_invalid_configs_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        HylaConfig(**fields)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['hiden_size'\]"):
        preset("tiny", hiden_size=3)


def test_replace_rederives_head_dim_but_keeps_explicit_ones():
    config = preset("small", hidden_size=1024, num_attention_heads=8)
    assert config.head_dim == 128 and config.rotary_dim == 128
    explicit = preset("small", head_dim=32, rotary_dim=16).replace(hidden_size=1024)
    assert explicit.head_dim == 32 and explicit.rotary_dim == 16
