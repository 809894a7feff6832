"""Packed (varlen) batches: ``N`` sequences along one axis, delimited by ``cu_seqlens`` offsets.

A :class:`Varlen` is built once per batch (the model's forward, a serving step) and handed to every layer: the
offsets are checked and copied to the host once, and each op keeps the plan it derives from them (block
tables, length buckets) in it, so that the next layer reuses it instead of planning again — as
flash-linear-attention passes ``cu_seqlens_cpu`` and chunk indices, or vLLM its attention metadata.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def sequence_lengths(cu_seqlens: Tensor, total: int) -> list[int]:
    """The ``N`` lengths of ``[N + 1]`` offsets ``0 = c_0 <= c_1 <= ... <= c_N = total``; a ``ValueError`` naming
    the offsets otherwise."""
    offsets = cu_seqlens.tolist()
    lengths = [hi - lo for lo, hi in itertools.pairwise(offsets)]
    if not offsets or offsets[0] != 0 or offsets[-1] != total or min(lengths, default=0) < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {offsets}")
    return lengths


class Varlen:
    """``N`` packed sequences of ``total`` tokens: ``cu_seqlens`` ``[N + 1]`` on the data's device, ``lengths`` on
    the host, and the plans ops made from them."""

    def __init__(self, cu_seqlens: Tensor, total: int, device: torch.device | str | None = None) -> None:
        self.lengths = sequence_lengths(cu_seqlens, total)  # the one host copy
        self.total = total
        self.cu_seqlens = cu_seqlens.to(device or cu_seqlens.device)
        self.cu_seqlens_cpu = torch.tensor([0, *itertools.accumulate(self.lengths)])
        self._plans: dict[Any, Any] = {}

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str) -> Varlen:
        """From lengths known on the host (no copy back from the device)."""
        return cls(torch.tensor([0, *itertools.accumulate(lengths)]), sum(lengths), device)

    def plan(self, key: Any, build: Callable[[], Any]) -> Any:
        """The plan named ``key``, built by ``build()`` the first time an op asks for it."""
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]


def as_varlen(cu_seqlens: Tensor | Varlen, total: int, device: torch.device) -> Varlen:
    """A :class:`Varlen` as given (checked against ``total``), or one built from raw offsets."""
    if isinstance(cu_seqlens, Varlen):
        if cu_seqlens.total != total:
            raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {cu_seqlens.lengths}")
        return cu_seqlens
    return Varlen(cu_seqlens, total, device)
