"""What the model's attention layers ask of a cache.

A cache owns the history of the sequences in a forward: lightning layers keep a constant-size ``[H, D, D]``
state per sequence, softmax layers keep keys and values. The layers hand it the new ``q, k, v`` and get the
attention output back, so the model needs no knowledge of how a server lays out its memory (the serving
engine's implementations, ``hyla.serve.runner.StepCache`` and ``DecodeCache``: packed requests of different
lengths, their states in pooled slots and their keys and values in a paged block pool).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Cache(Protocol):
    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        """``[1, T]`` absolute position of each of the forward's ``T`` tokens."""
        ...

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, slope: Tensor) -> Tensor:
        """Lightning attention of ``[B, T, H, D]`` inputs continuing the cached states, which it updates."""
        ...

    def attention(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal softmax attention of ``[B, T, H, D]`` queries over the cached and new keys, which it keeps."""
        ...

    def short_conv(self, layer_idx: int, x: Tensor, weight: Tensor) -> Tensor:
        """:func:`hyla.ops.conv.short_conv` of ``[B, T, C]`` inputs continuing each sequence's cached last
        ``K - 1`` inputs, which it updates (only models with ``lightning_qk_conv`` call it)."""
        ...
