"""One decode step of lightning attention on a carried state (what serving does per generated token)."""

from __future__ import annotations

import torch
from torch import Tensor


def lightning_attention_step(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Advance the state by one token and read it out.

    Args:
        q, k, v: ``[B, H, D]``, one token per sequence.
        slope: ``[H]`` per-head decay rate.
        state: ``[B, H, D, D]`` state after the previous token; float32 (or float64) whatever ``q``'s dtype.

    Returns:
        ``o`` ``[B, H, D]`` in ``q``'s dtype and the new state, in ``state``'s dtype.
    """
    compute = state.dtype
    decay = torch.exp(-slope.to(compute))[None, :, None, None]  # [1, H, 1, 1]
    k, v = k.to(compute), v.to(compute)
    new_state = torch.baddbmm(
        (decay * state).flatten(0, 1), k.flatten(0, 1).unsqueeze(-1), v.flatten(0, 1).unsqueeze(-2)
    ).view_as(state)
    o = torch.matmul(q.to(compute).unsqueeze(-2), new_state).squeeze(-2)
    return o.to(q.dtype), new_state


def lightning_step_slots(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, pool: Tensor, slots: Tensor) -> Tensor:
    """One decode step for a batch of requests whose states live in a pool of slots, updated in place.

    Args:
        q, k, v: ``[B, H, D]``, one token per request.
        pool: ``[S, H, D, D]`` float32 states. slots: ``[B]`` each request's slot; ``-1`` marks a padding row,
            whose output is zeros and which touches no slot.

    Returns:
        ``o`` ``[B, H, D]``.

    Rows whose slots are consecutive (row ``i + 1`` in slot ``slots[i] + 1``: what a scheduler that hands out
    the lowest free slot and orders its decodes by slot produces) update a view of the pool in place, one
    read and one write of their states; scattered rows are gathered, stepped and written back. Inside a compiled
    graph (no host round trip to find the runs), every row is gathered, stepped and written back, and no row may
    be padding.
    """
    if torch.compiler.is_compiling():
        o, states = lightning_attention_step(q, k, v, slope, pool[slots])
        pool.index_copy_(0, slots, states)
        return o
    o = torch.zeros_like(q)
    ids = slots.tolist()
    runs = _runs(ids)
    if len(runs) > MAX_INPLACE_RUNS:
        valid = slots >= 0
        rows, chosen = valid.nonzero().squeeze(1), slots[valid].long()
        o_rows, states = lightning_attention_step(q[rows], k[rows], v[rows], slope, pool[chosen])
        pool[chosen] = states
        return o.index_copy_(0, rows, o_rows)
    decay = torch.exp(-slope.to(pool.dtype))[None, :, None, None]  # [1, H, 1, 1]
    for row, n in runs:
        state = pool[ids[row] : ids[row] + n]  # [n, H, D, D], a view
        rows = slice(row, row + n)
        k_, v_ = (x[rows].to(pool.dtype).flatten(0, 1) for x in (k, v))  # [n H, D]
        state.mul_(decay).flatten(0, 1).baddbmm_(k_.unsqueeze(-1), v_.unsqueeze(-2))
        o[rows] = torch.matmul(q[rows].to(pool.dtype).unsqueeze(-2), state).squeeze(-2).to(q.dtype)
    return o


# Past this many runs of consecutive slots, one gather/scatter beats a loop of in-place updates.
MAX_INPLACE_RUNS = 4


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """``(first_row, length)`` of each run of rows with consecutive slots, padding rows (``-1``) left out."""
    runs: list[tuple[int, int]] = []
    for row, slot in enumerate(slots):
        if slot < 0:
            continue
        if runs and runs[-1][0] + runs[-1][1] == row and slots[row - 1] == slot - 1:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs
