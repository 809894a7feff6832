"""The engine's memory: a pool of lightning-state slots and a paged key/value block pool, and the per-step
view of them that the model's layers call (the :class:`~hyla.model.Cache` protocol).

Lightning layers need a constant ``[H, D, D]`` float32 state per request, whatever its length: one slot per
running request, taken at admission and given back when it finishes. Softmax layers need every token's keys
and values: fixed-size blocks from one pool, each request owning an append-only block table.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from hyla.config import LIGHTNING, HylaConfig
from hyla.ops.attention import paged_attention
from hyla.ops.lightning import lightning_attention, lightning_decode


class BlockPool:
    """A free list of ``num_blocks`` block ids (or state-slot ids) that hands out the lowest free ids first:
    running requests then sit in few runs of consecutive slots, which the decode step updates in place."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # a heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` ids, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [heapq.heappop(self._free) for _ in range(n)]

    def release(self, ids: list[int]) -> None:
        for i in ids:
            heapq.heappush(self._free, i)


class EngineCache:
    """Preallocated pools for every layer: ``[S, H, D, D]`` float32 states per lightning layer and
    ``[num_blocks, block_size, Hkv, D]`` keys and values per softmax layer."""

    def __init__(
        self,
        config: HylaConfig,
        num_slots: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        h, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.states: dict[int, Tensor] = {}
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == LIGHTNING:
                self.states[i] = torch.zeros(num_slots, h, d, d, dtype=state_dtype, device=device)
            else:
                self.keys[i] = torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
                self.values[i] = torch.zeros_like(self.keys[i])
        self.slots = BlockPool(num_slots)
        self.blocks = BlockPool(num_blocks)

    def reset_slot(self, slot: int) -> None:
        """Zero a slot's states (a new request starts from an empty history)."""
        for pool in self.states.values():
            pool[slot].zero_()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass
class ScheduledSeq:
    """One request's share of a step: ``num_tokens`` new tokens after ``num_computed`` cached ones."""

    slot: int
    block_table: list[int]
    num_computed: int
    num_tokens: int


class StepCache:
    """The cache as one engine step sees it: ``N`` requests packed into one row ``[1, ΣT]``.

    Requests with one new token (decodes) come first and take the in-place slot-decode kernel and a batched
    paged attention with one query each; the rest (prefill chunks) take the varlen blockwise kernel from
    their slots' states and a paged attention with padded queries. No loop over requests runs in a layer.
    """

    def __init__(self, cache: EngineCache, seqs: list[ScheduledSeq], device: torch.device) -> None:
        first_prefill = next((i for i, s in enumerate(seqs) if s.num_tokens > 1), len(seqs))
        if any(s.num_tokens == 1 for s in seqs[first_prefill:]):
            raise ValueError("decodes (one new token) must come before prefill chunks in a step")
        self.cache = cache
        bs = cache.block_size
        lengths = [s.num_tokens for s in seqs]
        self.num_decodes = sum(1 for n in lengths if n == 1)

        def ints(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        positions = [s.num_computed + j for s in seqs for j in range(s.num_tokens)]
        self._positions = ints(positions)[None]
        # Each new token's row in the flattened [num_blocks * block_size] pool.
        self.slot_mapping = ints([s.block_table[p // bs] * bs + p % bs for s in seqs for p in _range(s)])
        self.slots = ints([s.slot for s in seqs])
        self.context_lens = ints([s.num_computed + s.num_tokens for s in seqs])
        self.query_lens = ints(lengths)
        width = max((len(s.block_table) for s in seqs), default=0)
        self.block_tables = ints([s.block_table + [0] * (width - len(s.block_table)) for s in seqs]).view(-1, width)
        prefill = lengths[self.num_decodes :]
        self.cu_seqlens = ints([0, *itertools.accumulate(prefill)])
        # Prefill queries padded to [P, Tmax]: the packed index of each (padding repeats the last real token).
        t_max = max(prefill, default=0)
        starts = self.cu_seqlens[:-1, None] + self.num_decodes
        offsets = torch.arange(t_max, device=device)[None]
        self.query_index = starts + torch.minimum(offsets, self.query_lens[self.num_decodes :, None] - 1)
        self.query_valid = offsets < self.query_lens[self.num_decodes :, None]

    def positions(self, num_tokens: int, device: torch.device) -> Tensor:
        return self._positions

    def lightning(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, slope: Tensor, block_size: int) -> Tensor:
        pool = self.cache.states[layer_idx]
        nd = self.num_decodes
        out = torch.empty_like(q)  # [1, ΣT, H, D]
        if nd:
            out[0, :nd] = lightning_decode(q[0, :nd], k[0, :nd], v[0, :nd], slope, pool, self.slots[:nd])
        if nd < self.slots.numel():
            slots = self.slots[nd:]
            o, states = lightning_attention(
                q[:, nd:], k[:, nd:], v[:, nd:], slope, pool[slots], block_size, self.cu_seqlens
            )
            pool[slots] = states
            out[:, nd:] = o
        return out

    def attention(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_pool, v_pool = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, self.slot_mapping, k[0])
        v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, self.slot_mapping, v[0])
        nd = self.num_decodes
        out = torch.empty_like(q)  # [1, ΣT, H, D]
        if nd:
            o = paged_attention(
                q[0, :nd, None], k_pool, v_pool, self.block_tables[:nd], self.context_lens[:nd], self.query_lens[:nd]
            )
            out[0, :nd] = o[:, 0]
        if nd < self.slots.numel():
            o = paged_attention(
                q[0][self.query_index],
                k_pool,
                v_pool,
                self.block_tables[nd:],
                self.context_lens[nd:],
                self.query_lens[nd:],
            )
            out[0, nd:] = o[self.query_valid]
        return out


def _range(seq: ScheduledSeq) -> range:
    return range(seq.num_computed, seq.num_computed + seq.num_tokens)
