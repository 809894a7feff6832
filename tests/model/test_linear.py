"""PackedLinear and Int8Linear: linear layers that own a prepared copy of their weight, swapped in for nn.Linear,
against F.linear on the same parameters."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyla.model.linear import Int8Linear, PackedLinear, PreparedSparseMoE, prepare_for_cpu_inference
from hyla.model.moe import SparseMoE
from tests.conftest import rel_err


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


@pytest.fixture(params=["gemv", "no compiler"])
def kernel(request, monkeypatch):
    """Both one-row paths: the gemv kernel built, and no C++ compiler (the library path)."""
    from hyla.ops import gemv

    if request.param == "no compiler":
        monkeypatch.setattr(gemv, "_kernel", lambda: None)
    return request.param


def test_one_row_runs_through_gemv_or_the_library_path_without_it(kernel):
    """With the kernel one row runs through it on the transposed weight (no packed copy made); without, a large
    weight's one row runs through the packed copy. Every path equals F.linear, with and without a bias, in place
    changes followed."""
    from hyla.model.linear import PACKED_ONE_ROW_MIN_WEIGHTS

    for bias in (True, False):
        layer = prepare_for_cpu_inference(nn.Linear(1024, PACKED_ONE_ROW_MIN_WEIGHTS // 1024 + 3, bias=bias))
        assert layer.use_gemv == (kernel == "gemv") and layer.weight.t().is_contiguous()
        with torch.no_grad():
            for rows in (1, 3):
                x = torch.randn(1, rows, 1024)
                assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-5
                assert len(layer._copies) == (rows > 1 or kernel != "gemv")  # a packed copy from the first call?
            layer.weight.mul_(-1)
            x = torch.randn(1024)
            assert rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-5


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
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert {type(m) for m in moes} == {PreparedSparseMoE} and {m.kind for m in moes} == {quantize or "packed"}
    assert {k: id(p) for k, p in model.named_parameters()} == params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "forward" not in vars(next(m for m in model.modules() if isinstance(m, nn.Linear)))
    assert rel_err(got, ref) < (0.05 if quantize else 1e-5)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_prepared_experts_follow_weight_changes_keep_autograd_and_copy_with_their_own_weights(quantize):
    import copy

    import hyla
    from hyla.ops.moe import route, swiglu_experts

    def float_experts(moe, x):  # the same router, the experts in float32
        flat = x.reshape(-1, x.shape[-1])
        _, weights, experts = route(moe.gate(flat), moe.top_k)
        return swiglu_experts(flat, weights, experts, moe.gate_up_proj, moe.down_proj).view_as(x)

    torch.manual_seed(0)
    model = hyla.HylaForCausalLM(hyla.preset("tiny")).eval()
    gate_up = model.model.layers[0].mlp.gate_up_proj
    moe = prepare_for_cpu_inference(model, quantize).model.layers[0].mlp
    assert isinstance(moe, PreparedSparseMoE) and moe.gate_up_proj is gate_up
    tolerance = 0.05 if quantize else 1e-5
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert rel_err(moe(x)[0], float_experts(moe, x)) < tolerance
        moe.down_proj.mul_(-1)  # in place, as an optimizer step: the copies are made again
        assert rel_err(moe(x)[0], float_experts(moe, x)) < tolerance
        twin = copy.deepcopy(moe)
        twin.gate_up_proj.mul_(2)
        assert twin.token != moe.token and twin.gate_up_proj is not moe.gate_up_proj and twin.kind == moe.kind
        assert rel_err(twin(x)[0], float_experts(twin, x)) < tolerance
        assert rel_err(moe(x)[0], float_experts(moe, x)) < tolerance
    out, _ = moe(x.requires_grad_())  # with autograd the float experts run, so gradients reach the weights
    assert rel_err(out, float_experts(moe, x)) < 1e-6
    out.sum().backward()
    assert moe.gate_up_proj.grad is not None and moe.gate_up_proj.grad.abs().sum() > 0


def test_compiled_experts_take_the_gemv_kernel_or_the_packed_copies_and_equal_the_float_experts(monkeypatch):
    """A compiled step of several tokens: up to COMPILED_GEMV_MAX_TOKENS tokens through the gemv kernel (where it
    builds); more through the packed copies as one opaque op for large experts (an expert's gate/up matrix of 2^20
    weights) and the graph's own products for small ones; all equal the float experts."""
    import hyla
    import hyla.model.linear as prepared
    import hyla.ops.moe as moe_ops
    from hyla.model.linear import PACKED_COMPILED_MIN_WEIGHTS, prepare_for_compile
    from hyla.ops import gemv
    from hyla.ops.moe import COMPILED_GEMV_MAX_TOKENS, route, swiglu_experts

    calls = []
    real, real_gemv = prepared.prepared_swiglu_experts, moe_ops.experts_gemv
    monkeypatch.setattr(prepared, "prepared_swiglu_experts", lambda *args: calls.append("copies") or real(*args))
    monkeypatch.setattr(moe_ops, "experts_gemv", lambda *args: calls.append("gemv") or real_gemv(*args))
    torch.manual_seed(0)
    for hidden, inter in [(64, 32), (1024, 512)]:
        config = hyla.preset("tiny").replace(hidden_size=hidden, intermediate_size=inter, num_experts=4)
        block = SparseMoE(config).eval()
        for weight in block.parameters():
            nn.init.normal_(weight, std=hidden**-0.5)
        moe = prepare_for_cpu_inference(nn.ModuleList([block]))[0]
        assert moe.compiled_copies == (2 * inter * hidden >= PACKED_COMPILED_MIN_WEIGHTS)
        prepare_for_compile(moe)
        for tokens in (5, COMPILED_GEMV_MAX_TOKENS + 3):
            x = torch.randn(tokens, hidden)
            with torch.no_grad():
                _, weights, experts = route(moe.gate(x), moe.top_k)
                expected = swiglu_experts(x, weights, experts, moe.gate_up_proj, moe.down_proj)
                compiled = torch.compile(moe.experts, fullgraph=True, dynamic=False)
                calls.clear()
                assert rel_err(compiled(x, weights, experts), expected) < 1e-5
            kernel = gemv.available() and tokens <= COMPILED_GEMV_MAX_TOKENS
            assert calls == (["gemv"] if kernel else ["copies"] if moe.compiled_copies else [])
            torch._dynamo.reset()


def test_a_collected_int8_layer_leaves_no_entry():
    import gc

    layer = prepare_for_cpu_inference(nn.Linear(16, 8), "int8")
    token = layer.token
    assert Int8Linear._by_token[token] is layer
    del layer
    gc.collect()
    assert token not in Int8Linear._by_token


def test_an_engine_that_batches_prepares_every_copy_at_start():
    import hyla
    from hyla.data.tokenizer import byte_level_tokenizer
    from hyla.serve import LLM, EngineConfig

    def copies(llm):
        return {len(m._copies) for m in llm.engine.model.modules() if isinstance(m, PackedLinear)}

    batching = LLM(hyla.HylaForCausalLM(hyla.preset("tiny")), byte_level_tokenizer(), EngineConfig(max_num_seqs=4))
    assert copies(batching) == {1}
    single = LLM(hyla.HylaForCausalLM(hyla.preset("tiny")), byte_level_tokenizer(), EngineConfig(max_num_seqs=1))
    assert copies(single) == {0}  # one request: made on first use, the LM head's never (one row)
