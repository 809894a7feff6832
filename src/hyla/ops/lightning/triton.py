"""Triton kernels for lightning attention: blockwise forward and backward, varlen, and a slot decode step.

Every input is treated as packed sequences (``[1, ΣT, H, D]`` plus ``cu_seqlens``; a dense ``[B, T, H, D]``
batch is ``B`` sequences of length ``T``). Chunks never straddle two sequences. The algorithm is
``chunk.py``'s, split into kernels:

- ``_scan``: per (sequence, head, [BK, BV] tile of the state), a scan over the sequence's chunks that
  records the state entering each chunk (float32) and the final state; run in reverse over ``q`` and ``dO``,
  the same kernel gives the gradient of the state leaving each chunk, and of the initial state;
- ``_output_fwd``: per (chunk, head, value tile), exact decayed attention inside the chunk plus the read-out
  of the state entering it;
- ``_chunk_bwd``: per (chunk, head), dq, dk and dv from the intra-chunk attention and the two state gradients.

The forward keeps no per-chunk states for the backward: they are recomputed (``O(T D^2)``), so training
memory stays that of q, k, v. Multi-level padding: the chunk length is the smallest of 16, 32, 64 that holds
the longest sequence, so a short prefill or a continuation of a few tokens is not padded to 64.

On the CPU these kernels run under ``TRITON_INTERPRET=1`` (the tests do so); the model uses them on CUDA only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK_SIZES = (16, 32, 64)
# Software-pipelining depth of the sequential scans: loading the next chunk's tiles while the current one
# is multiplied. Measured on an H100 (32k tokens, 32 heads x 128, bf16): 0.65 ms at 3 stages vs 0.86 at 2.
SCAN_STAGES = 3


def chunk_size_for(max_len: int, row_bytes: int = 128) -> int:
    """Multi-level padding: the smallest chunk length of :data:`CHUNK_SIZES` that holds ``max_len`` tokens.

    ``row_bytes`` (head_dim x element size) caps it: the backward kernel holds several ``[chunk, head_dim]``
    tiles at once, and float32 at head_dim 128 does not fit 64-row tiles in shared memory.
    """
    cap = CHUNK_SIZES[-1] if row_bytes <= 256 else CHUNK_SIZES[-2] if row_bytes <= 512 else CHUNK_SIZES[0]
    return min(next((c for c in CHUNK_SIZES if c >= max_len), CHUNK_SIZES[-1]), cap)


@triton.jit
def _dot(a, b):
    # float32 inputs stay float32 (Triton's default would round them to tf32); bf16/fp16 use tensor cores.
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _scan(
    x, y, slope, init, states, final, cu_seqlens, chunk_first,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_STATES: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    """Per (sequence, head, [BK, BV] tile): ``S <- exp(-s L) S + (x ⊙ decay)^T y`` over the sequence's chunks.

    Forward (``x = k``, ``y = v``, key decay to the chunk's end): ``states[j]`` is the state entering chunk
    ``j``, ``final`` the state after the last. Reverse (``x = q``, ``y = dO``, query decay from the chunk's
    start, last chunk first): ``states[j]`` is the gradient of the state leaving chunk ``j``, ``final`` that
    of the initial state.
    """
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + n), tl.load(cu_seqlens + n + 1)
    first = tl.load(chunk_first + n)
    s = tl.load(slope + h).to(tl.float32)
    rk, rv, rows = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, C)
    tile = rk[:, None] * D + rv[None, :]
    tile_mask = (rk[:, None] < D) & (rv[None, :] < D)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        state += tl.load(init + i_nh * D * D + tile, mask=tile_mask, other=0.0).to(tl.float32)
    num_chunks = tl.cdiv(eos - bos, C)
    for step in range(0, num_chunks):
        j = num_chunks - 1 - step if REVERSE else step
        if STORE_STATES:
            tl.store(states + ((first + j).to(tl.int64) * H + h) * D * D + tile, state, mask=tile_mask)
        start = bos + j * C
        length = tl.minimum(C, eos - start)
        row_mask = rows < length
        xt = tl.load(x + ((start + rows[:, None]) * H + h) * D + rk[None, :],
                     mask=row_mask[:, None] & (rk[None, :] < D), other=0.0)  # fmt: skip
        yt = tl.load(y + ((start + rows[:, None]) * H + h) * D + rv[None, :],
                     mask=row_mask[:, None] & (rv[None, :] < D), other=0.0)  # fmt: skip
        steps = (rows + 1) if REVERSE else (length - 1 - rows)
        decay = tl.where(row_mask, tl.exp(-s * steps.to(tl.float32)), 0.0)
        xt = (xt.to(tl.float32) * decay[:, None]).to(yt.dtype)
        state = state * tl.exp(-s * length.to(tl.float32)) + _dot(tl.trans(xt), yt).to(tl.float32)
    tl.store(final + i_nh * D * D + tile, state, mask=tile_mask)


@triton.jit
def _output_fwd(
    q, k, v, o, slope, states, chunk_seq_start, chunk_len,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    i_v, j, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, length = tl.load(chunk_seq_start + j), tl.load(chunk_len + j)
    s = tl.load(slope + h).to(tl.float32)
    rows, rd, rv = tl.arange(0, C), tl.arange(0, BD), i_v * BV + tl.arange(0, BV)
    row_mask = rows < length
    offs = ((start + rows[:, None]) * H + h) * D
    qt = tl.load(q + offs + rd[None, :], mask=row_mask[:, None] & (rd[None, :] < D), other=0.0)
    kt = tl.load(k + offs + rd[None, :], mask=row_mask[:, None] & (rd[None, :] < D), other=0.0)
    vt = tl.load(v + offs + rv[None, :], mask=row_mask[:, None] & (rv[None, :] < D), other=0.0)
    st = tl.load(states + (j.to(tl.int64) * H + h) * D * D + rd[:, None] * D + rv[None, :],
                 mask=(rd[:, None] < D) & (rv[None, :] < D), other=0.0)  # fmt: skip
    gap = (rows[:, None] - rows[None, :]).to(tl.float32)
    mask = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
    scores = _dot(qt, tl.trans(kt)).to(tl.float32) * mask
    out = _dot(scores.to(vt.dtype), vt).to(tl.float32)
    query_decay = tl.exp(-s * (rows + 1).to(tl.float32))
    out += _dot(qt, st.to(qt.dtype)).to(tl.float32) * query_decay[:, None]
    tl.store(o + offs + rv[None, :], out.to(o.dtype.element_ty), mask=row_mask[:, None] & (rv[None, :] < D))


@triton.jit
def _chunk_bwd(
    q, k, v, do, dq, dk, dv, slope, states, dstates, chunk_seq_start, chunk_len,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    j, h = tl.program_id(0), tl.program_id(1)
    start, length = tl.load(chunk_seq_start + j), tl.load(chunk_len + j)
    s = tl.load(slope + h).to(tl.float32)
    rows, rd = tl.arange(0, C), tl.arange(0, BD)
    row_mask = rows < length
    offs = ((start + rows[:, None]) * H + h) * D + rd[None, :]
    io_mask = row_mask[:, None] & (rd[None, :] < D)
    qt = tl.load(q + offs, mask=io_mask, other=0.0)
    kt = tl.load(k + offs, mask=io_mask, other=0.0)
    vt = tl.load(v + offs, mask=io_mask, other=0.0)
    dot = tl.load(do + offs, mask=io_mask, other=0.0)
    square = (j.to(tl.int64) * H + h) * D * D + rd[:, None] * D + rd[None, :]
    square_mask = (rd[:, None] < D) & (rd[None, :] < D)
    st = tl.load(states + square, mask=square_mask, other=0.0).to(qt.dtype)  # the state entering the chunk
    dst = tl.load(dstates + square, mask=square_mask, other=0.0).to(qt.dtype)  # grad of the state leaving it
    gap = (rows[:, None] - rows[None, :]).to(tl.float32)
    mask = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
    scores = (_dot(qt, tl.trans(kt)).to(tl.float32) * mask).to(qt.dtype)  # [C, C]
    dscores = (_dot(dot, tl.trans(vt)).to(tl.float32) * mask).to(qt.dtype)  # [C, C]
    query_decay = tl.exp(-s * (rows + 1).to(tl.float32))
    key_decay = tl.where(row_mask, tl.exp(-s * (length - 1 - rows).to(tl.float32)), 0.0)
    dq_t = _dot(dscores, kt).to(tl.float32) + _dot(dot, tl.trans(st)).to(tl.float32) * query_decay[:, None]
    dk_t = _dot(tl.trans(dscores), qt).to(tl.float32)
    dk_t += _dot(vt, tl.trans(dst)).to(tl.float32) * key_decay[:, None]
    kd = (kt.to(tl.float32) * key_decay[:, None]).to(qt.dtype)
    dv_t = _dot(tl.trans(scores), dot).to(tl.float32) + _dot(kd, dst).to(tl.float32)
    tl.store(dq + offs, dq_t.to(dq.dtype.element_ty), mask=io_mask)
    tl.store(dk + offs, dk_t.to(dk.dtype.element_ty), mask=io_mask)
    tl.store(dv + offs, dv_t.to(dv.dtype.element_ty), mask=io_mask)


@triton.jit
def _decode_slots(
    q, k, v, o, slope, pool, slots,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    i_v, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots + b)
    if slot >= 0:
        s = tl.load(slope + h).to(tl.float32)
        rd, rv = tl.arange(0, BD), i_v * BV + tl.arange(0, BV)
        base = (b * H + h) * D
        qt = tl.load(q + base + rd, mask=rd < D, other=0.0).to(tl.float32)
        kt = tl.load(k + base + rd, mask=rd < D, other=0.0).to(tl.float32)
        vt = tl.load(v + base + rv, mask=rv < D, other=0.0).to(tl.float32)
        tile = (slot.to(tl.int64) * H + h) * D * D + rd[:, None] * D + rv[None, :]
        tile_mask = (rd[:, None] < D) & (rv[None, :] < D)
        state = tl.load(pool + tile, mask=tile_mask, other=0.0) * tl.exp(-s) + kt[:, None] * vt[None, :]
        tl.store(pool + tile, state, mask=tile_mask)
        out = tl.sum(qt[:, None] * state, axis=0)
        tl.store(o + base + rv, out.to(o.dtype.element_ty), mask=rv < D)


class _Plan:
    """Where each chunk sits: the chunk length, per-sequence first chunk, per-chunk start and length."""

    def __init__(self, cu_seqlens: Tensor, device: torch.device, row_bytes: int, chunk: int | None) -> None:
        cu_seqlens = cu_seqlens.cpu()  # planned on the host (a few ints), then copied once: no device syncs
        lengths = cu_seqlens.diff()
        self.num_seqs = len(lengths)
        self.chunk = chunk or chunk_size_for(int(lengths.max()) if self.num_seqs else 1, row_bytes)
        per_seq = (lengths + self.chunk - 1) // self.chunk
        first = torch.cumsum(per_seq, 0) - per_seq
        self.num_chunks = int(per_seq.sum())
        seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=cu_seqlens.device), per_seq)
        index_in_seq = torch.arange(self.num_chunks, device=cu_seqlens.device) - first[seq]
        start = cu_seqlens[:-1][seq] + index_in_seq * self.chunk
        length = (cu_seqlens[1:][seq] - start).clamp(max=self.chunk)
        tables = torch.cat((cu_seqlens, first, start, length)).to(torch.int32).to(device, non_blocking=True)
        self.cu_seqlens, self.first, self.start, self.length = tables.split(
            [self.num_seqs + 1, self.num_seqs, self.num_chunks, self.num_chunks]
        )


def _tiles(d: int) -> tuple[int, int]:
    bd = triton.next_power_of_2(max(d, 16))
    return bd, min(bd, 64)


def _states(k: Tensor, v: Tensor, slope: Tensor, init: Tensor | None, plan: _Plan, store: bool):
    h, d = k.shape[-2:]
    _, bt = _tiles(d)
    states = k.new_empty((plan.num_chunks, h, d, d), dtype=torch.float32) if store else k.new_empty(0)
    final = k.new_empty((plan.num_seqs, h, d, d), dtype=torch.float32)
    grid = (triton.cdiv(d, bt), triton.cdiv(d, bt), plan.num_seqs * h)
    _scan[grid](k, v, slope, init if init is not None else final, states, final, plan.cu_seqlens, plan.first,
                H=h, D=d, C=plan.chunk, BK=bt, BV=bt, HAS_INIT=init is not None, STORE_STATES=store,
                REVERSE=False, num_stages=SCAN_STAGES)  # fmt: skip
    return states, final


class _LightningTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, init, cu_seqlens, chunk):
        plan = _Plan(cu_seqlens, q.device, triton.next_power_of_2(q.shape[-1]) * q.element_size(), chunk)
        h, d = q.shape[-2:]
        bd, bv = _tiles(d)
        states, final = _states(k, v, slope, init, plan, store=True)
        o = torch.empty_like(q)
        if plan.num_chunks:
            _output_fwd[(triton.cdiv(d, bv), plan.num_chunks, h)](
                q, k, v, o, slope, states, plan.start, plan.length, H=h, D=d, C=plan.chunk, BD=bd, BV=bv
            )
        ctx.save_for_backward(q, k, v, slope, init)
        ctx.plan = plan
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, slope, init = ctx.saved_tensors
        plan = ctx.plan
        h, d = q.shape[-2:]
        bd, bt = _tiles(d)
        do = do.contiguous()
        states, _ = _states(k, v, slope, init, plan, store=True)  # recomputed, not kept from the forward
        dstates = torch.empty_like(states)
        dinit = q.new_empty((plan.num_seqs, h, d, d), dtype=torch.float32)
        has_dfinal = dfinal is not None
        dfinal = dfinal.contiguous().float() if has_dfinal else dinit
        grid = (triton.cdiv(d, bt), triton.cdiv(d, bt), plan.num_seqs * h)
        _scan[grid](q, do, slope, dfinal, dstates, dinit, plan.cu_seqlens, plan.first, H=h, D=d, C=plan.chunk,
                    BK=bt, BV=bt, HAS_INIT=has_dfinal, STORE_STATES=True, REVERSE=True,
                    num_stages=SCAN_STAGES)  # fmt: skip
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if plan.num_chunks:
            _chunk_bwd[(plan.num_chunks, h)](q, k, v, do, dq, dk, dv, slope, states, dstates, plan.start,
                                            plan.length, H=h, D=d, C=plan.chunk, BD=bd)  # fmt: skip
        return dq, dk, dv, None, dinit if init is not None else None, None, None


def lightning_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope: Tensor,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Lightning attention through the Triton kernels; same contract as ``lightning_attention_chunk``.

    Args:
        q, k, v: ``[B, T, H, D]`` (``B = 1`` with ``cu_seqlens``), float32, bfloat16 or float16; ``D`` a
            multiple of 16 up to 256.
        slope: ``[H]``. initial_state: optional ``[B or N, H, D, D]``, kept in float32.
        cu_seqlens: optional ``[N + 1]`` offsets of packed sequences.
        chunk: a fixed chunk length of :data:`CHUNK_SIZES` instead of multi-level padding (for comparisons).

    Returns:
        ``o`` like ``q`` and the final states ``[B or N, H, D, D]`` in float32.
    """
    b, t, h, d = q.shape
    if d % 16 or d > 256:
        raise ValueError(f"the Triton kernels need head_dim a multiple of 16 up to 256, got {d}")
    if cu_seqlens is None:
        cu_seqlens = torch.arange(b + 1) * t
    elif b != 1:
        raise ValueError(f"with cu_seqlens, pass the sequences packed as [1, total, H, D], got batch {b}")
    flat = [x.reshape(1, b * t, h, d).contiguous() for x in (q, k, v)]
    init = None if initial_state is None else initial_state.float().contiguous()
    if chunk is not None and chunk not in CHUNK_SIZES:
        raise ValueError(f"chunk must be one of {CHUNK_SIZES}, got {chunk}")
    o, final = _LightningTriton.apply(*flat, slope.float().contiguous(), init, cu_seqlens, chunk)
    return o.view(b, t, h, d), final


def lightning_decode_slots(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, pool: Tensor, slots: Tensor) -> Tensor:
    """One decode step for a batch of requests whose states live in a pool, updated in place.

    Args:
        q, k, v: ``[B, H, D]``, one token per request.
        pool: ``[S, H, D, D]`` float32 state slots. slots: ``[B]`` the slot of each request; ``-1`` marks a
            padding row, whose output is zeros and which touches no slot.

    Returns:
        ``o`` ``[B, H, D]``.
    """
    b, h, d = q.shape
    bd, bv = _tiles(d)
    o = torch.zeros_like(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _decode_slots[(triton.cdiv(d, bv), b, h)](q, k, v, o, slope.float().contiguous(), pool, slots, H=h, D=d, BD=bd,
                                              BV=bv)  # fmt: skip
    return o
