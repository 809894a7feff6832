"""rms_norm and its in-place gated form against the formula in float64 (the statistic is float32 in hyla,
as in transformers, whatever the inputs' dtype)."""

import pytest
import torch

from hyla.ops.norm import gated_rms_norm_, rms_norm, rms_norm_reference
from tests.conftest import rel_err


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x, weight = x.double(), weight.double()
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("shape", [(1, 512), (3, 7, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_formula(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    weight = torch.rand(shape[-1], dtype=dtype) + 0.5
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, reference(x, weight, 1e-6)) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_rms_norm_gradients_match_the_formula():
    x = torch.randn(4, 9, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(32, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 9, 32, dtype=torch.float64)
    got = torch.autograd.grad((rms_norm(x, weight, 1e-5) * dy).sum(), (x, weight))
    ref = torch.autograd.grad((reference(x, weight, 1e-5) * dy).sum(), (x, weight))
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_rms_norm_backward_equals_the_composed_forms(dtype, wants):
    """The hand-written backward against autograd through the composed ops, on rows that include a zero one."""
    x = torch.randn(3, 11, 40, dtype=dtype) * 2
    x[1, 4] = 0
    weight = torch.rand(40, dtype=dtype) + 0.5
    dy = torch.randn(3, 11, 40, dtype=dtype)
    leaves = [t.clone().requires_grad_(w) for t, w in zip((x, weight), wants, strict=True)]
    out = rms_norm(*leaves, 1e-6)
    wanted = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad((out * dy).sum(), wanted)
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref_out = rms_norm_reference(*ref_leaves, 1e-6)
    assert torch.equal(out.detach(), rms_norm_reference(x, weight, 1e-6))  # same forward values
    ref = torch.autograd.grad((ref_out * dy.double()).sum(), [t for t in ref_leaves if t.requires_grad])
    for g, r, leaf in zip(got, ref, wanted, strict=True):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert rel_err(g, r) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_rms_norm_eps_guards_a_zero_row():
    out = rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-6)
    assert torch.equal(out, torch.zeros(2, 8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gated_rms_norm_in_place_equals_the_composed_form(dtype):
    x, gate = (torch.randn(2, 37, 96, dtype=dtype) * 2 for _ in range(2))
    weight = torch.rand(96, dtype=dtype) + 0.5
    ref = torch.sigmoid(gate.double()) * reference(x, weight, 1e-6)
    out = gated_rms_norm_(gate, x, weight, 1e-6)
    assert out.data_ptr() == gate.data_ptr() and out.dtype == dtype
    assert rel_err(out, ref) < (2e-2 if dtype == torch.bfloat16 else 1e-6)
