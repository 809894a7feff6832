"""Lightning attention's carried state: one decode step (what serving does per generated token), and the state
after a run of tokens in closed form (where serving needs a state inside a step's tokens)."""

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


def lightning_state(k: Tensor, v: Tensor, slope: Tensor, init: Tensor, segments: list[tuple[int, int]]) -> Tensor:
    """The state after each of ``N`` runs of packed tokens, without their outputs: the recurrence in closed form,
    ``S = exp(-s n) S_0 + sum_j exp(-s (n - 1 - j)) k_j^T v_j``, one batched product for all runs.

    Args:
        k, v: ``[ΣT, H, D]`` packed tokens.
        slope: ``[H]`` per-head decay rate.
        init: ``[N, H, D, D]`` the state before each run (float32, or float64).
        segments: ``N`` runs ``(first row, length)`` of ``k``/``v``; lengths may be 0 (the state passes through).

    Returns:
        ``[N, H, D, D]`` in ``init``'s dtype.
    """
    dtype, device = init.dtype, init.device
    longest = max((n for _, n in segments), default=0)
    starts = torch.tensor([s for s, _ in segments], dtype=torch.long, device=device)[:, None]
    lengths = torch.tensor([n for _, n in segments], dtype=torch.long, device=device)[:, None]
    offsets = torch.arange(longest, device=device)[None]  # [1, L]
    rows = starts + torch.minimum(offsets, (lengths - 1).clamp(min=0))  # [N, L]; padding repeats a real row
    age = (lengths - 1 - offsets).clamp(min=0)  # [N, L] tokens after each one in its run
    s = slope.to(dtype)
    weight = torch.exp(-s * age[..., None]) * (offsets < lengths)[..., None]  # [N, L, H], zero for padding
    kw = (k[rows].to(dtype) * weight[..., None]).permute(0, 2, 3, 1)  # [N, H, D, L]
    kv = torch.matmul(kw, v[rows].to(dtype).transpose(1, 2))  # [N, H, D, D]
    return torch.exp(-s * lengths)[..., None, None] * init + kv


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
