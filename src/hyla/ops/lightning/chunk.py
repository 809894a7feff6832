"""Blockwise lightning attention (MiniMax-01, Alg. 1), vectorised over blocks and heads.

The sequence is cut into blocks of ``C`` tokens. Inside a block, attention is exact: ``(Q K^T ⊙ M) V`` with
the decay mask ``M[i, j] = exp(-s (i - j))`` for ``j <= i``. Between blocks, a ``[D, D]`` state carries
everything earlier: block ``i`` reads ``(Q_i ⊙ exp(-s (r + 1))) S_i`` (``r`` the position in the block) and
adds ``(K_i ⊙ exp(-s (C - 1 - r)))^T V_i`` to the state it hands on, after decaying it by ``exp(-s C)``.

Every call is packed: ``B`` equal-length sequences are ``B`` packed sequences of one flat ``[ΣT, H, D]``
tensor, laid out so that no block holds two sequences (a sequence's last block may be partial), and the state
restarts at each sequence's first block.

Cost: ``O(T C D + T D^2)`` per head, forward and backward (a hand-derived backward, see
:class:`_BlockedAttention`). The blocks are processed in groups of a few hundred KB (:data:`GROUP_BYTES`): a
group's tokens are copied into a block-major layout, and all its matrix products run batched over its blocks
and heads while everything they touch stays in the CPU's cache. Processing every block at once instead moves
each ``[C, C]`` score and ``[D, D]`` state tile through main memory several times: the forward took 1.7x as
long (measured at 32k tokens, 8 x 64 heads, float32: 157-168 vs 85-95 ms). The state hand-over
``S_{i+1} = exp(-s C) S_i + KV_i`` (and its reverse in the backward) is a loop over blocks, a sequential scan.

:func:`lightning_attention_chunk_qkv` takes MiniMax's q/k/v projection before its SiLU and applies the activation
group by group as it reads them, which saves the activation's passes over memory and its copy kept for the
backward (the layer's forward + backward peak at 32k tokens x 512: 1.6 -> 0.8-1.1 GB).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from hyla.ops.precision import compute_dtype
from hyla.ops.varlen import Varlen, as_varlen

# Bytes of one group's block-major copy of q (and of k, v, the scores, the output...): small enough that a
# group's working set stays in cache, large enough that each batched product amortises its call.
GROUP_BYTES = 1 << 20


def lightning_attention_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope: Tensor,
    initial_state: Tensor | None = None,
    block_size: int = 64,
    cu_seqlens: Tensor | Varlen | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal linear attention with per-head decay, computed blockwise.

    Args:
        q, k, v: ``[B, T, H, D]``; any ``T`` (not necessarily a multiple of ``block_size``), ``T = 0`` too.
            With ``cu_seqlens``, ``B = 1`` and the ``N`` sequences are packed along ``T``.
        slope: ``[H]`` per-head decay rate ``s_h``.
        initial_state: optional state before the first token (zeros if omitted): ``[B, H, D, D]``, or
            ``[N, H, D, D]`` with ``cu_seqlens``.
        block_size: tokens per block, a power of two; the result does not depend on it beyond rounding.
        cu_seqlens: optional ``[N + 1]`` int offsets of the packed sequences (``0, T_0, T_0 + T_1, ...``).

    Returns:
        ``o`` ``[B, T, H, D]`` in ``q``'s dtype, and the final state(s), ``[B, H, D, D]`` (``[N, H, D, D]`` with
        ``cu_seqlens``) in float32 (float64 for float64 inputs).

    Example::

        o, state = lightning_attention_chunk(q, k, v, slope)                            # from zeros
        o2, state2 = lightning_attention_chunk(q2, k2, v2, slope, initial_state=state)  # continue
        o, states = lightning_attention_chunk(q, k, v, slope, cu_seqlens=torch.tensor([0, 17, 81]))
    """
    return _blocked(q.shape, (q, k, v), False, slope, initial_state, block_size, cu_seqlens)


def lightning_attention_chunk_qkv(
    qkv: Tensor,
    slope: Tensor,
    initial_state: Tensor | None = None,
    block_size: int = 64,
    cu_seqlens: Tensor | Varlen | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`lightning_attention_chunk` on ``q, k, v = silu(qkv).split(D, dim=-1)``, fused.

    ``qkv`` ``[B, T, H, 3D]`` is the pre-activation (MiniMax's q/k/v projection). The SiLU is applied to each group
    of blocks as it is read (and again in the backward), and the backward writes one ``[B, T, H, 3D]`` gradient
    of ``qkv``: no activation pass over the whole tensor, no SiLU output kept for the backward, no concatenation
    of ``dq, dk, dv``. Same values as the unfused form.
    """
    b, t, h, d3 = qkv.shape
    if d3 % 3:
        raise ValueError(f"qkv's last dim must be 3 x head_dim, got {d3}")
    return _blocked((b, t, h, d3 // 3), (qkv,), True, slope, initial_state, block_size, cu_seqlens)


def _blocked(
    shape: tuple[int, int, int, int],
    parts: tuple[Tensor, ...],
    silu: bool,
    slope: Tensor,
    initial_state: Tensor | None,
    block_size: int,
    cu_seqlens: Tensor | Varlen | None,
) -> tuple[Tensor, Tensor]:
    """Both entries: ``shape`` ``(B, T, H, D)``; ``parts`` ``(q, k, v)`` or, with ``silu``, ``(qkv,)``."""
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    b, t, h, d = shape
    q = parts[0]
    varlen = None
    if cu_seqlens is None:
        lengths = [t] * b
    else:
        if b != 1:
            raise ValueError(f"with cu_seqlens, pass the sequences packed as [1, total, H, D], got batch {b}")
        varlen = as_varlen(cu_seqlens, t, q.device)
        lengths = varlen.lengths
    dtype = compute_dtype(q.dtype)
    init = q.new_zeros(len(lengths), h, d, d, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if b * t == 0:  # the state is unchanged, returned as a new tensor (never the caller's own)
        return q.new_zeros(b, t, h, d), init.clone() if init is initial_state else init

    def build() -> _Plan:
        return _Plan(lengths, block_size, h, d, dtype, q.device)

    # A packed batch's plan is made once and reused by every layer of the forward (and their backwards).
    plan = build() if varlen is None else varlen.plan(("lightning", block_size, h, d, dtype, q.device), build)
    flat = [x.reshape(b * t, h, x.shape[-1]) for x in parts]
    # Autocast would re-cast the matmuls behind this path's own dtype handling (and its hand-written backward's):
    # it runs in the inputs' dtype with a float32 state, as without autocast.
    with torch.autocast(q.device.type, enabled=False):
        o, final = _BlockedAttention.apply(slope.to(dtype), init, plan, silu, *flat)
    return o.view(b, t, h, d).to(q.dtype), final


Index = slice | Tensor


class _Group:
    """Blocks ``lo .. hi - 1``, walked together, and where in them sequences start and end.

    ``starts``/``ends`` index the local blocks that hold a sequence's first/last tokens, ``start_seqs``/
    ``end_seqs`` those sequences (slices where both run consecutively, as for many short sequences, else index
    tensors; None if there are none); ``inner`` are the local blocks whose entering state is the leaving state
    of the block before them; ``carry_in``/``carry_out``: block ``lo`` continues the previous group's last
    block / block ``hi - 1`` is continued by the next group's first block. Its tokens are ``t0 .. t1 - 1``; the
    group's padding is described by ``slots``: None (none), an int ``r`` (only its last block is partial, with ``r``
    tokens: one sequence's tail, the usual prefill chunk) or, anywhere else, the local block slot
    (``block * c + position``) of each token.
    """

    def __init__(self, lo: int, hi: int, c: int, tokens: tuple[int, int], slots: Tensor | int | None, start_hits: list,
                 end_hits: list, starts: dict[int, int], n: int, device: torch.device) -> None:  # fmt: skip
        self.lo, self.hi, self.c = lo, hi, c
        self.t0, self.t1 = tokens
        self.slots = slots

        def local(hits: list[tuple[int, int]]) -> tuple[Index | None, Index | None]:  # (local block, sequence)
            if not hits:
                return None, None
            (b0, j0), (b1, j1) = hits[0], hits[-1]
            if b1 - b0 == j1 - j0 == len(hits) - 1:  # consecutive blocks of consecutive sequences
                return slice(b0, b1 + 1), slice(j0, j1 + 1)
            return tuple(torch.tensor(col, device=device) for col in zip(*hits, strict=True))

        self.starts, self.start_seqs = local(start_hits)
        self.ends, self.end_seqs = local(end_hits)
        self.inner = [i for i in range(1, hi - lo) if lo + i not in starts]
        self.carry_in = lo not in starts
        self.carry_out = hi < n and hi not in starts

    def gather(self, tokens: Tensor, dtype: torch.dtype) -> Tensor:
        """The group's tokens ``[t1 - t0, H, D]`` -> its blocks ``[hi - lo, H, c, D]``, contiguous, in ``dtype``,
        zeros in padding slots."""
        _, h, d = tokens.shape
        out = tokens.new_empty(self.hi - self.lo, h, self.c, d, dtype=dtype)
        if self.slots is None:
            return out.copy_(tokens.reshape(self.hi - self.lo, self.c, h, d).transpose(1, 2))
        if isinstance(self.slots, int):  # full blocks, then a tail of r tokens: copied as views, no index
            full, r = len(tokens) - self.slots, self.slots
            out[:-1].copy_(tokens[:full].reshape(-1, self.c, h, d).transpose(1, 2))
            out[-1, :, :r].copy_(tokens[full:].transpose(0, 1))
            out[-1, :, r:].zero_()
            return out
        slots = tokens.new_zeros((self.hi - self.lo) * self.c, h, d, dtype=dtype)
        slots.index_copy_(0, self.slots, tokens.to(dtype))
        return out.copy_(slots.view(self.hi - self.lo, self.c, h, d).transpose(1, 2))

    def scatter(self, blocks: Tensor, tokens: Tensor) -> None:
        """Write ``blocks`` ``[hi - lo, H, c, D]`` to the group's ``tokens`` ``[t1 - t0, H, D]`` (may be strided)."""
        _, h, d = tokens.shape
        if self.slots is None:
            tokens.view(self.hi - self.lo, self.c, h, d).copy_(blocks.transpose(1, 2))
            return
        if isinstance(self.slots, int):
            full = len(tokens) - self.slots
            tokens[:full].view(-1, self.c, h, d).copy_(blocks[:-1].transpose(1, 2))
            tokens[full:].copy_(blocks[-1, :, : self.slots].transpose(0, 1))
            return
        slots = blocks.transpose(1, 2).reshape((self.hi - self.lo) * self.c, h, d)
        tokens.copy_(slots.index_select(0, self.slots))

    def inputs(self, parts: tuple[Tensor, ...], silu: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The group's q, k, v blocks ``[hi - lo, H, c, D]`` from packed ``(q, k, v)``, or from packed
        pre-activation ``(qkv,)`` ``[ΣT, H, 3D]`` with ``silu`` (applied to the group's tokens only)."""
        tokens = [x[self.t0 : self.t1] for x in parts]
        if silu:
            tokens = F.silu(tokens[0]).chunk(3, dim=-1)
        return tuple(self.gather(x, dtype) for x in tokens)


class _Plan:
    """Where each packed token sits in the blocks, where sequences start and end, and the groups of blocks
    walked together (host-side, per call).

    Blocks are numbered in token order; each holds its tokens left-aligned, zeros after them, so the tokens of a
    group of blocks are one contiguous range. A group holds ~:data:`GROUP_BYTES` of one ``[H, c, D]`` operand or
    of its ``[H, D, D]`` states, whichever is larger.
    """

    def __init__(self, lengths: list[int], block_size: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
        self.c = c = min(block_size, max(lengths))
        per_seq = [-(-length // c) for length in lengths]  # blocks of each sequence (0 if empty)
        offsets = [0, *itertools.accumulate(lengths)]
        first_block = [0, *itertools.accumulate(per_seq)]
        self.n = n = first_block[-1]
        first_token = [offsets[j] + i * c for j, blocks in enumerate(per_seq) for i in range(blocks)]
        first_token.append(offsets[-1])  # block i holds tokens first_token[i] .. first_token[i + 1] - 1
        self.empty = [j for j, blocks in enumerate(per_seq) if not blocks]  # their state passes through
        starts = {first_block[j]: j for j, blocks in enumerate(per_seq) if blocks}  # block -> sequence
        ends = {first_block[j + 1] - 1: j for j, blocks in enumerate(per_seq) if blocks}
        # Per block, an [H, c, D] operand and an [H, D, D] state; the larger sets the group's size.
        size = max(1, GROUP_BYTES // (heads * max(c, head_dim) * head_dim * dtype.itemsize))
        start_hits, end_hits = ([[] for _ in range(0, n, size)] for _ in range(2))  # per group: (local block, seq)
        for blocks, hits in ((starts, start_hits), (ends, end_hits)):
            for block, seq in blocks.items():  # in block order
                hits[block // size].append((block % size, seq))
        # [n] tokens in each block, for the decays of a partial block.
        self.block_lengths = torch.tensor(
            [hi - lo for lo, hi in itertools.pairwise(first_token)], device=device, dtype=dtype
        )
        slot = None  # the block slot (block * c + position) of every token, made for a group that needs it
        self.groups = []
        for g, lo in enumerate(range(0, n, size)):
            hi = min(lo + size, n)
            t0, t1 = first_token[lo], first_token[hi]
            slots = None
            if first_token[hi - 1] - t0 != (hi - lo - 1) * c:  # a partial block before the last: padding inside
                if slot is None:
                    shift = torch.tensor([i * c - f for i, f in enumerate(first_token[:-1])])  # slot - token
                    block_of_token = torch.repeat_interleave(torch.arange(n), self.block_lengths.long().cpu())
                    slot = (torch.arange(offsets[-1]) + shift[block_of_token]).to(device)
                slots = slot[t0:t1] - lo * c
            elif t1 - t0 != (hi - lo) * c:  # full blocks, then a partial last one
                slots = t1 - first_token[hi - 1]
            self.groups.append(_Group(lo, hi, c, (t0, t1), slots, start_hits[g], end_hits[g], starts, n, device))


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``[..., m, k] x [..., k, n]`` with equal leading dims, as one ``bmm`` over the flattened
    leading dims: transposed operands (a stride-1 second-to-last dim) are read in place, where
    ``torch.matmul`` on 4-d inputs may copy them first."""
    return torch.bmm(a.flatten(0, -3), b.flatten(0, -3)).view(*a.shape[:-1], b.shape[-1])


class _Decays:
    """The decay factors of one call: ``[H, c, c]`` intra-block mask, and per block and position the decay of
    a key to its block's end, of a query from its block's start, and of the state across the block."""

    def __init__(self, s: Tensor, lengths: Tensor, c: int) -> None:
        s = s[:, None]  # [H, 1]
        r = torch.arange(c, device=s.device, dtype=s.dtype)
        gap = r[:, None] - r[None, :]
        self.mask = torch.where(gap >= 0, torch.exp(-s[:, :, None] * gap.clamp(min=0)), 0.0)  # [H, c, c]
        until_end = lengths[:, None, None] - 1 - r  # [n, 1, c]; a partial block ends before its padding
        self.key = torch.where(until_end >= 0, torch.exp(-s * until_end.clamp(min=0)), 0.0)[..., None]  # [n,H,c,1]
        self.query = torch.exp(-s * (r + 1))[..., None]  # [H, c, 1]
        self.block = torch.exp(-s * lengths)[..., None].transpose(0, 1)[..., None]  # [n, H, 1, 1]


class _BlockedAttention(torch.autograd.Function):
    """Forward and a hand-derived backward, each one pass over groups of blocks (the backward in reverse).
    With ``A = (Q K^T) ⊙ M``, ``S_i`` the state entering block ``i`` and ``G_i`` the gradient of the state
    leaving it::

        dQ = (dO V^T ⊙ M) K + q_decay ⊙ (dO S_i^T)
        dK = (dO V^T ⊙ M)^T Q + k_decay ⊙ (V G_i^T)
        dV = A^T dO + (K ⊙ k_decay) G_i
        G_{i-1} = block_decay_i G_i + (Q_i ⊙ q_decay)^T dO_i      (reverse scan; dfinal at sequence ends)

    Inputs are ``q, k, v`` packed ``[ΣT, H, D]``, or with ``silu`` one packed pre-activation ``qkv``
    ``[ΣT, H, 3D]`` (its SiLU applied per group, its gradient taken through it); ``init`` ``[N, H, D, D]``; returns
    ``o`` ``[ΣT, H, D]`` (compute dtype) and the final states ``[N, H, D, D]``. The states entering each block are
    kept for the backward only when a gradient is wanted.
    """

    @staticmethod
    def forward(ctx, s, init, plan, silu, *parts):
        h, d = init.shape[1:3]
        total = parts[0].shape[0]
        dtype = s.dtype
        decay = _Decays(s, plan.block_lengths, plan.c)
        keep = any(ctx.needs_input_grad)
        states = init.new_empty(plan.n if keep else 0, h, d, d)
        out = init.new_empty(total, h, d)
        final = torch.empty_like(init)  # written at each sequence's last block; an empty one's is its initial
        final[plan.empty] = init[plan.empty]
        carry = None  # the state leaving the previous group's last block
        for g in plan.groups:
            qg, kg, vg = g.inputs(parts, silu, dtype)  # [G, H, c, D]
            o = _bmm(_bmm(qg, kg.transpose(-1, -2)).mul_(decay.mask), vg)
            kv = _bmm(kg.mul_(decay.key[g.lo : g.hi]).transpose(-1, -2), vg)  # [G, H, D, D]
            block = decay.block[g.lo : g.hi]
            st = states[g.lo : g.hi] if keep else torch.empty_like(kv)  # the state entering each block
            if g.carry_in:
                st[0] = carry
            if g.starts is not None:
                st[g.starts] = init[g.start_seqs]
            for i in g.inner:
                torch.addcmul(kv[i - 1], block[i - 1], st[i - 1], out=st[i])
            if g.ends is not None:
                final[g.end_seqs] = torch.addcmul(kv[g.ends], block[g.ends], st[g.ends])
            if g.carry_out:
                carry = torch.addcmul(kv[-1], block[-1], st[-1])
            # (q ⊙ decay_r) S == decay_r ⊙ (q S): the decay scales whole output rows.
            g.scatter(o.addcmul_(_bmm(qg, st), decay.query), out[g.t0 : g.t1])
        ctx.save_for_backward(states, *parts)
        ctx.plan, ctx.decay, ctx.silu = plan, decay, silu
        return out, final

    @staticmethod
    def backward(ctx, do, dfinal):
        states, *parts = ctx.saved_tensors
        plan, decay, silu = ctx.plan, ctx.decay, ctx.silu
        dtype = states.dtype
        grads_in = [torch.empty(x.shape, dtype=dtype, device=x.device) for x in parts]  # d(q, k, v) or d(qkv)
        dinit = torch.empty_like(dfinal)  # written at each sequence's first block
        dinit[plan.empty] = dfinal[plan.empty]  # an empty sequence hands its initial state on untouched
        carry = None  # the gradient of the state entering the next group's first block
        for g in reversed(plan.groups):
            qg, kg, vg = g.inputs(parts, silu, dtype)  # [G, H, c, D]
            dog = g.gather(do[g.t0 : g.t1], dtype)
            # This group's tokens of dq, dk, dv: views into d(qkv) when fused.
            dests = [x[g.t0 : g.t1] for x in grads_in]
            dq, dk, dv = dests[0].chunk(3, dim=-1) if silu else dests
            st, block, key = states[g.lo : g.hi], decay.block[g.lo : g.hi], decay.key[g.lo : g.hi]
            scores = _bmm(qg, kg.transpose(-1, -2)).mul_(decay.mask)
            dscores = _bmm(dog, vg.transpose(-1, -2)).mul_(decay.mask)
            g.scatter(_bmm(dscores, kg).addcmul_(_bmm(dog, st.transpose(-1, -2)), decay.query), dq)
            into = _bmm((qg * decay.query).transpose(-1, -2), dog)  # [G, H, D, D], the read-out's share
            grads = torch.empty_like(into)  # G_i, the gradient of the state leaving block i
            if g.ends is not None:
                grads[g.ends] = dfinal[g.end_seqs]
            if g.carry_out:
                grads[-1] = carry
            for i in reversed(g.inner):  # block i continues block i - 1: G_{i-1} comes from the state entering i
                torch.addcmul(into[i], block[i], grads[i], out=grads[i - 1])
            if g.starts is not None:
                dinit[g.start_seqs] = torch.addcmul(into[g.starts], block[g.starts], grads[g.starts])
            if g.carry_in:
                carry = torch.addcmul(into[0], block[0], grads[0])
            g.scatter(_bmm(dscores.transpose(-1, -2), qg).addcmul_(_bmm(vg, grads.transpose(-1, -2)), key), dk)
            g.scatter(_bmm(scores.transpose(-1, -2), dog).add_(_bmm(kg * key, grads)), dv)
            if silu:  # through the activation, in place, while the group's tokens are in cache
                pre = parts[0][g.t0 : g.t1].to(dtype)
                torch.ops.aten.silu_backward.grad_input(dests[0], pre, grad_input=dests[0])
        return None, dinit, None, None, *grads_in
