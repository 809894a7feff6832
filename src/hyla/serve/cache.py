"""The engine's cache bookkeeping, in ids only (the runner owns the tensors): lightning-state slots, paged KV
blocks with reference counts, and the prefix cache — KV blocks and lightning-state snapshots found by a hash
chained over the tokens before them.

Lightning layers need one constant ``[H, D, D]`` state per running request, whatever its length: a *slot*,
taken at admission and given back when the request ends. Softmax layers need every token's keys and values:
fixed-size *blocks*, each request holding an append-only block table.

Prefix caching, exact for hybrid models: a full block of tokens is named by ``hash(parent's hash, its tokens)``,
so a name fixes every token before it. A block whose request ended stays cached (reference count 0, in an LRU
list) until its id is needed. A softmax layer can resume from cached blocks alone, but a lightning layer's past
is its state: a *snapshot* of every lightning layer's state, taken when a request's computed tokens reach a
chosen block boundary, is kept under that boundary's block name in a pool of its own (LRU, its own budget). A
new request resumes at the longest boundary for which both the blocks and the snapshot are cached.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class SlotPool:
    """A free list of ``num`` ids that hands out the lowest free ids first: running requests then sit in few runs
    of consecutive slots, which the decode step updates in place."""

    def __init__(self, num: int) -> None:
        self.num = num
        self._free = list(range(num))  # a heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)


def block_hashes(token_ids: Sequence[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """The chained names of the full blocks of ``token_ids``: block ``i``'s name hashes block ``i - 1``'s name and
    its own tokens (128-bit BLAKE2b: collisions are not a practical concern)."""
    names = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = np.asarray(token_ids[start : start + block_size], dtype=np.int64).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        names.append(parent)
    return names


@dataclass
class _Block:
    ref: int = 0
    name: bytes | None = None  # set once the block is full and registered in the prefix cache


class BlockPool:
    """KV-block ids with reference counts. Free ids are handed out first; then cached blocks nobody holds, oldest
    first (their names leave the prefix cache). ``num_free`` counts both: every block nobody holds."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free = list(range(num_blocks))  # a heap of blocks that hold nothing
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first
        self.cached: dict[bytes, int] = {}  # block name -> block id

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh block ids (reference 1), or None (and nothing taken) when fewer are free."""
        if n > self.num_free:
            return None
        ids = []
        for _ in range(n):
            if self._free:
                ids.append(heapq.heappop(self._free))
                continue
            block_id, _ = self._evictable.popitem(last=False)
            del self.cached[self._blocks[block_id].name]
            self._blocks[block_id].name = None
            ids.append(block_id)
        for block_id in ids:
            self._blocks[block_id].ref = 1
        return ids

    def take(self, block_id: int) -> None:
        """Hold a cached block (another reference)."""
        block = self._blocks[block_id]
        if block.ref == 0:
            del self._evictable[block_id]
        block.ref += 1

    def release(self, ids: Sequence[int]) -> None:
        for block_id in ids:
            block = self._blocks[block_id]
            block.ref -= 1
            if block.ref:
                continue
            if block.name is None:
                heapq.heappush(self._free, block_id)
            else:
                self._evictable[block_id] = None

    def register(self, block_id: int, name: bytes) -> None:
        """Name a full block in the prefix cache (unless an equal block already has the name: the first stays)."""
        if name not in self.cached and self._blocks[block_id].name is None:
            self.cached[name] = block_id
            self._blocks[block_id].name = name


class SnapshotPool:
    """Snapshot ids, each named by a boundary's block name once its states are copied; LRU eviction."""

    def __init__(self, num: int) -> None:
        self.num = num
        self._free = list(range(num))
        self._named: OrderedDict[bytes, int] = OrderedDict()  # name -> snapshot id, least recent first

    @property
    def num_used(self) -> int:
        return self.num - len(self._free)

    def find(self, name: bytes) -> int | None:
        snapshot = self._named.get(name)
        if snapshot is not None:
            self._named.move_to_end(name)
        return snapshot

    def allocate(self) -> int | None:
        """A snapshot id to copy states into: a free one, else the least recently used named one (forgotten)."""
        if self._free:
            return self._free.pop()
        if not self._named:
            return None
        _, snapshot = self._named.popitem(last=False)
        return snapshot

    def name(self, snapshot: int, name: bytes) -> None:
        """Keep ``snapshot`` under ``name``; if another already has it, ``snapshot`` goes back to the free list."""
        if name in self._named:
            self._free.append(snapshot)
        else:
            self._named[name] = snapshot

    def release(self, snapshot: int) -> None:
        self._free.append(snapshot)


@dataclass
class PrefixHit:
    """A cached prefix: its ``num_tokens`` (a block boundary), its blocks, and the snapshot of the states there;
    ``matched_tokens``: how far the cached blocks alone reach (where this sequence parts from an earlier one)."""

    num_tokens: int
    blocks: list[int] = field(default_factory=list)
    snapshot: int | None = None
    matched_tokens: int = 0


class CacheManager:
    """Every id the scheduler hands out: slots, KV blocks and (with prefix caching) snapshots and block names."""

    def __init__(self, num_slots: int, num_blocks: int, block_size: int, num_snapshots: int) -> None:
        self.block_size = block_size
        self.slots = SlotPool(num_slots)
        self.blocks = BlockPool(num_blocks)
        self.snapshots = SnapshotPool(num_snapshots)
        self.prefix_caching = num_snapshots > 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup(self, names: list[bytes], max_tokens: int) -> PrefixHit:
        """The longest cached prefix of at most ``max_tokens`` tokens whose blocks are all cached and whose last
        boundary has a snapshot; ``names`` are the sequence's block names. Takes nothing yet."""
        best = PrefixHit(0)
        if not self.prefix_caching:
            return best
        blocks: list[int] = []
        for i, name in enumerate(names[: max_tokens // self.block_size]):
            block_id = self.blocks.cached.get(name)
            if block_id is None:
                break
            blocks.append(block_id)
            snapshot = self.snapshots.find(name)
            if snapshot is not None:
                best = PrefixHit((i + 1) * self.block_size, list(blocks), snapshot)
        best.matched_tokens = len(blocks) * self.block_size
        return best

    def take(self, hit: PrefixHit) -> None:
        for block_id in hit.blocks:
            self.blocks.take(block_id)
