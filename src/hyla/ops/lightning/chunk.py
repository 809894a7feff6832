"""Blockwise lightning attention (MiniMax-01, Alg. 1), vectorised over blocks and heads.

The sequence is cut into blocks of ``C`` tokens. Inside a block, attention is exact: ``(Q K^T ⊙ M) V`` with
the decay mask ``M[i, j] = exp(-s (i - j))`` for ``j <= i``. Between blocks, a ``[D, D]`` state carries
everything earlier: block ``i`` reads ``(Q_i ⊙ exp(-s (r + 1))) S_i`` (``r`` the position in the block) and
adds ``(K_i ⊙ exp(-s (C - 1 - r)))^T V_i`` to the state it hands on, after decaying it by ``exp(-s C)``.

Varlen (``cu_seqlens``): packed sequences ``[1, ΣT, H, D]`` are laid out so that no block holds two
sequences (a sequence's last block may be partial), and the state restarts at each sequence's first block.

Cost: ``O(T C D + T D^2)`` per head, forward and backward (a hand-derived backward, see
:class:`_BlockedAttention`). All matrix products run batched over every block at once; only the state
hand-over ``S_{i+1} = exp(-s C) S_i + KV_i`` (and its reverse in the backward) is a loop, over ``T / C``
blocks, because it is a sequential scan whose batched (all-pairs) form costs ``O((T / C)^2 D^2)``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed, and their state kept, in float32; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def lightning_attention_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope: Tensor,
    initial_state: Tensor | None = None,
    block_size: int = 64,
    cu_seqlens: Tensor | None = None,
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
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if cu_seqlens is not None:
        return _varlen(q, k, v, slope, initial_state, block_size, cu_seqlens)
    b, t, h, d = q.shape
    dtype = compute_dtype(q.dtype)
    state = q.new_zeros(b, h, d, d, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if t == 0:
        return q.new_zeros(b, 0, h, d), state
    c = min(block_size, t)
    n = -(-t // c)

    def blocks(x: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, n, c, D], contiguous, zeros after the end
        # One copy, whose backward is a view (F.pad would keep the transposed strides, a slice copy_ would
        # copy the gradient back): contiguity lets every bmm read the blocks in place.
        x = x.to(dtype).transpose(1, 2)
        return torch.cat([x, x.new_zeros(b, h, n * c - t, d)], dim=2).view(b, h, n, c, d)

    lengths = torch.full((n,), c, device=q.device, dtype=dtype)
    lengths[-1] = t - (n - 1) * c
    o, final = _blocked(blocks(q), blocks(k), blocks(v), slope.to(dtype), lengths, [0], state[None], [n - 1])
    o = _token_major(o)[:, :t]
    return o.to(q.dtype), final[:, :, 0]


def _varlen(
    q: Tensor, k: Tensor, v: Tensor, slope: Tensor, initial_state: Tensor | None, block_size: int, cu_seqlens: Tensor
) -> tuple[Tensor, Tensor]:
    """Packed sequences: gather them into blocks that never straddle two sequences, run, scatter back."""
    b, t, h, d = q.shape
    if b != 1:
        raise ValueError(f"with cu_seqlens, pass the sequences packed as [1, total, H, D], got batch {b}")
    offsets = cu_seqlens.tolist()
    lengths = [hi - lo for lo, hi in itertools.pairwise(offsets)]
    if offsets[0] != 0 or offsets[-1] != t or min(lengths, default=0) < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {t}, got {offsets}")
    num_seqs, dtype, device = len(lengths), compute_dtype(q.dtype), q.device
    init = q.new_zeros(num_seqs, h, d, d, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if t == 0:
        return q.new_zeros(1, 0, h, d), init
    c = min(block_size, max(lengths))
    per_seq = [-(-length // c) for length in lengths]  # blocks of each sequence (0 if empty)
    first = [sum(per_seq[:i]) for i in range(num_seqs)]
    n = sum(per_seq)
    # For every slot of every block, the packed token it holds, or t (a zero row) for padding.
    seq_of_block = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(per_seq))
    block_in_seq = torch.arange(n) - torch.tensor(first)[seq_of_block]
    pos_in_seq = block_in_seq[:, None] * c + torch.arange(c)[None]  # [n, c]
    valid = pos_in_seq < torch.tensor(lengths)[seq_of_block][:, None]
    # The block slot of every packed token, in token order.
    token_slot = valid.reshape(-1).nonzero().squeeze(1).to(device)

    def blocks(x: Tensor) -> Tensor:  # [1, T, H, D] -> [1, H, n, c, D], contiguous, zeros in padding slots
        # Written by index_copy (whose backward is a gather) straight into the layout the matmuls read.
        out = x.new_zeros(h, n * c, d, dtype=dtype)
        return out.index_copy(1, token_slot, x[0].transpose(0, 1).to(dtype)).view(1, h, n, c, d)

    block_lengths = valid.sum(1).to(device=device, dtype=dtype)
    seqs = [i for i in range(num_seqs) if per_seq[i]]
    starts = [first[i] for i in seqs]
    ends = [first[i] + per_seq[i] - 1 for i in seqs]
    o, finals = _blocked(blocks(q), blocks(k), blocks(v), slope.to(dtype), block_lengths, starts,
                         init[seqs][:, None], ends)  # fmt: skip
    o = _token_major(o)[0].index_select(0, token_slot)  # [T, H, D]
    final = init.clone()
    final[seqs] = finals[0].transpose(0, 1)
    return o[None].to(q.dtype), final


def _token_major(o: Tensor) -> Tensor:
    """``[B, H, n, c, D]`` blocks -> ``[B, n * c, H, D]`` tokens (a view of :func:`_blocked`'s output)."""
    b, h, n, c, d = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, d)


def _blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s: Tensor,
    lengths: Tensor,
    starts: list[int],
    init: Tensor,
    ends: list[int],
) -> tuple[Tensor, Tensor]:
    """The blockwise algorithm on blocks that each hold one sequence's tokens, left-aligned.

    Args:
        q, k, v: ``[B, H, n, c, D]``, zeros in padding slots.
        s: ``[H]`` slopes. lengths: ``[n]`` tokens in each block (``1..c``).
        starts: blocks where a sequence starts; its state there is ``init[j]`` (``[len(starts), B, H, D, D]``).
        ends: each sequence's last block, where its final state is read.

    Returns:
        ``o`` ``[B, H, n, c, D]`` (a permuted view of token-major memory, see :func:`_token_major`) and the final
        states ``[B, H, len(ends), D, D]``.
    """
    return _BlockedAttention.apply(q, k, v, s, lengths, starts, init, ends)


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``[..., m, k] x [..., k, n]`` with equal leading dims, as one ``bmm`` over the flattened
    leading dims: transposed operands (a stride-1 second-to-last dim) are read in place, where
    ``torch.matmul`` on 5-d inputs copies them first (measured: 6 copies of 64 MB in a 32k-token forward)."""
    return torch.bmm(a.flatten(0, -3), b.flatten(0, -3)).view(*a.shape[:-1], b.shape[-1])


class _Decays:
    """The decay factors of one call: ``[H, c, c]`` intra-block mask, and per block and position the decay of
    a key to its block's end, of a query from its block's start, and of the state across the block."""

    def __init__(self, s: Tensor, lengths: Tensor, c: int) -> None:
        s = s[:, None]  # [H, 1]
        r = torch.arange(c, device=s.device, dtype=s.dtype)
        gap = r[:, None] - r[None, :]
        self.mask = torch.where(gap >= 0, torch.exp(-s[:, :, None] * gap.clamp(min=0)), 0.0)[:, None]  # [H,1,c,c]
        until_end = lengths[:, None] - 1 - r  # [n, c]; a partial block ends before its padding
        self.key = torch.where(until_end >= 0, torch.exp(-s[:, :, None] * until_end.clamp(min=0)), 0.0)[..., None]
        self.query = torch.exp(-s * (r + 1))[:, None, :, None]  # [H, 1, c, 1]
        self.block = torch.exp(-s * lengths)[..., None, None]  # [H, n, 1, 1]


class _BlockedAttention(torch.autograd.Function):
    """Forward and a hand-derived backward, both batched over blocks (autograd through the blockwise graph
    is several times slower). With ``A = (Q K^T) ⊙ M``, ``S_i`` the state entering block ``i`` and ``G_i``
    the gradient of the state leaving it::

        dQ = (dO V^T ⊙ M) K + q_decay ⊙ (dO S_i^T)
        dK = (dO V^T ⊙ M)^T Q + k_decay ⊙ (V G_i^T)
        dV = A^T dO + (K ⊙ k_decay) G_i
        G_{i-1} = block_decay_i G_i + (Q_i ⊙ q_decay)^T dO_i      (reverse scan; dfinal at sequence ends)
    """

    @staticmethod
    def forward(ctx, q, k, v, s, lengths, starts, init, ends):
        decay = _Decays(s, lengths, q.shape[3])
        o = _bmm(_bmm(q, k.transpose(-1, -2)).mul_(decay.mask), v)  # [B, H, n, c, D]
        kv = _bmm((k * decay.key).transpose(-1, -2), v)  # [B, H, n, D, D]
        states = kv.new_empty(kv.shape)  # the state entering each block
        restarts = dict(zip(starts, init, strict=True))
        for i in range(kv.shape[2]):
            if i in restarts:
                states[:, :, i] = restarts[i]
            else:
                torch.addcmul(kv[:, :, i - 1], decay.block[:, i - 1], states[:, :, i - 1], out=states[:, :, i])
        final = decay.block[:, ends] * states[:, :, ends] + kv[:, :, ends]
        # (q ⊙ decay_r) S == decay_r ⊙ (q S): the decay scales whole output rows. The sum is written token-major
        # ([B, n, c, H, D] memory), the layout callers read back, so that reading it back copies nothing.
        b, h, n, c, d = q.shape
        out = q.new_empty(b, n, c, h, d).permute(0, 3, 1, 2, 4)
        torch.addcmul(o, _bmm(q, states), decay.query, out=out)
        ctx.save_for_backward(q, k, v, s, lengths, states)
        ctx.starts, ctx.ends = starts, ends
        return out, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, s, lengths, states = ctx.saved_tensors
        do = do.contiguous()  # (an expanded or permuted gradient would be copied by every matmul below)
        decay = _Decays(s, lengths, q.shape[3])
        scores = _bmm(q, k.transpose(-1, -2)).mul_(decay.mask)
        dscores = _bmm(do, v.transpose(-1, -2)).mul_(decay.mask)
        dq = _bmm(dscores, k).addcmul_(_bmm(do, states.transpose(-1, -2)), decay.query)
        # Reverse scan for G, the gradient of the state leaving each block.
        into = _bmm((q * decay.query).transpose(-1, -2), do)  # [B, H, n, D, D], the read-out's share
        grads = torch.empty_like(into)
        end_of = {e: j for j, e in enumerate(ctx.ends)}
        for i in reversed(range(into.shape[2])):
            if i in end_of:
                grads[:, :, i] = dfinal[:, :, end_of[i]]
            else:  # the next block continues this sequence: G_i is the gradient of the state entering it
                torch.addcmul(into[:, :, i + 1], decay.block[:, i + 1], grads[:, :, i + 1], out=grads[:, :, i])
        # The gradient of each sequence's initial state: that of the state entering its first block.
        entering = torch.addcmul(into[:, :, ctx.starts], decay.block[:, ctx.starts], grads[:, :, ctx.starts])
        dk = _bmm(dscores.transpose(-1, -2), q).addcmul_(_bmm(v, grads.transpose(-1, -2)), decay.key)
        dv = _bmm(scores.transpose(-1, -2), do).add_(_bmm(k * decay.key, grads))
        return dq, dk, dv, None, None, None, entering.permute(2, 0, 1, 3, 4), None
