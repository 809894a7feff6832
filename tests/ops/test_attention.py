"""Softmax attention (SDPA, GQA, cache continuation) and RoPE against explicit formulas in float64."""

import itertools
import math

import pytest
import torch

from hyla.ops.attention import paged_attention, softmax_attention
from hyla.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq
from tests.conftest import rel_err


def reference_attention(q, k, v):
    """Explicit softmax(QK^T / sqrt(D) + causal mask) V with the queries at the end of the keys."""
    tq, hq, d = q.shape[1:]
    tk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    pos_q = torch.arange(tk - tq, tk)[:, None]
    scores = scores.masked_fill(torch.arange(tk)[None, :] > pos_q, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize(("tq", "tk"), [(1, 1), (17, 17), (1, 40), (9, 40)])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (8, 2)])
def test_softmax_attention_matches_reference(tq, tk, hq, hkv):
    q = torch.randn(2, tq, hq, 16, dtype=torch.float64)
    k, v = (torch.randn(2, tk, hkv, 16, dtype=torch.float64) for _ in range(2))
    assert rel_err(softmax_attention(q, k, v), reference_attention(q, k, v)) < 1e-12


def test_softmax_attention_rejects_fewer_keys_than_queries():
    q = torch.randn(1, 5, 2, 8)
    k = torch.randn(1, 3, 2, 8)
    with pytest.raises(ValueError, match="at least as many keys"):
        softmax_attention(q, k, k)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rope_rotates_pairs_and_passes_the_rest(rotary_dim):
    d, theta = 16, 10_000.0
    x = torch.randn(1, 7, 3, d, dtype=torch.float64)
    positions = torch.arange(7)[None]
    cos, sin = rope_cos_sin(positions, rope_inv_freq(rotary_dim, theta), torch.float64)
    y = apply_rope(x, cos, sin)
    half = rotary_dim // 2
    for t in range(7):
        for i in range(half):
            angle = t * theta ** (-2 * i / rotary_dim)
            a, b = x[0, t, :, i], x[0, t, :, i + half]
            ca, sa = math.cos(angle), math.sin(angle)
            # float32 angles, as transformers computes them
            assert torch.allclose(y[0, t, :, i], a * ca - b * sa, atol=1e-5)
            assert torch.allclose(y[0, t, :, i + half], b * ca + a * sa, atol=1e-5)
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])
    # A rotation keeps the norm of each rotated pair.
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("lengths", [[5, 1, 12], [5, 1, 12, 0, 70, 130, 64, 65, 3], [200], [0, 9, 0]])
def test_packed_sequences_attend_only_within_themselves(lengths):
    """Packed sequences (in length buckets: here several, some sharing one, some empty) against each sequence's
    own attention, outputs and gradients."""
    total = sum(lengths)
    q = torch.randn(1, total, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, total, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out = softmax_attention(q, k, v, cu_seqlens=cu_seqlens)
    bounds = cu_seqlens.tolist()
    ref = torch.cat([reference_attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in itertools.pairwise(bounds)], 1)
    assert out.shape == q.shape and rel_err(out, ref) < 1e-12
    do = torch.randn_like(out)
    got = torch.autograd.grad((out * do).sum(), (q, k, v))
    want = torch.autograd.grad((ref * do).sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("offsets", [[1, 5, 18], [0, 5, 17], [0, 9, 5, 18]])
def test_packed_offsets_that_do_not_cover_the_row_are_refused(offsets):
    q, k, v = torch.randn(1, 18, 2, 8), torch.randn(1, 18, 1, 8), torch.randn(1, 18, 1, 8)
    with pytest.raises(ValueError, match="rise from 0 to the packed length 18"):
        softmax_attention(q, k, v, cu_seqlens=torch.tensor(offsets))


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_equals_dense_per_sequence(block_size):
    """Sequences scattered over a shuffled block pool, padded queries, GQA: each equals its dense attention."""
    hq, hkv, d = 4, 2, 8
    context_lens = [1, 17, 64, 5]
    query_lens = [1, 17, 3, 2]  # a one-token prompt, a whole prompt, a chunk, a short chunk
    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    k_pool = torch.randn(num_blocks, block_size, hkv, d, dtype=torch.float64)
    v_pool = torch.randn_like(k_pool)
    order = torch.randperm(num_blocks).tolist()
    tables, dense = [], []
    for n in context_lens:
        table = [order.pop() for _ in range(-(-n // block_size))]
        tables.append(table)
        k = torch.cat([k_pool[b] for b in table])[:n]
        v = torch.cat([v_pool[b] for b in table])[:n]
        dense.append((k, v))
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    tq = max(query_lens)
    q = torch.randn(len(context_lens), tq, hq, d, dtype=torch.float64)
    out = paged_attention(q, k_pool, v_pool, block_tables, torch.tensor(context_lens), torch.tensor(query_lens))
    assert out.isfinite().all()
    for i, ((k, v), n) in enumerate(zip(dense, query_lens, strict=True)):
        expected = softmax_attention(q[i : i + 1, :n], k[None], v[None])
        assert rel_err(out[i : i + 1, :n], expected) < 1e-12
