"""Prepacked oneDNN linear layers against F.linear, and the serving runner's use of them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyla.ops.linear import can_pack, pack, packed_linear
from hyla.serve.runner import prepare_cpu_weights
from tests.conftest import rel_err


@pytest.mark.parametrize("rows", [0, 1, 2, 7, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows, bias):
    weight, b = torch.randn(96, 40), torch.randn(96) if bias else None
    x = torch.randn(rows, 3, 40)  # leading dims are flattened and restored
    got = packed_linear(x, pack(weight), b)
    assert got.shape == (rows, 3, 96)
    assert rows == 0 or rel_err(got, F.linear(x, weight, b)) < 1e-6


def test_only_float32_cpu_matrices_are_packed():
    assert can_pack(torch.randn(4, 4))
    assert not can_pack(torch.randn(4, 4, dtype=torch.bfloat16))
    assert not can_pack(torch.randn(4, 4, dtype=torch.float64)) and not can_pack(torch.randn(4))


def test_prepared_linears_follow_in_place_changes_and_keep_autograd():
    layer = nn.Linear(16, 8)
    prepare_cpu_weights(layer)
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
