"""A short causal depthwise convolution: the token mixing Zoology-era linear models put before their q/k.

MiniMax's lightning layers have none (``HylaConfig.lightning_qk_conv = 0``); the recall study's opt-in step outside
the design family (``lightning_qk_conv = K``) convolves each lightning layer's q and k channels over the last
``K`` tokens, so that a key can carry the token before it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyla.ops.varlen import Varlen


def short_conv(x: Tensor, weight: Tensor, cu_seqlens: Tensor | Varlen | None = None) -> Tensor:
    """``y[t] = sum_j weight[j] * x[t - j]`` over the ``K`` taps of ``weight`` ``[K, C]`` (tap 0: the token itself),
    for ``x`` ``[B, T, C]``; inputs before a sequence's first token are zero. ``cu_seqlens`` (``[N + 1]`` offsets)
    packs ``N`` sequences along ``T`` (``B = 1``): no tap reaches into the sequence before."""
    t = x.shape[1]
    y = x * weight[0]
    offsets = None
    if cu_seqlens is not None:
        cu = (cu_seqlens.cu_seqlens if isinstance(cu_seqlens, Varlen) else cu_seqlens).to(x.device)
        offsets = torch.arange(t, device=x.device) - torch.repeat_interleave(cu[:-1], cu.diff())
    for j in range(1, min(len(weight), t)):
        shifted = torch.cat((x.new_zeros(x.shape[0], j, x.shape[2]), x[:, : t - j]), dim=1)
        if offsets is not None:
            shifted = shifted * (offsets >= j).to(x.dtype)[None, :, None]
        y = y + shifted * weight[j]
    return y
