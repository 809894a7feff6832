"""Triton kernels for lightning attention: blockwise forward and backward, varlen, and a slot decode step.

Every input is treated as packed sequences (``[1, ΣT, H, D]`` plus ``cu_seqlens``; a dense ``[B, T, H, D]``
batch is ``B`` sequences of length ``T``). Chunks never straddle two sequences. The algorithm is
``chunk.py``'s, split into kernels:

- ``_fused_fwd`` (the forward): per (sequence, head, value tile), one walk over the sequence's chunks that
  writes each chunk's output (exact decayed attention inside it plus the read-out of the carried state) and
  folds the chunk into the state; q, k, v are read once and no per-chunk state is written;
- ``_scan`` (backward): per (sequence, head, [BK, BV] tile of the state), a scan over the sequence's chunks
  that records the state entering each chunk (in the inputs' dtype, which is what the products read) and the
  final state; run in reverse over ``q`` and ``dO``, the same kernel gives the gradient of the state leaving
  each chunk, and of the initial state;
- ``_chunk_bwd``: per (chunk, head), dq, dk and dv from the intra-chunk attention and the two state gradients.

The forward keeps nothing for the backward but q, k, v: the per-chunk states are recomputed (``O(T D^2)``).
Multi-level padding: the chunk length is the smallest of 16, 32, 64, 128 that holds the longest sequence
(capped by what fits in shared memory), so a short prefill or a continuation of a few tokens is not padded to
a long chunk.

On the CPU these kernels run under ``TRITON_INTERPRET=1`` (the tests do so); the model uses them on CUDA only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hyla.ops.lightning.limits import fits_triton
from hyla.ops.varlen import Varlen

CHUNK_SIZES = (16, 32, 64, 128)
# Software-pipelining depth of the sequential scans: loading the next chunk's tiles while the current one
# is multiplied. Measured on an H100 (32k tokens, 32 heads x 128, bf16): 0.65 ms at 3 stages vs 0.86 at 2.
SCAN_STAGES = 3
# The fused forward's value tile: 32 columns give B·H·D/32 programs (128 at 32 heads x 128, about one per
# multiprocessor of an H100). Measured there at 32k tokens, bf16, chunk 128: 0.97 ms at 32 columns and 8 warps,
# 1.18 ms at 64 columns (half the programs), 1.83 ms at 4 warps.
FUSED_BV = 32


def chunk_size_for(max_len: int, row_bytes: int = 128, backward: bool = False) -> int:
    """Multi-level padding: the smallest chunk length of :data:`CHUNK_SIZES` that holds ``max_len`` tokens.

    ``row_bytes`` (head_dim x element size) caps it by what fits in shared memory: the forward holds q and k
    tiles of ``[chunk, head_dim]`` (up to 128 rows at 256 bytes a row), the backward several more (half that).
    """
    cap = 128 if row_bytes <= 256 else 64
    if backward:
        cap //= 2
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
    # one flat grid axis (the others stop at 65,535 programs): value tiles fastest, then key tiles
    pid, nv, nk = tl.program_id(0), tl.cdiv(D, BV), tl.cdiv(D, BK)
    i_v, i_k, i_nh = pid % nv, (pid // nv) % nk, pid // (nv * nk)
    n, h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + n).to(tl.int64), tl.load(cu_seqlens + n + 1).to(tl.int64)  # 64-bit offsets
    first = tl.load(chunk_first + n)
    s = tl.load(slope + h).to(tl.float32)
    rk, rv, rows = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV), tl.arange(0, C)
    tile = rk[:, None] * D + rv[None, :]
    tile_mask = (rk[:, None] < D) & (rv[None, :] < D)
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        state += tl.load(init + i_nh.to(tl.int64) * D * D + tile, mask=tile_mask, other=0.0).to(tl.float32)
    num_chunks = tl.cdiv(eos - bos, C)
    for step in range(0, num_chunks):
        j = num_chunks - 1 - step if REVERSE else step
        if STORE_STATES:
            tl.store(states + ((first + j).to(tl.int64) * H + h) * D * D + tile,
                     state.to(states.dtype.element_ty), mask=tile_mask)  # fmt: skip
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
    tl.store(final + i_nh.to(tl.int64) * D * D + tile, state, mask=tile_mask)


@triton.jit
def _fused_fwd(
    q, k, v, o, slope, init, final, cu_seqlens,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr,
):  # fmt: skip
    """Per (sequence, head, value tile ``BV``): walk the sequence's chunks once, writing each chunk's output
    (exact decayed attention inside it plus the read-out of the carried state) and then folding the chunk into
    the state. q, k, v are read once and no per-chunk state reaches memory; ``final`` gets the last state."""
    pid, nv = tl.program_id(0), tl.cdiv(D, BV)  # one flat grid axis: the value tiles of a head side by side
    i_v, i_nh = pid % nv, pid // nv
    n, h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + n).to(tl.int64), tl.load(cu_seqlens + n + 1).to(tl.int64)
    s = tl.load(slope + h).to(tl.float32)
    rows, rd, rv = tl.arange(0, C), tl.arange(0, BD), i_v * BV + tl.arange(0, BV)
    tile = rd[:, None] * D + rv[None, :]
    tile_mask = (rd[:, None] < D) & (rv[None, :] < D)
    state = tl.zeros([BD, BV], dtype=tl.float32)
    if HAS_INIT:
        state += tl.load(init + i_nh.to(tl.int64) * D * D + tile, mask=tile_mask, other=0.0)
    gap = (rows[:, None] - rows[None, :]).to(tl.float32)
    mask = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)
    query_decay = tl.exp(-s * (rows + 1).to(tl.float32))
    for start in range(bos, eos, C):
        length = tl.minimum(C, eos - start)
        row_mask = rows < length
        offs = ((start + rows[:, None]) * H + h) * D
        qk_mask = row_mask[:, None] & (rd[None, :] < D)
        v_mask = row_mask[:, None] & (rv[None, :] < D)
        qt = tl.load(q + offs + rd[None, :], mask=qk_mask, other=0.0)
        kt = tl.load(k + offs + rd[None, :], mask=qk_mask, other=0.0)
        vt = tl.load(v + offs + rv[None, :], mask=v_mask, other=0.0)
        scores = _dot(qt, tl.trans(kt)).to(tl.float32) * mask
        out = _dot(scores.to(vt.dtype), vt).to(tl.float32)
        out += _dot(qt, state.to(qt.dtype)).to(tl.float32) * query_decay[:, None]
        tl.store(o + offs + rv[None, :], out.to(o.dtype.element_ty), mask=v_mask)
        key_decay = tl.where(row_mask, tl.exp(-s * (length - 1 - rows).to(tl.float32)), 0.0)
        kd = (kt.to(tl.float32) * key_decay[:, None]).to(vt.dtype)
        state = state * tl.exp(-s * length.to(tl.float32)) + _dot(tl.trans(kd), vt).to(tl.float32)
    tl.store(final + i_nh.to(tl.int64) * D * D + tile, state, mask=tile_mask)


@triton.jit
def _chunk_bwd(
    q, k, v, do, dq, dk, dv, slope, states, dstates, chunk_seq_start, chunk_len,
    H: tl.constexpr, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    j, h = tl.program_id(0), tl.program_id(1)
    start, length = tl.load(chunk_seq_start + j).to(tl.int64), tl.load(chunk_len + j)
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
        base = (b.to(tl.int64) * H + h) * D
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
    """Where each chunk sits: the chunk length, per-sequence first chunk, per-chunk start and length.

    Planned on the host from ``cu_seqlens`` on the CPU (a few ints), then copied once: no device syncs.
    """

    def __init__(self, cu_seqlens: Tensor, device: torch.device, chunk: int) -> None:
        lengths = cu_seqlens.diff()
        self.num_seqs, self.chunk = len(lengths), chunk
        per_seq = (lengths + chunk - 1) // chunk
        first = torch.cumsum(per_seq, 0) - per_seq
        self.num_chunks = int(per_seq.sum())
        seq = torch.repeat_interleave(torch.arange(self.num_seqs), per_seq)
        index_in_seq = torch.arange(self.num_chunks) - first[seq]
        start = cu_seqlens[:-1][seq] + index_in_seq * chunk
        length = (cu_seqlens[1:][seq] - start).clamp(max=chunk)
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
    states = k.new_empty((plan.num_chunks, h, d, d)) if store else k.new_empty(0)
    final = k.new_empty((plan.num_seqs, h, d, d), dtype=torch.float32)
    grid = (triton.cdiv(d, bt) ** 2 * plan.num_seqs * h,)
    _scan[grid](k, v, slope, init if init is not None else final, states, final, plan.cu_seqlens, plan.first,
                H=h, D=d, C=plan.chunk, BK=bt, BV=bt, HAS_INIT=init is not None, STORE_STATES=store,
                REVERSE=False, num_stages=SCAN_STAGES)  # fmt: skip
    return states, final


class _LightningTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, init, cu_seqlens, chunk, backward_chunk):
        h, d = q.shape[-2:]
        bd = _tiles(d)[0]
        num_seqs = len(cu_seqlens) - 1
        o = torch.empty_like(q)
        final = q.new_empty((num_seqs, h, d, d), dtype=torch.float32)
        bv = min(bd, FUSED_BV)
        _fused_fwd[(triton.cdiv(d, bv) * num_seqs * h,)](
            q, k, v, o, slope, init if init is not None else final, final,
            cu_seqlens.to(q.device, torch.int32, non_blocking=True), H=h, D=d, C=chunk,
            BD=bd, BV=bv, HAS_INIT=init is not None, num_warps=8 if chunk >= 128 else 4,
            num_stages=2 if chunk >= 128 else 3,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, slope, init)
        ctx.cu_seqlens, ctx.backward_chunk = cu_seqlens, backward_chunk
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, slope, init = ctx.saved_tensors
        h, d = q.shape[-2:]
        bd, bt = _tiles(d)
        plan = _Plan(ctx.cu_seqlens, q.device, ctx.backward_chunk)
        do = do.contiguous()
        states, _ = _states(k, v, slope, init, plan, store=True)  # per-chunk states, recomputed for the backward
        dstates = torch.empty_like(states)
        dinit = q.new_empty((plan.num_seqs, h, d, d), dtype=torch.float32)
        has_dfinal = dfinal is not None
        dfinal = dfinal.contiguous().float() if has_dfinal else dinit
        grid = (triton.cdiv(d, bt) ** 2 * plan.num_seqs * h,)
        _scan[grid](q, do, slope, dfinal, dstates, dinit, plan.cu_seqlens, plan.first, H=h, D=d, C=plan.chunk,
                    BK=bt, BV=bt, HAS_INIT=has_dfinal, STORE_STATES=True, REVERSE=True,
                    num_stages=SCAN_STAGES)  # fmt: skip
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if plan.num_chunks:
            _chunk_bwd[(plan.num_chunks, h)](q, k, v, do, dq, dk, dv, slope, states, dstates, plan.start,
                                            plan.length, H=h, D=d, C=plan.chunk, BD=bd)  # fmt: skip
        return dq, dk, dv, None, dinit if init is not None else None, None, None, None


def lightning_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope: Tensor,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | Varlen | None = None,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Lightning attention through the Triton kernels; same contract as ``lightning_attention_chunk``.

    Args:
        q, k, v: ``[B, T, H, D]`` (``B = 1`` with ``cu_seqlens``), float32, bfloat16 or float16; ``D`` a
            multiple of 16 up to 256 (128 in float32): see :func:`~hyla.ops.lightning.fits_triton`.
        slope: ``[H]``. initial_state: optional ``[B or N, H, D, D]``, kept in float32.
        cu_seqlens: optional ``[N + 1]`` offsets of packed sequences.
        chunk: a fixed forward chunk length of :data:`CHUNK_SIZES` instead of multi-level padding (for
            comparisons); the backward picks its own.

    Returns:
        ``o`` like ``q`` and the final states ``[B or N, H, D, D]`` in float32.
    """
    b, t, h, d = q.shape
    if not fits_triton(d, q.dtype):
        raise ValueError(f"the Triton kernels take bfloat16, float16 or float32 and head_dim a multiple of 16 up to "
                         f"256 (128 in float32), got {d} in {q.dtype}")  # fmt: skip
    if cu_seqlens is None:
        cu_seqlens = torch.arange(b + 1) * t
    elif b != 1:
        raise ValueError(f"with cu_seqlens, pass the sequences packed as [1, total, H, D], got batch {b}")
    # The kernels plan on the host: a batch's Varlen holds its offsets there already (no device round trip).
    cu_seqlens = cu_seqlens.cu_seqlens_cpu if isinstance(cu_seqlens, Varlen) else cu_seqlens.cpu()
    row_bytes = triton.next_power_of_2(d) * q.element_size()
    largest = chunk_size_for(CHUNK_SIZES[-1], row_bytes)
    lengths = cu_seqlens.diff()
    longest = int(lengths.max()) if len(lengths) else 1
    if chunk is None:
        chunk = chunk_size_for(longest, row_bytes)
    elif chunk not in CHUNK_SIZES or chunk > largest:
        raise ValueError(f"chunk must be one of {CHUNK_SIZES} up to {largest} here (head_dim {d}, {q.dtype}), "
                         f"got {chunk}")  # fmt: skip
    flat = [x.reshape(1, b * t, h, d).contiguous() for x in (q, k, v)]
    init = None if initial_state is None else initial_state.float().contiguous()
    o, final = _LightningTriton.apply(*flat, slope.float().contiguous(), init, cu_seqlens, chunk,
                                      chunk_size_for(longest, row_bytes, backward=True))  # fmt: skip
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
