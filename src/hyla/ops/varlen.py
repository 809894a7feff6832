"""Packed (varlen) batches: ``N`` sequences along one axis, delimited by ``cu_seqlens`` offsets."""

from __future__ import annotations

import itertools

from torch import Tensor


def sequence_lengths(cu_seqlens: Tensor, total: int) -> list[int]:
    """The ``N`` lengths of ``[N + 1]`` offsets ``0 = c_0 <= c_1 <= ... <= c_N = total``; a ``ValueError`` naming
    the offsets otherwise."""
    offsets = cu_seqlens.tolist()
    lengths = [hi - lo for lo, hi in itertools.pairwise(offsets)]
    if not offsets or offsets[0] != 0 or offsets[-1] != total or min(lengths, default=0) < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {offsets}")
    return lengths
