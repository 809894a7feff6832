"""MiniMax-01's per-head decay rates of lightning attention."""

from __future__ import annotations

import torch
from torch import Tensor


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> Tensor:
    """``[H]`` decay rates: ``2^(-8 (h + 1) / H)``, scaled down linearly with depth (as in MiniMax-01).

    Computed in float32 exactly as transformers does, so that weights saved by either give equal outputs.
    """
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** (torch.arange(num_heads) + 1)
    return rate * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)
