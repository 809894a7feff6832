"""Prepacked oneDNN and int8 linear products against F.linear, and the engine's use of int8 layers."""

import pytest
import torch
import torch.nn.functional as F

from hyla.ops.linear import can_pack, int8_linear, pack, packed_linear, quantize_int8
from tests.conftest import rel_err


@pytest.mark.parametrize("rows", [0, 1, 2, 7, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, bias):
    weight, b = torch.randn(96, 40), torch.randn(96) if bias else None
    x = torch.randn(rows, 3, 40)  # leading dims are flattened and restored
    got = packed_linear(x, pack(weight), b)
    assert got.shape == (rows, 3, 96)
    assert rows == 0 or rel_err(got, F.linear(x, weight, b)) < 1e-6


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_inside_a_compiled_graph(bias):
    """One opaque operation inside ``torch.compile``, fused with what surrounds it, on any row count."""
    weight, b = torch.randn(96, 40), torch.randn(96) if bias else None
    packed = pack(weight)
    compiled = torch.compile(lambda x: torch.relu(packed_linear(x * 2, packed, b)), dynamic=True)
    for rows in (2, 5):
        x = torch.randn(rows, 40)
        assert rel_err(compiled(x), torch.relu(F.linear(x * 2, weight, b))) < 1e-6


def test_only_float32_cpu_matrices_are_packed():
    assert can_pack(torch.randn(4, 4))
    assert not can_pack(torch.randn(4, 4, dtype=torch.bfloat16))
    assert not can_pack(torch.randn(4, 4, dtype=torch.float64)) and not can_pack(torch.randn(4))


@pytest.mark.parametrize("rows", [0, 1, 5, 40])
def test_int8_linear_is_within_its_quantization_error(rows):
    weight, bias = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(rows, 2, 64)
    got = int8_linear(x, quantize_int8(weight, bias))
    assert got.shape == (rows, 2, 96) and got.dtype == torch.float32
    if rows:
        ref = F.linear(x, weight, bias)
        # weights to 8 bits per row, activations to 7 bits per call: ~1% of the output's scale, measured
        assert 1e-4 < rel_err(got, ref) < 0.03


def test_engine_int8_runs_close_to_float32_and_refuses_what_it_cannot_do():
    import hyla
    from hyla.data.tokenizer import byte_level_tokenizer
    from hyla.errors import ConfigError
    from hyla.serve import LLM, EngineConfig, SamplingParams

    model = hyla.HylaForCausalLM(hyla.preset("tiny")).eval()
    prompt = torch.randint(0, 256, (40,)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1, :256]
    llm = LLM(model, byte_level_tokenizer(), EngineConfig(max_model_len=128, quantize="int8"))
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
    assert len(out.token_ids) == 1
    assert abs(out.logprobs[0].logprob - float(ref.log_softmax(-1)[out.token_ids[0]])) < 0.05
    with pytest.raises(ConfigError, match="quantize"):
        LLM(hyla.HylaForCausalLM(hyla.preset("tiny")), byte_level_tokenizer(), EngineConfig(quantize="int4"))
    with pytest.raises(ConfigError, match="float32"):
        bf16 = hyla.HylaForCausalLM(hyla.preset("tiny")).to(torch.bfloat16)
        LLM(bf16, byte_level_tokenizer(), EngineConfig(quantize="int8"))
