"""Softmax attention with grouped-query heads, through ``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
    """Causal attention of the last ``Tq`` positions over ``Tk >= Tq`` keys (earlier keys: a cache).

    Args:
        q: ``[B, Tq, Hq, D]``; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k, v: ``[B, Tk, Hkv, D]`` with ``Hkv`` dividing ``Hq`` (grouped-query attention).
        cu_seqlens: optional ``[N + 1]`` offsets of sequences packed along ``T`` (``B = 1``, ``Tq = Tk``):
            no query sees a key of another sequence.

    Returns:
        ``[B, Tq, Hq, D]``. Scaling is ``1 / sqrt(D)``.
    """
    tq, tk = q.shape[1], k.shape[1]
    if cu_seqlens is not None:
        if tq != tk:
            raise ValueError("packed sequences (cu_seqlens) cannot continue a cache")
        return _sdpa(q, k, v, is_causal=False, mask=_packed_causal_mask(cu_seqlens, tq, q.device))
    if tk < tq:
        raise ValueError(f"softmax_attention needs at least as many keys as queries, got {tk} < {tq}")
    if tq == tk:
        return _sdpa(q, k, v, is_causal=True)
    if tq == 1:
        return _sdpa(q, k, v, is_causal=False)
    # Queries are aligned to the end of the keys: query i sees keys 0 .. Tk - Tq + i.
    return _sdpa(q, k, v, is_causal=False, mask=torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, mask: Tensor | None = None) -> Tensor:
    """SDPA on ``[B, T, H, D]`` tensors (it wants ``[B, H, T, D]``), with grouped-query heads."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    return o.transpose(1, 2)


def _packed_causal_mask(cu_seqlens: Tensor, t: int, device: torch.device) -> Tensor:
    """``[T, T]`` bool: query ``i`` sees key ``j <= i`` of its own sequence."""
    seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=device), cu_seqlens.diff().to(device))
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return causal & (seq[:, None] == seq[None, :])
