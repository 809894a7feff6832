"""Softmax attention with grouped-query heads, through ``torch.nn.functional.scaled_dot_product_attention``:
dense (with a cache continuation), varlen (packed documents) and paged (keys and values in a block pool)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hyla.ops.varlen import Varlen, as_varlen


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | Varlen | None = None) -> Tensor:
    """Causal attention of the last ``Tq`` positions over ``Tk >= Tq`` keys (earlier keys: a cache).

    Args:
        q: ``[B, Tq, Hq, D]``; query ``i`` sits at absolute position ``Tk - Tq + i``.
        k, v: ``[B, Tk, Hkv, D]`` with ``Hkv`` dividing ``Hq`` (grouped-query attention).
        cu_seqlens: optional ``[N + 1]`` offsets of sequences packed along ``T`` (``B = 1``, ``Tq = Tk``):
            no query sees a key of another sequence.

    Returns:
        ``[B, Tq, Hq, D]``. Scaling is ``1 / sqrt(D)``.
    """
    tq, tk = q.shape[1], k.shape[1]
    if cu_seqlens is not None:
        if tq != tk:
            raise ValueError("packed sequences (cu_seqlens) cannot continue a cache")
        return _packed(q, k, v, cu_seqlens)
    if tk < tq:
        raise ValueError(f"softmax_attention needs at least as many keys as queries, got {tk} < {tq}")
    if tq == tk:
        return _sdpa(q, k, v, is_causal=True)
    if tq == 1:
        return _sdpa(q, k, v, is_causal=False)
    # Queries are aligned to the end of the keys: query i sees keys 0 .. Tk - Tq + i.
    return _sdpa(q, k, v, is_causal=False, mask=torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, mask: Tensor | None = None) -> Tensor:
    """SDPA on ``[B, T, H, D]`` tensors (it wants ``[B, H, T, D]``), with grouped-query heads."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    return o.transpose(1, 2)


# Packed sequences are padded to a multiple of this many tokens, and those of one padded length run together.
BUCKET = 64


def _packed(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | Varlen) -> Tensor:
    """Packed sequences in length buckets (multi-level padding): each sequence is padded to a multiple of
    :data:`BUCKET` tokens, and each padded length runs as one batch ``[n, P]`` under a plain causal mask — padding
    sits after each sequence's tokens, where causality already hides it.

    At most ``BUCKET - 1`` padding tokens per sequence and one SDPA call per padded length, where padding every
    sequence to the longest costs ``N Lmax^2`` (with one 4k document among 64 short ones, ~40x the work here).
    Measured forward + backward, 8k tokens, float32, same process (`benchmarks/packed_softmax.py` has the
    re-runnable comparison with one call per sequence): 33 documents of 20-512 tokens, 2 x 64 heads: 58 ms, against
    66 with power-of-two buckets, 60 with one call per document and ~95 padded to the longest.
    The buckets are planned once per batch (:class:`~hyla.ops.varlen.Varlen`) and shared by its softmax layers.
    """
    varlen = as_varlen(cu_seqlens, q.shape[1], q.device)
    buckets, inverse = varlen.plan(("softmax buckets", q.device), lambda: _buckets(varlen, q.device))
    if inverse is None:
        return q.new_zeros(q.shape)
    outs = []
    for index, valid in buckets:
        o = _sdpa(q[0][index], k[0][index], v[0][index], is_causal=True)  # [n, P, H, D]
        outs.append(o[valid])
    return torch.cat(outs).index_select(0, inverse)[None]


def _buckets(varlen: Varlen, device: torch.device) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
    """Per padded length: the packed index of each ``[n, P]`` slot (padding repeats a real token) and which slots
    are real; and the permutation that puts the buckets' real rows back in packed order."""
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(varlen.lengths):
        if length:
            groups.setdefault(-(-length // BUCKET) * BUCKET, []).append(i)
    cu_seqlens = varlen.cu_seqlens.to(device)
    buckets, positions = [], []
    for pad, seqs in sorted(groups.items()):
        seqs = torch.tensor(seqs, device=device)
        starts, ends = cu_seqlens[seqs, None], cu_seqlens[seqs + 1, None]
        index = starts + torch.arange(pad, device=device)  # [n, P]
        valid = index < ends
        index = torch.where(valid, index, starts)
        buckets.append((index, valid))
        positions.append(index[valid])
    if not buckets:
        return [], None
    order = torch.cat(positions)  # the packed position of each row of the buckets' outputs
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=device)
    return buckets, inverse


def paged_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor, context_lens: Tensor, query_lens: Tensor
) -> Tensor:
    """Causal attention of ``N`` sequences over keys and values kept in a paged block pool.

    Args:
        q: ``[N, Tq, Hq, D]``: sequence ``i``'s ``query_lens[i]`` newest tokens, padded to ``Tq``.
        k_pool, v_pool: ``[num_blocks, block_size, Hkv, D]``; sequence ``i``'s token at position ``p`` lives in
            block ``block_tables[i, p // block_size]`` at offset ``p % block_size``.
        block_tables: ``[N, max_blocks]`` int block ids (entries past a sequence's blocks are ignored).
        context_lens: ``[N]`` keys of each sequence, its new tokens included (``>= 1``).
        query_lens: ``[N]`` queries of each sequence, ``1 <= query_lens[i] <= min(Tq, context_lens[i])``; query
            ``j`` sits at position ``context_lens[i] - query_lens[i] + j``.

    Returns:
        ``[N, Tq, Hq, D]``; rows past a sequence's ``query_lens`` hold finite values to be ignored.
    """
    tq = q.shape[1]
    keys = k_pool[block_tables].flatten(1, 2)  # [N, max_blocks * block_size, Hkv, D]
    values = v_pool[block_tables].flatten(1, 2)
    key_pos = torch.arange(keys.shape[1], device=q.device)
    query_pos = context_lens[:, None] - query_lens[:, None] + torch.arange(tq, device=q.device)
    # Padding queries take the last real position, so that no row of the mask is empty.
    query_pos = torch.minimum(query_pos, context_lens[:, None] - 1)  # [N, Tq]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [N, Tq, L]
    return _sdpa(q, keys, values, is_causal=False, mask=mask[:, None])
