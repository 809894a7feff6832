"""Blockwise lightning attention (MiniMax-01, Alg. 1), vectorised over blocks and heads.

The sequence is cut into blocks of ``C`` tokens. Inside a block, attention is exact: ``(Q K^T ⊙ M) V`` with
the decay mask ``M[i, j] = exp(-s (i - j))`` for ``j <= i``. Between blocks, a ``[D, D]`` state carries
everything earlier: block ``i`` reads ``(Q_i ⊙ exp(-s (r + 1))) S_i`` (``r`` the position in the block) and
adds ``(K_i ⊙ exp(-s (C - 1 - r)))^T V_i`` to the state it hands on, after decaying it by ``exp(-s C)``.

Cost: ``O(T C D + T D^2)`` per head. All matrix products run batched over every block at once; only the
state hand-over ``S_{i+1} = exp(-s C) S_i + KV_i`` is a loop, over ``T / C`` blocks, because it is a
sequential scan whose batched (all-pairs) form costs ``O((T / C)^2 D^2)`` — quadratic in length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
) -> tuple[Tensor, Tensor]:
    """Causal linear attention with per-head decay, computed blockwise.

    Args:
        q, k, v: ``[B, T, H, D]``; any ``T`` (not necessarily a multiple of ``block_size``), ``T = 0`` too.
        slope: ``[H]`` per-head decay rate ``s_h``.
        initial_state: optional ``[B, H, D, D]`` state before the first token (zeros if omitted).
        block_size: tokens per block, a power of two; the result does not depend on it beyond rounding.

    Returns:
        ``o`` ``[B, T, H, D]`` in ``q``'s dtype, and the final state ``[B, H, D, D]`` in float32 (float64
        for float64 inputs).

    Example::

        o, state = lightning_attention_chunk(q, k, v, slope)                       # from zeros
        o2, state2 = lightning_attention_chunk(q2, k2, v2, slope, initial_state=state)  # continue
    """
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    b, t, h, d = q.shape
    out_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    state = q.new_zeros(b, h, d, d, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if t == 0:
        return q.new_zeros(b, 0, h, d), state

    c = min(block_size, t)
    n = -(-t // c)
    last = t - (n - 1) * c  # tokens in the last block, 1..c
    s = slope.to(dtype)[:, None]  # [H, 1]

    def blocks(x: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, n, c, D]
        x = x.to(dtype).transpose(1, 2)
        return F.pad(x, (0, 0, 0, n * c - t)).view(b, h, n, c, d)

    q, k, v = blocks(q), blocks(k), blocks(v)
    r = torch.arange(c, device=q.device, dtype=dtype)
    # Inside a block: M[i, j] = exp(-s (i - j)) for j <= i, else 0.
    gap = r[:, None] - r[None, :]
    mask = torch.where(gap >= 0, torch.exp(-s[:, :, None] * gap.clamp(min=0)), 0.0)  # [H, c, c]
    # (In-place ops below are on matmul outputs, which their backward does not need.)
    o = torch.matmul(torch.matmul(q, k.transpose(-1, -2)).mul_(mask[:, None]), v)  # [B, H, n, c, D]

    # Each key's decay up to the end of its block; the last block ends at token T - 1, not at its padding.
    key_decay = torch.exp(-s * (c - 1 - r))[:, None].repeat(1, n, 1)  # [H, n, c]
    key_decay[:, -1] = torch.where(r < last, torch.exp(-s * (last - 1 - r).clamp(min=0)), 0.0)
    kv = torch.matmul((k * key_decay[..., None]).transpose(-1, -2), v)  # [B, H, n, D, D]

    states = _scan(kv, torch.exp(-s * c)[:, :, None], state)  # [B, H, n, D, D]: the state entering each block
    final = torch.exp(-s * last)[:, :, None] * states[:, :, -1] + kv[:, :, -1]
    query_decay = torch.exp(-s * (r + 1))[:, None, :, None]  # [H, 1, c, 1]
    # (q ⊙ decay_r) S == decay_r ⊙ (q S): the decay scales whole output rows.
    o = o.addcmul_(torch.matmul(q, states), query_decay)

    o = o.view(b, h, n * c, d)[:, :, :t].transpose(1, 2)
    return o.to(out_dtype), final


def _scan(kv: Tensor, block_decay: Tensor, state: Tensor) -> Tensor:
    """States entering each block: ``S_0 = state``, ``S_{i+1} = block_decay * S_i + kv_i``; ``[B, H, n, D, D]``.

    Without autograd the states are written in place into one preallocated tensor; with it, stacked.
    """
    n = kv.shape[2]
    if not torch.is_grad_enabled() or not (kv.requires_grad or state.requires_grad):
        states = kv.new_empty(kv.shape)
        states[:, :, 0] = state
        for i in range(n - 1):
            torch.addcmul(kv[:, :, i], block_decay, states[:, :, i], out=states[:, :, i + 1])
        return states
    out = [state]
    for i in range(n - 1):
        out.append(block_decay * out[-1] + kv[:, :, i])
    return torch.stack(out, dim=2)
