"""The reference: lightning attention as its token-by-token recurrence.

    S_t = exp(-slope) * S_{t-1} + k_t^T v_t        (a [D, D] state per head)
    o_t = q_t S_t

Slow (a Python loop over tokens) and obviously right; every fast path is tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lightning_attention_naive(
    q: Tensor, k: Tensor, v: Tensor, slope: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal linear attention with a per-head exponential decay, one token at a time.

    Args:
        q, k, v: ``[B, T, H, D]``.
        slope: ``[H]``, the per-head decay rate ``s_h`` (the state decays by ``exp(-s_h)`` per token).
        initial_state: optional ``[B, H, D, D]`` state before the first token (zeros if omitted).

    Returns:
        ``o`` of shape ``[B, T, H, D]`` and the final state ``[B, H, D, D]``, both in ``q``'s dtype.
    """
    b, t, h, d = q.shape
    state = q.new_zeros(b, h, d, d) if initial_state is None else initial_state.to(q.dtype)
    decay = torch.exp(-slope.to(q.dtype))[None, :, None, None]  # [1, H, 1, 1]
    outputs = []
    for i in range(t):
        state = decay * state + k[:, i, :, :, None] * v[:, i, :, None, :]
        outputs.append(torch.einsum("bhd,bhde->bhe", q[:, i], state))
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(b, 0, h, d)
    return o, state
