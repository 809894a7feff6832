"""The Triton kernels against the naive recurrence: on the CPU under TRITON_INTERPRET=1 (set in conftest.py),
at real sizes on a GPU."""

import pytest
import torch

from hyla.ops.lightning import fits_triton, lightning_attention_naive, lightning_attention_step, lightning_step_slots
from hyla.ops.lightning.triton import CHUNK_SIZES, chunk_size_for, lightning_attention_triton, lightning_decode_slots
from tests.conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H = 2


def slopes(h: int) -> torch.Tensor:
    return 2.0 ** (-8 * (torch.arange(h, dtype=torch.float32) + 1) / h)


def reference(q, k, v, slope, states, lengths):
    outs, finals, start = [], [], 0
    for i, n in enumerate(lengths):
        seg = slice(start, start + n)
        init = None if states is None else states[i : i + 1].double()
        o, s = lightning_attention_naive(q[:, seg].double(), k[:, seg].double(), v[:, seg].double(),
                                         slope.double(), init)  # fmt: skip
        outs.append(o)
        finals.append(s)
        start += n
    return torch.cat(outs, 1), torch.cat(finals)


@pytest.mark.parametrize("lengths", [[1, 17, 64, 200], [5], [40, 0, 3]])
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("with_state", [False, True])
def test_varlen_forward_and_backward_match_naive(lengths, d, with_state):
    total = sum(lengths)
    q, k, v = (torch.randn(1, total, H, d, device=DEVICE) * 0.5 for _ in range(3))
    slope = slopes(H).to(DEVICE)
    states = torch.randn(len(lengths), H, d, d, device=DEVICE) if with_state else None
    leaves = [x.requires_grad_() for x in (q, k, v) + ((states,) if with_state else ())]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    o, s = lightning_attention_triton(q, k, v, slope, states, cu_seqlens)
    o_ref, s_ref = reference(q, k, v, slope, states, lengths)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5
    do, ds = torch.randn_like(o), torch.randn_like(s)
    got = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
    ref = torch.autograd.grad((o_ref * do.double()).sum() + (s_ref * ds.double()).sum(), leaves)
    for g, r in zip(got, ref, strict=True):
        assert torch.isfinite(g).all()
        assert rel_err(g, r) < 1e-5


def test_dense_batch_is_sequences_of_equal_length():
    b, t, d = 3, 37, 16
    q, k, v = (torch.randn(b, t, H, d, device=DEVICE) for _ in range(3))
    states = torch.randn(b, H, d, d, device=DEVICE)
    o, s = lightning_attention_triton(q, k, v, slopes(H).to(DEVICE), states)
    for i in range(b):
        o_ref, s_ref = lightning_attention_naive(q[i : i + 1].double(), k[i : i + 1].double(),
                                                 v[i : i + 1].double(), slopes(H).double().to(DEVICE),
                                                 states[i : i + 1].double())  # fmt: skip
        assert rel_err(o[i : i + 1], o_ref) < 1e-5
        assert rel_err(s[i : i + 1], s_ref) < 1e-5


@pytest.mark.parametrize(
    "slot_ids",
    [
        [3, -1, 0],
        [1, 2, 3, -1, 5, 6],  # runs of consecutive slots: updated in place through views
        [7, 0, 5, 2, 9, 4, -1, 8],  # scattered: gathered and written back
    ],
)
@pytest.mark.parametrize("decode", [lightning_decode_slots, lightning_step_slots])
def test_decode_slots_update_in_place_and_skip_padding(decode, slot_ids):
    """The Triton kernel and the torch path alike, against one recurrent step per request."""
    d, num_slots = 16, 10
    pool = torch.randn(num_slots, H, d, d, device=DEVICE)
    before = pool.clone()
    slots = torch.tensor(slot_ids, device=DEVICE, dtype=torch.int32)
    b = len(slot_ids)
    q, k, v = (torch.randn(b, H, d, device=DEVICE) for _ in range(3))
    o = decode(q, k, v, slopes(H).to(DEVICE), pool, slots)
    for row, slot in ((r, s) for r, s in enumerate(slot_ids) if s >= 0):
        o_ref, s_ref = lightning_attention_step(q[row : row + 1], k[row : row + 1], v[row : row + 1],
                                                slopes(H).to(DEVICE), before[slot : slot + 1])  # fmt: skip
        assert rel_err(o[row : row + 1], o_ref) < 1e-5
        assert rel_err(pool[slot : slot + 1], s_ref) < 1e-5
    padding = slot_ids.index(-1)
    assert torch.equal(o[padding], torch.zeros_like(o[padding]))
    for untouched in set(range(num_slots)) - set(slot_ids):
        assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_fixed_chunk_lengths_give_the_same_result(chunk):
    lengths = [3, 40, 17, 150]
    q, k, v = (torch.randn(1, sum(lengths), H, 16, device=DEVICE) for _ in range(3))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    o, s = lightning_attention_triton(q, k, v, slopes(H).to(DEVICE), cu_seqlens=cu_seqlens, chunk=chunk)
    o_ref, s_ref = reference(q, k, v, slopes(H).to(DEVICE), None, lengths)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    with pytest.raises(ValueError, match="chunk must be one of"):
        lightning_attention_triton(q, k, v, slopes(H).to(DEVICE), cu_seqlens=cu_seqlens, chunk=48)


def test_a_chunk_too_large_for_shared_memory_is_refused():
    q = torch.randn(1, 8, H, 256, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"up to 64 here \(head_dim 256, torch.bfloat16\), got 128"):
        lightning_attention_triton(q, q, q, slopes(H).to(DEVICE), chunk=128)


@pytest.mark.parametrize("row_bytes", [64, 128 * 2, 128 * 4, 256 * 2])
def test_multi_level_padding_pads_least(row_bytes):
    """For every length: a chunk length the kernels have, no longer than the longest that fits (forward, and half
    of it for the backward's extra tiles), and among those the one that wastes the least padding on a sequence
    of that length without splitting it more than needed."""
    longest = chunk_size_for(10**6, row_bytes)
    assert longest in CHUNK_SIZES and chunk_size_for(10**6, row_bytes, backward=True) <= longest
    for n in range(1, 300):
        c = chunk_size_for(n, row_bytes)
        assert c in CHUNK_SIZES and c <= longest
        fitting = [x for x in CHUNK_SIZES if x <= longest]
        padding = {x: -(-n // x) * x - n for x in fitting if x >= min(n, longest)}  # one chunk if it fits
        assert padding[c] == min(padding.values()), (n, c)


def test_head_dim_and_dtype_must_suit_the_kernels():
    q = torch.randn(1, 4, H, 24, device=DEVICE)
    with pytest.raises(ValueError, match=r"multiple of 16 up to 256 \(128 in float32\), got 24 in torch\.float32"):
        lightning_attention_triton(q, q, q, slopes(H).to(DEVICE))
    q = torch.randn(1, 4, H, 256, device=DEVICE)  # float32 tiles of 256 do not fit in shared memory
    with pytest.raises(ValueError, match=r"got 256 in torch\.float32"):
        lightning_attention_triton(q, q, q, slopes(H).to(DEVICE))
    q = torch.randn(1, 4, H, 16, device=DEVICE, dtype=torch.float64)  # the kernels compute in float32
    assert not fits_triton(16, torch.float64)
    with pytest.raises(ValueError, match=r"got 16 in torch\.float64"):
        lightning_attention_triton(q, q, q, slopes(H).to(DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="what a GPU's shared memory holds needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dispatcher_sends_the_kernels_all_they_take_and_nothing_else(dtype):
    """The ground truth of fits_triton: for every head size, the kernels (forward and backward) run and match
    the blockwise path exactly where fits_triton says so; elsewhere they fail for want of shared memory."""
    from hyla.ops.lightning import lightning_attention_chunk
    from hyla.ops.lightning import triton as kernels

    for d in [24, *range(16, 288, 16)]:
        q, k, v = (torch.randn(1, 70, H, d, device="cuda", dtype=dtype) * 0.5 for _ in range(3))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        if not fits_triton(d, dtype):
            if d % 16 == 0:  # a size the kernels' layout allows: too large for shared memory
                with pytest.raises(Exception, match=r"(?i)resources|shared memory"):
                    kernels._LightningTriton.apply(*(x.reshape(1, 70, H, d).contiguous() for x in leaves),
                                                   slopes(H).cuda(), None, torch.tensor([0, 70]), 64, 32)  # fmt: skip
            continue
        o, _ = lightning_attention_triton(q, k, v, slopes(H).cuda())
        o.sum().backward()
        o_ref, _ = lightning_attention_chunk(*(x.double() for x in (q, k, v)), slopes(H).cuda().double())
        assert rel_err(o, o_ref) < (1e-4 if dtype == torch.float32 else 3e-2), d


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need a GPU")
@pytest.mark.parametrize(
    ("d", "dtype", "tol"),
    [(64, torch.float32, 1e-5), (128, torch.float32, 1e-5), (64, torch.bfloat16, 2e-2), (128, torch.bfloat16, 2e-2),
     (256, torch.bfloat16, 2e-2)],
)  # fmt: skip
def test_real_sizes_on_gpu(d, dtype, tol):
    from hyla.ops.lightning import lightning_attention_chunk

    lengths, h = [1, 17, 64, 200, 4000, 3910], 8
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    q, k, v = (torch.randn(1, sum(lengths), h, d, device="cuda", dtype=dtype) * 0.5 for _ in range(3))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    slope = slopes(h).cuda()
    o, s = lightning_attention_triton(q, k, v, slope, cu_seqlens=cu_seqlens)
    o_ref, s_ref = lightning_attention_chunk(*(x.double() for x in (q, k, v)), slope.double(), cu_seqlens=cu_seqlens)
    assert rel_err(o, o_ref) < tol and rel_err(s, s_ref) < tol
    do = torch.randn_like(o)
    got = torch.autograd.grad((o * do).sum(), leaves)
    ref = torch.autograd.grad((o_ref * do.double()).sum(), leaves)
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need a GPU")
def test_many_short_sequences_on_gpu():
    """2,048 sequences x 32 heads: more programs than a second or third grid axis may hold (65,535)."""
    from hyla.ops.lightning import lightning_attention_chunk

    num, length, h, d = 2048, 5, 32, 64
    cu_seqlens = torch.arange(num + 1) * length
    q, k, v = (torch.randn(1, num * length, h, d, device="cuda") for _ in range(3))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    slope = slopes(h).cuda()
    o, s = lightning_attention_triton(q, k, v, slope, cu_seqlens=cu_seqlens)
    o_ref, s_ref = lightning_attention_chunk(*(x.double() for x in (q, k, v)), slope.double(), cu_seqlens=cu_seqlens)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    do = torch.randn_like(o)
    got = torch.autograd.grad((o * do).sum(), leaves)
    ref = torch.autograd.grad((o_ref * do.double()).sum(), leaves)
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) < 1e-5
