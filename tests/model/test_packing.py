"""Packed documents (tokens [1, ΣT] + cu_seqlens): nothing crosses a document boundary."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import rel_err
from tests.helpers import PATTERNS, random_model


@pytest.mark.parametrize("pattern", ["hybrid-7:1", "alternating", "all-softmax"])
@pytest.mark.parametrize("lengths", [[1, 17, 64, 40], [100], [33, 2]])
def test_packed_batch_equals_each_document_alone(pattern, lengths):
    model = random_model(layer_types=PATTERNS[pattern]).double()
    docs = [torch.randint(0, model.config.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    with torch.no_grad():
        out = model(packed, cu_seqlens=cu_seqlens)
        loss = model.loss(packed, cu_seqlens=cu_seqlens).loss
        alone = [model(doc).logits for doc in docs]
    assert rel_err(out.logits, torch.cat(alone, dim=1)) < 1e-10
    # The loss: every next-token prediction inside a document, none across a boundary.
    logits = torch.cat([a[0, :-1] for a in alone])
    targets = torch.cat([d[0, 1:] for d in docs])
    assert rel_err(loss, F.cross_entropy(logits, targets)) < 1e-10


def test_packed_float32_matches_to_rounding():
    model = random_model()
    docs = [torch.randint(0, model.config.vocab_size, (1, n)) for n in (50, 7, 90)]
    cu_seqlens = torch.tensor([0, 50, 57, 147])
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), cu_seqlens=cu_seqlens).logits
        alone = torch.cat([model(doc).logits for doc in docs], dim=1)
    assert rel_err(packed, alone) < 1e-5


def test_packing_needs_one_row_and_no_cache():
    model = random_model()
    ids = torch.randint(0, 100, (2, 10))
    with pytest.raises(ValueError, match="one row of input_ids"):
        model(ids, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="without a cache"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 10]), cache=object())


def test_a_packed_batch_is_planned_once_for_every_layer(monkeypatch):
    """Seven lightning layers and two softmax layers share one plan each per forward (and its backward)."""
    from hyla.ops import attention
    from hyla.ops.lightning import chunk

    built = {"lightning": 0, "softmax": 0}
    plan, buckets = chunk._Plan, attention._buckets

    def counting_plan(*args, **kwargs):
        built["lightning"] += 1
        return plan(*args, **kwargs)

    def counting_buckets(*args, **kwargs):
        built["softmax"] += 1
        return buckets(*args, **kwargs)

    monkeypatch.setattr(chunk, "_Plan", counting_plan)
    monkeypatch.setattr(attention, "_buckets", counting_buckets)
    model = random_model(layer_types=PATTERNS["hybrid-7:1"] + PATTERNS["all-softmax"][:1]).train()
    ids = torch.randint(0, model.config.vocab_size, (1, 90))
    out = model.loss(ids, cu_seqlens=torch.tensor([0, 30, 31, 90]))
    out.loss.backward()
    assert built == {"lightning": 1, "softmax": 1}
