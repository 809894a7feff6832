"""What the model's attention layers ask of a cache, and the simplest one: a single batch decoded in step.

A cache owns the history of the sequences in a forward: lightning layers keep a constant-size ``[H, D, D]``
state per sequence, softmax layers keep keys and values. The layers hand it the new ``q, k, v`` and get the
attention output back, so the same model serves :class:`DecodeCache` (hyla's own ``generate``: ``B``
sequences advancing together) and the serving engine's batches (``hyla.serve.cache``: packed requests of
different lengths, their states in pooled slots and their keys and values in a paged block pool).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from hyla.ops.attention import softmax_attention
from hyla.ops.lightning import lightning_attention


class Cache(Protocol):
    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        """``[1, T]`` absolute position of each of the forward's ``T`` tokens."""
        ...

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, slope: Tensor, block_size: int) -> Tensor:
        """Lightning attention of ``[B, T, H, D]`` inputs continuing the cached states, which it updates."""
        ...

    def attention(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal softmax attention of ``[B, T, H, D]`` queries over the cached and new keys, which it keeps."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Called once after the forward's last layer."""
        ...


class DecodeCache:
    """Per-layer lightning states and softmax keys/values for ``B`` sequences of equal length."""

    def __init__(self) -> None:
        self.states: dict[int, Tensor] = {}  # [B, H, D, D] per lightning layer
        self.keys: dict[int, Tensor] = {}  # [B, seq_len, Hkv, D] per softmax layer
        self.values: dict[int, Tensor] = {}
        self.seq_len = 0  # tokens already seen, the position of the next one

    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        return torch.arange(self.seq_len, self.seq_len + num_tokens, device=device)[None]

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, slope: Tensor, block_size: int) -> Tensor:
        o, self.states[layer_idx] = lightning_attention(q, k, v, slope, self.states.get(layer_idx), block_size)
        return o

    def attention(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if layer_idx in self.keys:
            k = torch.cat((self.keys[layer_idx], k), dim=1)
            v = torch.cat((self.values[layer_idx], v), dim=1)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return softmax_attention(q, k, v)

    def advance(self, num_tokens: int) -> None:
        self.seq_len += num_tokens
