"""naive (the recurrence) -> recurrent (one step) -> chunk (blockwise): outputs, final states, gradients."""

import pytest
import torch

from hyla.ops.lightning import (
    chunk,
    lightning_attention,
    lightning_attention_chunk,
    lightning_attention_naive,
    lightning_attention_qkv,
    lightning_attention_step,
    lightning_state,
)
from tests.conftest import rel_err

B, H, D = 2, 3, 16


def inputs(t: int, dtype: torch.dtype, with_state: bool):
    q, k, v = (torch.randn(B, t, H, D, dtype=dtype) * 0.5 for _ in range(3))
    # Slopes as MiniMax draws them: 2^(-8 (h+1) / H), from fast to slow decay.
    slope = 2.0 ** (-8 * (torch.arange(H, dtype=dtype) + 1) / H)
    state = torch.randn(B, H, D, D, dtype=dtype) if with_state else None
    return q, k, v, slope, state


TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.fixture(params=["one group", "groups of 1 block", "groups of 3 blocks"])
def groups(request, monkeypatch):
    """The blockwise path walks the blocks in cache-sized groups: run with everything in one group, and with
    groups small enough that states, restarts and sequence ends cross group boundaries."""
    blocks = {"one group": None, "groups of 1 block": 1, "groups of 3 blocks": 3}[request.param]
    if blocks is not None:  # sized for 16-token float64 blocks; longer blocks or float32 make groups of 1..6
        monkeypatch.setattr(chunk, "GROUP_BYTES", blocks * 16 * H * D * 8)
    return blocks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t", [1, 63, 64, 65, 500])
@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_naive(dtype, t, block_size, with_state, groups):
    q, k, v, slope, state = inputs(t, dtype, with_state)
    o_ref, s_ref = lightning_attention_naive(q, k, v, slope, state)
    o, s = lightning_attention_chunk(q, k, v, slope, state, block_size=block_size)
    assert o.shape == (B, t, H, D) and o.dtype == dtype
    assert s.shape == (B, H, D, D)
    assert torch.isfinite(o).all()
    assert rel_err(o, o_ref) < TOL[dtype]
    assert rel_err(s, s_ref) < TOL[dtype]


@pytest.mark.parametrize("t", [1, 63, 64, 65, 500])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_gradients_match_naive(t, block_size, with_state, groups):
    q, k, v, slope, state = inputs(t, torch.float64, with_state)
    leaves = [x.requires_grad_() for x in (q, k, v) + ((state,) if with_state else ())]
    do = torch.randn(B, t, H, D, dtype=torch.float64)
    ds = torch.randn(B, H, D, D, dtype=torch.float64)

    def grads(fn):
        o, s = fn(q, k, v, slope, state)
        return torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)

    ref = grads(lightning_attention_naive)
    got = grads(lambda *a: lightning_attention_chunk(*a, block_size=block_size))
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recurrent_steps_match_naive(dtype):
    q, k, v, slope, state = inputs(37, dtype, with_state=True)
    o_ref, s_ref = lightning_attention_naive(q, k, v, slope, state)
    outs = []
    for i in range(q.shape[1]):
        o, state = lightning_attention_step(q[:, i], k[:, i], v[:, i], slope, state)
        outs.append(o)
    assert rel_err(torch.stack(outs, 1), o_ref) < TOL[dtype]
    assert rel_err(state, s_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_after_runs_of_packed_tokens_matches_naive(dtype):
    """The closed-form state after runs of packed tokens (awkward lengths, one token, none, a run starting
    mid-sequence) equals the recurrence's final state from each run's initial state."""
    total = 300
    _, k, v, slope, _ = inputs(total, dtype, with_state=False)
    k, v = k[0], v[0]  # [T, H, D], packed
    segments = [(0, 1), (5, 17), (40, 0), (40, 130), (299, 1), (100, 200)]
    init = torch.randn(len(segments), H, D, D, dtype=dtype)
    got = lightning_state(k, v, slope, init, segments)
    for i, (start, n) in enumerate(segments):
        run = k[None, start : start + n]
        _, expected = lightning_attention_naive(run, run, v[None, start : start + n], slope, init[i : i + 1])
        assert rel_err(got[i], expected[0]) < TOL[dtype], (start, n)
    assert lightning_state(k, v, slope, init[:0], []).shape == (0, H, D, D)


def test_prefill_in_pieces_equals_whole():
    """Continuing from a returned state is the same as one pass over the concatenation."""
    q, k, v, slope, _ = inputs(150, torch.float64, with_state=False)
    o_ref, s_ref = lightning_attention_naive(q, k, v, slope)
    o1, s1 = lightning_attention(q[:, :77], k[:, :77], v[:, :77], slope, block_size=32)
    o2, s2 = lightning_attention(q[:, 77:78], k[:, 77:78], v[:, 77:78], slope, s1)  # one decode step
    o3, s3 = lightning_attention(q[:, 78:], k[:, 78:], v[:, 78:], slope, s2, block_size=16)
    assert rel_err(torch.cat((o1, o2, o3), 1), o_ref) < 1e-10
    assert rel_err(s3, s_ref) < 1e-10


def test_empty_sequence_keeps_state():
    """No tokens: the final state is the initial one, as the recurrence gives it — a new tensor, so that a caller
    updating its state pool in place does not change what it was handed."""
    q, k, v, slope, state = inputs(0, torch.float32, with_state=True)
    _, expected = lightning_attention_naive(q, k, v, slope, state.clone())
    o, s = lightning_attention_chunk(q, k, v, slope, state)
    state.add_(1.0)
    assert o.shape == (B, 0, H, D)
    assert torch.equal(s, expected)


@pytest.mark.parametrize("d", [16, 32, 64, 100, 128, 256])
@pytest.mark.parametrize("t", [1, 37, 130])
def test_chunk_matches_naive_across_head_sizes(d, t):
    """Head sizes from 16 to 256, 100 among them (not a power of two), outputs and gradients."""
    q, k, v = (torch.randn(1, t, 2, d, dtype=torch.float64, requires_grad=True) * 0.3 for _ in range(3))
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    slope = torch.tensor([0.5, 0.05], dtype=torch.float64)
    state = torch.randn(1, 2, d, d, dtype=torch.float64)
    o_ref, s_ref = lightning_attention_naive(q, k, v, slope, state)
    o, s = lightning_attention_chunk(q, k, v, slope, state, block_size=64)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    do = torch.randn_like(o)
    got = torch.autograd.grad((o * do).sum(), (q, k, v))
    ref = torch.autograd.grad((o_ref * do).sum(), (q, k, v))
    assert all(rel_err(g, r) < 1e-10 for g, r in zip(got, ref, strict=True))


def test_bfloat16_inputs_keep_a_float32_state():
    q, k, v, slope, state = inputs(100, torch.float32, with_state=True)
    exact = [x.double().requires_grad_() for x in (q, k, v)]
    o_ref, s_ref = lightning_attention_naive(*exact, slope.double(), state.double())
    half = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    o, s = lightning_attention(*half, slope, state, block_size=32)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 2e-2
    assert rel_err(s, s_ref) < 2e-2
    do = torch.randn(o.shape)
    got = torch.autograd.grad((o.float() * do).sum(), half)
    ref = torch.autograd.grad((o_ref * do).sum(), exact)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) < 2e-2


def test_block_size_must_be_a_power_of_two():
    q, k, v, slope, _ = inputs(10, torch.float32, with_state=False)
    with pytest.raises(ValueError, match="power of two, got 48"):
        lightning_attention_chunk(q, k, v, slope, block_size=48)


def varlen_reference(q, k, v, slope, states, lengths):
    """Each packed sequence through the naive recurrence on its own."""
    outs, finals, start = [], [], 0
    for i, length in enumerate(lengths):
        init = None if states is None else states[i : i + 1]
        o, s = lightning_attention_naive(q[:, start : start + length], k[:, start : start + length],
                                         v[:, start : start + length], slope, init)  # fmt: skip
        outs.append(o)
        finals.append(s)
        start += length
    return torch.cat(outs, dim=1), torch.cat(finals)


@pytest.mark.parametrize(
    "lengths", [[1, 17, 64, 200], [200, 0, 1], [5], [0, 0], [3, 1, 4, 1, 5, 9, 2, 6, 0, 5, 3, 5, 40]]
)
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_varlen_matches_each_sequence_alone(lengths, block_size, with_state, groups):
    total, n = sum(lengths), len(lengths)
    q, k, v = (torch.randn(1, total, H, D, dtype=torch.float64) * 0.5 for _ in range(3))
    slope = 2.0 ** (-8 * (torch.arange(H, dtype=torch.float64) + 1) / H)
    states = torch.randn(n, H, D, D, dtype=torch.float64) if with_state else None
    leaves = [x.requires_grad_() for x in (q, k, v) + ((states,) if with_state else ())]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    o, s = lightning_attention(q, k, v, slope, states, block_size, cu_seqlens=cu_seqlens)
    o_ref, s_ref = varlen_reference(q, k, v, slope, states, lengths)
    assert o.shape == (1, total, H, D) and s.shape == (n, H, D, D)
    if total:
        assert rel_err(o, o_ref) < 1e-10
    assert rel_err(s, s_ref) < 1e-10 if with_state or total else torch.equal(s, s_ref)
    if total:
        do, ds = torch.randn_like(o), torch.randn_like(s)
        got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
        ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), leaves)
        for g, r in zip(got, ref, strict=True):
            assert rel_err(g, r) < 1e-10


def test_varlen_rejects_a_batch_and_bad_offsets():
    q = torch.randn(2, 10, H, D)
    slope = torch.ones(H)
    with pytest.raises(ValueError, match="packed as \\[1, total, H, D\\], got batch 2"):
        lightning_attention_chunk(q, q, q, slope, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="must rise from 0 to the packed length 10"):
        lightning_attention_chunk(q[:1], q[:1], q[:1], slope, cu_seqlens=torch.tensor([0, 4, 9]))


def silu_then_naive(qkv, slope, states, lengths):
    """The fused entry's reference: the activation and the split first, then each sequence's recurrence alone."""
    q, k, v = torch.nn.functional.silu(qkv).split(qkv.shape[-1] // 3, dim=-1)
    if lengths is None:
        return lightning_attention_naive(q, k, v, slope, states)
    return varlen_reference(q, k, v, slope, states, lengths)


@pytest.mark.parametrize(
    ("batch", "lengths"), [(2, None), (1, [1, 17, 64, 130]), (1, [70, 0, 1]), (1, [3, 1, 4, 1, 5, 9, 2, 6, 0, 5])]
)
@pytest.mark.parametrize("with_state", [False, True])
def test_fused_silu_qkv_matches_silu_then_attention(batch, lengths, with_state, groups):
    """``lightning_attention_qkv``: SiLU and q/k/v split inside the blockwise walk; outputs, states and the
    gradients of the pre-activation and of the initial states against the unfused recurrence (float64)."""
    total = sum(lengths) if lengths else 77  # 77: a partial last block
    n = len(lengths) if lengths else batch
    qkv = (torch.randn(batch, total, H, 3 * D, dtype=torch.float64) * 1.5).requires_grad_()
    slope = 2.0 ** (-8 * (torch.arange(H, dtype=torch.float64) + 1) / H)
    states = torch.randn(n, H, D, D, dtype=torch.float64).requires_grad_() if with_state else None
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]) if lengths else None
    o, s = lightning_attention_qkv(qkv, slope, states, 16, cu_seqlens)
    o_ref, s_ref = silu_then_naive(qkv, slope, states, lengths)
    assert o.shape == (batch, total, H, D) and s.shape == (n, H, D, D)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    leaves = [qkv] + ([states] if with_state else [])
    do, ds = torch.randn_like(o), torch.randn_like(s)
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
    ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), leaves)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape and rel_err(g, r) < 1e-10


def test_fused_silu_qkv_in_bfloat16_and_its_bad_shape():
    qkv = torch.randn(1, 50, H, 3 * D)
    slope = 2.0 ** (-8 * (torch.arange(H) + 1) / H)
    half = qkv.bfloat16().requires_grad_()
    o, s = lightning_attention_qkv(half, slope, block_size=16)
    exact = qkv.double().requires_grad_()
    o_ref, s_ref = silu_then_naive(exact, slope.double(), None, None)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 2e-2 and rel_err(s, s_ref) < 2e-2
    do = torch.randn(o.shape)
    (g,) = torch.autograd.grad((o.float() * do).sum(), half)
    (r,) = torch.autograd.grad((o_ref * do).sum(), exact)
    assert g.dtype == torch.bfloat16 and rel_err(g, r) < 2e-2
    with pytest.raises(ValueError, match="3 x head_dim"):
        lightning_attention_qkv(torch.randn(1, 4, H, 20), slope)
