"""The one-row float32 kernel against F.linear."""

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
