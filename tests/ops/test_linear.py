"""Prepacked oneDNN and int8 linear products against F.linear, and the modules that own those copies."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyla.model.linear import Int8Linear, PackedLinear, prepare_for_cpu_inference
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


def test_prepared_linears_follow_in_place_changes_and_keep_autograd():
    layer = prepare_for_cpu_inference(nn.Linear(16, 8))
    assert isinstance(layer, PackedLinear)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-6
        layer.weight.mul_(-2)  # an optimizer step would change it in place too
        assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-6
    layer.weight = nn.Parameter(torch.randn(8, 16))  # a new tensor (a load with assign=True)
    with torch.no_grad():
        assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-6
    layer(x).sum().backward()  # with autograd the plain product runs, so gradients still flow
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert set(layer.state_dict()) == {"weight", "bias"}


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


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_copied_prepared_layer_computes_with_its_own_weight(quantize):
    import copy

    layer = prepare_for_cpu_inference(nn.Linear(16, 8), quantize)
    assert type(layer) is (Int8Linear if quantize else PackedLinear)
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer(x)  # packed from the original's weight
        twin = copy.deepcopy(layer)
        twin.weight.mul_(3)
        tolerance = 0.03 if quantize else 1e-6
        assert rel_err(twin(x), F.linear(x, twin.weight, twin.bias)) < tolerance
        assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) < tolerance


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_model_prepared_for_the_cpu_keeps_its_parameters_and_computes_the_same(quantize):
    """The swap: every packable nn.Linear becomes a module owning its copy, with the same parameter tensors (the
    state_dict unchanged, nothing patched onto nn.Linear), and the model computes what it did."""
    import hyla

    torch.manual_seed(0)
    model = hyla.HylaForCausalLM(hyla.preset("tiny")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: id(p) for k, p in model.named_parameters()}
    ids = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        ref = model(ids).logits
        prepare_for_cpu_inference(model, quantize)
        got = model(ids).logits
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {Int8Linear if quantize else PackedLinear}
    assert {k: id(p) for k, p in model.named_parameters()} == params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "forward" not in vars(next(m for m in model.modules() if isinstance(m, nn.Linear)))
    assert rel_err(got, ref) < (0.05 if quantize else 1e-5)


def test_a_collected_int8_layer_leaves_no_entry():
    import gc

    layer = prepare_for_cpu_inference(nn.Linear(16, 8), "int8")
    token = layer.token
    assert Int8Linear._by_token[token] is layer
    del layer
    gc.collect()
    assert token not in Int8Linear._by_token
