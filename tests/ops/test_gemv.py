"""The one-row kernels against F.linear: float32 weights, and int8 ones against their dequantized values."""

import torch
import torch.nn.functional as F

from tests.conftest import rel_err


def test_the_gemv_kernel_equals_f_linear_on_awkward_shapes_and_inside_a_compiled_graph():
    from hyla.ops.gemv import available, gemv

    assert available()  # the machines that run the suite have a C++ compiler (the library path: the test above)
    for out, inp in [(1, 1), (7, 13), (1000, 1024), (3, 5000), (8192, 64), (257, 6)]:
        w, b = torch.randn(inp, out).t(), torch.randn(out)  # stored transposed, as the engine stores weights
        for x in (torch.randn(inp), torch.randn(1, 1, inp), torch.randn(1, 2 * inp)[:, ::2]):
            assert rel_err(gemv(x, w), F.linear(x, w)) < 1e-5
            assert rel_err(gemv(x, w, b), F.linear(x, w, b)) < 1e-5
    compiled = torch.compile(lambda x, w, b: gemv(torch.tanh(x), w, b) * 2, fullgraph=True)
    x, w, b = torch.randn(1, 96), torch.randn(96, 40).t(), torch.randn(40)
    assert rel_err(compiled(x, w, b), F.linear(torch.tanh(x), w, b) * 2) < 1e-5


def test_the_int8_kernel_equals_f_linear_on_the_dequantized_weight_and_int8_linear_takes_it_for_one_row():
    """One row against an int8 weight (one scale per output row), the row itself not quantized: F.linear on the
    dequantized weight up to float32 summation order, on awkward shapes; what int8_linear runs for one row of a
    matrix under 2^20 weights (the same int8 values as fbgemm's packed copy, which several rows and larger
    matrices take)."""
    from hyla.ops.gemv import gemv_int8
    from hyla.ops.linear import int8_linear, quantize_int8

    for out, inp in [(1, 1), (7, 13), (1000, 1024), (3, 5000), (257, 6)]:
        weight, bias = torch.randn(out, inp), torch.randn(out)
        q = quantize_int8(weight, bias)
        dequantized = q.transposed.t().float() * q.scale[:, None]
        assert (dequantized - weight).abs().max() <= weight.abs().amax() / 254 * 1.0001  # half a step of 127
        for x in (torch.randn(inp), torch.randn(1, 1, inp), torch.randn(1, 2 * inp)[:, ::2]):
            assert rel_err(gemv_int8(x, q.transposed, q.scale), F.linear(x, dequantized)) < 1e-5
            assert rel_err(int8_linear(x, q), F.linear(x, dequantized, bias)) < 1e-5
        rows = torch.randn(3, inp)  # fbgemm, its activations quantized: close, not equal
        assert rel_err(int8_linear(rows, q), F.linear(rows, dequantized, bias)) < 0.03
    weight = torch.randn(1024, 1024)  # 2^20 weights: one row through fbgemm too
    q, x = quantize_int8(weight), torch.randn(1024)
    assert 1e-4 < rel_err(int8_linear(x, q), F.linear(x, q.transposed.t().float() * q.scale[:, None])) < 0.03
