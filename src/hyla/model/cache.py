"""The decode cache of a single batch of sequences that advance together (hyla's own ``generate``).

Lightning layers keep one ``[B, H, D, D]`` state each: constant size, whatever the length. Softmax layers
keep their keys and values, growing by the tokens of each forward. The serving engine (``hyla.serve``)
keeps the same two things in pooled, paged form; both present this interface to the model.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DecodeCache:
    """Per-layer lightning states and softmax keys/values for ``B`` sequences of equal length."""

    def __init__(self) -> None:
        self.states: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.seq_len = 0  # tokens already seen, the position of the next one

    def lightning_state(self, layer_idx: int) -> Tensor | None:
        return self.states.get(layer_idx)

    def set_lightning_state(self, layer_idx: int, state: Tensor) -> None:
        self.states[layer_idx] = state

    def append_kv(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``[B, T, Hkv, D]`` keys and values; return all of this layer's, ``[B, seq_len + T, Hkv, D]``."""
        if layer_idx in self.keys:
            k = torch.cat((self.keys[layer_idx], k), dim=1)
            v = torch.cat((self.values[layer_idx], v), dim=1)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        """``[1, T]`` absolute positions of the next ``num_tokens`` tokens."""
        return torch.arange(self.seq_len, self.seq_len + num_tokens, device=device)[None]

    def advance(self, num_tokens: int) -> None:
        self.seq_len += num_tokens
