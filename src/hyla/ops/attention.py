"""Softmax attention with grouped-query heads, through ``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of the last ``Tq`` positions over ``Tk >= Tq`` keys (earlier keys: a cache).

    Args:
        q: ``[B, Tq, Hq, D]``; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k, v: ``[B, Tk, Hkv, D]`` with ``Hkv`` dividing ``Hq`` (grouped-query attention).

    Returns:
        ``[B, Tq, Hq, D]``. Scaling is ``1 / sqrt(D)``.
    """
    tq, tk = q.shape[1], k.shape[1]
    if tk < tq:
        raise ValueError(f"softmax_attention needs at least as many keys as queries, got {tk} < {tq}")
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if tq == tk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif tq == 1:
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:
        # Queries are aligned to the end of the keys: query i sees keys 0 .. Tk - Tq + i.
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return o.transpose(1, 2)
