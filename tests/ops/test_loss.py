"""The fused LM-head cross-entropy against ``F.cross_entropy`` of the full logits: loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from hyla.ops.loss import linear_cross_entropy
from tests.conftest import rel_err


@pytest.mark.parametrize(("n", "chunk"), [(1, None), (37, 8), (64, 64), (100, 7)])
def test_loss_and_gradients_equal_the_reference(n, chunk):
    hidden = torch.randn(n, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (n,))
    targets[::3] = -100  # ignored rows (the first row too)
    if n == 1:
        targets[0] = 7
    loss = linear_cross_entropy(hidden, weight, targets, chunk)
    reference = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    assert rel_err(loss, reference) < 1e-12
    (g := torch.randn(())).mul(loss).backward()
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    g.mul(reference).backward()
    assert rel_err(dh, hidden.grad) < 1e-12 and rel_err(dw, weight.grad) < 1e-12


def test_every_row_ignored_gives_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(10, 8), torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_the_model_trains_the_same_with_the_fused_loss():
    from tests.helpers import random_model

    model = random_model().double()
    ids = torch.randint(0, model.config.vocab_size, (1, 45))
    cu_seqlens = torch.tensor([0, 20, 45])
    fused = model.loss(ids, cu_seqlens=cu_seqlens)
    assert fused.logits is None
    fused.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    # The reference: every logit, then cross-entropy within each document (none across the boundary at 20).
    logits = model(ids, cu_seqlens=cu_seqlens).logits[0]
    targets = torch.cat((ids[0, 1:20], ids[0, 21:]))
    plain = torch.nn.functional.cross_entropy(torch.cat((logits[:19], logits[20:44])), targets)
    plain.backward()
    assert rel_err(fused.loss, plain) < 1e-12
    assert all(rel_err(grads[k], p.grad) < 1e-10 for k, p in model.named_parameters())
