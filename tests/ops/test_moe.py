"""MoE routing and dispatch against a per-token, per-expert loop; the aux loss against transformers'."""

import pytest
import torch
import torch.nn.functional as F

from hyla.ops.linear import int8_linear, quantize_int8
from hyla.ops.moe import (
    load_balancing_loss,
    load_balancing_stats,
    prepare_experts,
    prepared_swiglu_experts,
    route,
    swiglu_experts,
)
from tests.conftest import rel_err


def reference_experts(x, weights, experts, gate_up, down):
    inter = down.shape[-1]
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = experts[n, j]
            g, u = gate_up[e, :inter] @ x[n], gate_up[e, inter:] @ x[n]
            out[n] += weights[n, j] * (down[e] @ (F.silu(g) * u))
    return out


@pytest.mark.parametrize(("n", "num_experts", "top_k"), [(1, 4, 2), (37, 8, 2), (50, 4, 4), (64, 16, 1), (3, 16, 2)])
@pytest.mark.parametrize("path", ["loop", "grouped", "pairs", "gather", "dense"])
def test_swiglu_experts_match_per_token_loop(n, num_experts, top_k, path):
    """Outputs and every gradient (tokens, router weights, both expert weights); most experts get no token when
    ``n`` is small."""
    grouped = path == "grouped"
    dtype = torch.float32 if grouped else torch.float64  # the grouped kernel has no float64
    h, inter = 16, 24
    x = torch.randn(n, h, dtype=dtype, requires_grad=True)
    gate_up = (torch.randn(num_experts, 2 * inter, h, dtype=dtype) * 0.2).requires_grad_()
    down = (torch.randn(num_experts, h, inter, dtype=dtype) * 0.2).requires_grad_()
    _, weights, experts = route(torch.randn(n, num_experts), top_k)
    weights = weights.to(dtype).requires_grad_()
    got = swiglu_experts(x, weights, experts, gate_up, down, path=path)
    ref = reference_experts(x, weights, experts, gate_up, down)
    tol = 1e-5 if grouped else 1e-12
    assert got.shape == x.shape and got.dtype == dtype
    assert rel_err(got, ref) < tol
    dy = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (x, weights, gate_up, down), dy)
    g_ref = torch.autograd.grad(ref, (x, weights, gate_up, down), dy)
    for a, b in zip(g_got, g_ref, strict=True):
        assert a.dtype == b.dtype and rel_err(a, b) < tol


def engine_experts(n: int, num_experts: int, top_k: int):
    """``n`` tokens routed top-k, and experts (hidden 32, intermediate 48) stored transposed as the serving engine
    stores them: ``(x, weights, experts, gate_up, down)``."""
    h, inter = 32, 48
    gate_up = (torch.randn(num_experts, 2 * inter, h) * 0.2).transpose(1, 2).contiguous().transpose(1, 2)
    down = (torch.randn(num_experts, h, inter) * 0.2).transpose(1, 2).contiguous().transpose(1, 2)
    _, weights, experts = route(torch.randn(n, num_experts), top_k)
    return torch.randn(n, h), weights, experts, gate_up, down


@pytest.mark.parametrize(("n", "num_experts", "top_k"), [(1, 4, 2), (37, 8, 2), (3, 16, 2), (64, 16, 1)])
def test_int8_experts_match_the_per_expert_int8_products_and_stay_near_the_float_ones(n, num_experts, top_k):
    """Against each expert's two int8 products over the tokens that chose it, picked by a mask (the same rounding:
    fbgemm scales the activations once per call, so the same calls; equal up to summation order) and against the
    float experts (the int8 model's rounding); most experts idle when ``n`` is small, and the transposed storage
    the serving engine gives the weights."""
    x, weights, experts, gate_up, down = engine_experts(n, num_experts, top_k)
    got = prepared_swiglu_experts(x, weights, experts, prepare_experts(gate_up, down, "int8"), "int8")
    by_expert = torch.zeros_like(x)
    for e in range(num_experts):
        chose = (experts == e).any(dim=1)
        if chose.any():
            g, u = int8_linear(x[chose], quantize_int8(gate_up[e])).chunk(2, dim=-1)
            y = int8_linear(F.silu(g) * u, quantize_int8(down[e]))
            by_expert[chose] += (weights * (experts == e)).sum(1)[chose, None] * y
    assert got.shape == x.shape and got.dtype == torch.float32
    assert rel_err(got, by_expert) < 1e-5
    assert rel_err(got, reference_experts(x, weights, experts, gate_up, down)) < 0.05  # 7-bit activations


@pytest.mark.parametrize(("n", "num_experts", "top_k"), [(0, 4, 2), (1, 4, 2), (2, 8, 2), (37, 8, 2), (600, 16, 1)])
def test_packed_experts_equal_the_per_token_loop(n, num_experts, top_k):
    """oneDNN-packed copies of the experts (the serving engine's float32 path from two tokens): the float products
    up to summation order, on the transposed storage the engine gives the weights; no tokens, one, a few with
    most experts idle, more than the grouped kernel takes."""
    x, weights, experts, gate_up, down = engine_experts(n, num_experts, top_k)
    got = prepared_swiglu_experts(x, weights, experts, prepare_experts(gate_up, down, "packed"), "packed")
    assert got.shape == x.shape and got.dtype == torch.float32
    assert n == 0 or rel_err(got, reference_experts(x, weights, experts, gate_up, down)) < 1e-5


def test_swiglu_experts_with_no_tokens_or_no_weight_gradients():
    gate_up, down = torch.randn(4, 8, 6, requires_grad=True), torch.randn(4, 6, 4, requires_grad=True)
    x = torch.randn(0, 6, requires_grad=True)
    out = swiglu_experts(x, torch.ones(0, 2), torch.zeros(0, 2, dtype=torch.long), gate_up, down)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert torch.equal(gate_up.grad, torch.zeros_like(gate_up)) and x.grad.shape == (0, 6)
    x = torch.randn(5, 6, requires_grad=True)  # only the input wants a gradient
    _, weights, experts = route(torch.randn(5, 4), 2)
    gx = torch.autograd.grad(swiglu_experts(x, weights, experts, gate_up.detach(), down.detach()).sum(), x)[0]
    ref = torch.autograd.grad(reference_experts(x, weights, experts, gate_up.detach(), down.detach()).sum(), x)[0]
    assert rel_err(gx, ref) < 1e-5


def test_swiglu_experts_under_autocast():
    """The loop composed of autograd ops (autocast casts each product to bfloat16); the output keeps x's dtype."""
    x = torch.randn(40, 16, requires_grad=True)
    gate_up, down = torch.randn(4, 48, 16) * 0.2, torch.randn(4, 16, 24) * 0.2
    _, weights, experts = route(torch.randn(40, 4), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = swiglu_experts(x, weights, experts, gate_up, down)
    assert got.dtype == torch.float32
    reference = reference_experts(x, weights, experts, gate_up, down)
    assert rel_err(got, reference) < 2e-2
    dy = torch.randn_like(got)
    (grad,) = torch.autograd.grad((got * dy).sum(), x)
    (expected,) = torch.autograd.grad((reference * dy).sum(), x)
    assert rel_err(grad, expected) < 2e-2  # the float32 loop's gradient, to bfloat16's precision


def test_route_renormalises_the_top_k():
    logits = torch.randn(10, 6)
    probs, weights, experts = route(logits, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(10))
    assert torch.equal(experts, logits.topk(3, dim=-1).indices)
    assert torch.allclose(probs, logits.softmax(-1))


def test_load_balancing_loss_matches_transformers():
    from transformers.models.minimax.modeling_minimax import load_balancing_loss_func

    layers = [torch.randn(40, 8) for _ in range(3)]
    stats = sum(load_balancing_stats(*route(logits, 2)[::2]) for logits in layers)
    ours = load_balancing_loss(stats, 40 * 3)
    theirs = load_balancing_loss_func(tuple(layers), 8, 2)
    assert rel_err(ours, theirs) < 1e-6


def test_balanced_routing_gives_the_minimum_loss():
    # 20 tokens, top-2 of 4 experts, spread evenly with uniform probabilities: f_e = 2/4, P_e = 1/4,
    # so E * sum_e f_e P_e = 4 * 4 * (1/2) * (1/4) = 2 = k, the loss's minimum.
    stats = torch.stack((torch.full((4,), 10.0), torch.full((4,), 20 / 4)))
    assert load_balancing_loss(stats, 20).item() == pytest.approx(2.0)


def transposed(w):
    """``w`` with each expert's matrix stored transposed (the serving engine's storage): same values and shape."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_the_gemv_path_matches_the_per_token_loop_on_awkward_shapes_and_thread_counts(threads):
    """All tokens' chosen experts in one kernel call (float32, the transposed storage; inference only): the rows
    of the chosen experts split over the threads, boundaries falling inside an expert, each expert's rows applied
    to every token that chose it (several tokens sharing experts; outputs past one chunk of 1024), equal to the
    per-token loop."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, h, inter, num_experts, k in [(1, 40, 24, 8, 2), (3, 37, 13, 5, 2), (1, 1, 1, 2, 2), (2, 3, 1, 4, 3),
                                            (1, 512, 256, 8, 2), (1, 9, 5, 3, 1), (5, 512, 256, 8, 2),
                                            (8, 33, 600, 4, 2), (9, 17, 7, 3, 3), (6, 12, 10, 16, 4)]:  # fmt: skip
            x = torch.randn(n, h)
            gate_up = transposed(torch.randn(num_experts, 2 * inter, h) * 0.2)
            down = transposed(torch.randn(num_experts, h, inter) * 0.2)
            _, weights, experts = route(torch.randn(n, num_experts), k)
            with torch.no_grad():
                got = swiglu_experts(x, weights, experts, gate_up, down, path="gemv")
            assert rel_err(got, reference_experts(x, weights, experts, gate_up, down)) < 1e-5
    finally:
        torch.set_num_threads(before)


def test_the_gemv_path_is_one_operation_inside_a_compiled_graph():
    x = torch.randn(1, 48)
    gate_up, down = transposed(torch.randn(6, 2 * 20, 48) * 0.2), transposed(torch.randn(6, 48, 20) * 0.2)
    _, weights, experts = route(torch.randn(1, 6), 2)
    compiled = torch.compile(lambda x, w, e: swiglu_experts(torch.tanh(x), w, e, gate_up, down, "gemv") * 2,
                             fullgraph=True)  # fmt: skip
    with torch.no_grad():
        got = compiled(x, weights, experts)
    assert rel_err(got, reference_experts(torch.tanh(x), weights, experts, gate_up, down) * 2) < 1e-5
