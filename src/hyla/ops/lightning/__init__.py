"""Lightning attention: causal linear attention with a per-head exponential decay.

One public entry point, :func:`lightning_attention` (and :func:`lightning_attention_qkv` for MiniMax's activated
q/k/v projection), picks the implementation:

- ``naive.py``: the token-by-token recurrence, the reference;
- ``chunk.py``: blockwise, ``O(T C D + T D^2)``, vectorised over blocks and heads (prefill, training);
- ``recurrent.py``: one decode step on a carried state, and the state after a run of tokens (closed form);
- ``triton.py``: GPU kernels (forward, backward, varlen, slot decode), used on CUDA.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from hyla.ops.lightning.chunk import lightning_attention_chunk, lightning_attention_chunk_qkv
from hyla.ops.lightning.limits import fits_triton
from hyla.ops.lightning.naive import lightning_attention_naive
from hyla.ops.lightning.recurrent import lightning_attention_step, lightning_state, lightning_step_slots
from hyla.ops.precision import compute_dtype
from hyla.ops.varlen import Varlen

# The blockwise path's block length (its result does not depend on it beyond rounding): 64 does ~2x less work
# than MiniMax's 256 for head_dim 64 on a CPU (intra-block cost grows with the block length). The Triton kernels
# pick their own chunk lengths.
CPU_BLOCK_SIZE = 64

__all__ = [
    "fits_triton",
    "lightning_attention",
    "lightning_attention_chunk",
    "lightning_attention_naive",
    "lightning_attention_qkv",
    "lightning_attention_step",
    "lightning_decode",
    "lightning_state",
]


def lightning_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slope: Tensor,
    initial_state: Tensor | None = None,
    block_size: int = CPU_BLOCK_SIZE,
    cu_seqlens: Tensor | Varlen | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal lightning attention over ``[B, T, H, D]`` inputs; returns ``(o [B, T, H, D], state [B, H, D, D])``.

    With ``cu_seqlens`` (``[N + 1]`` offsets), ``B = 1`` holds ``N`` packed sequences, each starting from its
    own initial state (``[N, H, D, D]``, zeros if omitted), and the final states are ``[N, H, D, D]``.
    On CUDA, the Triton kernels; elsewhere, a single token continuing a state takes the recurrent step and
    anything longer the blockwise path.
    The state is float32 (float64 for float64 inputs) whatever the inputs' dtype.
    """
    route = _route(q, q.shape[-1], initial_state, cu_seqlens)
    if route == "triton":
        from hyla.ops.lightning.triton import lightning_attention_triton

        return lightning_attention_triton(q, k, v, slope, initial_state, cu_seqlens)
    if route == "step":
        o, state = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], slope, initial_state.to(compute_dtype(q.dtype)))
        return o[:, None], state
    return lightning_attention_chunk(q, k, v, slope, initial_state, block_size, cu_seqlens)


def _route(x: Tensor, head_dim: int, initial_state: Tensor | None, cu_seqlens: Tensor | Varlen | None) -> str:
    """The implementation that takes a call on ``x`` ``[B, T, ...]``: ``"triton"`` on CUDA for more than one token
    (head sizes and dtypes it takes), ``"step"`` for a single token continuing a state, else ``"chunk"``."""
    if x.is_cuda and x.shape[1] > 1 and fits_triton(head_dim, x.dtype):
        return "triton"
    if x.shape[1] == 1 and initial_state is not None and cu_seqlens is None:
        return "step"
    return "chunk"


def lightning_attention_qkv(
    qkv: Tensor,
    slope: Tensor,
    initial_state: Tensor | None = None,
    block_size: int = CPU_BLOCK_SIZE,
    cu_seqlens: Tensor | Varlen | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`lightning_attention` on ``q, k, v = silu(qkv).split(D, dim=-1)``, ``qkv`` ``[B, T, H, 3D]`` being
    the pre-activation of MiniMax's q/k/v projection.

    On the blockwise path the activation and the split happen inside the blockwise kernel, group by group
    (:func:`~hyla.ops.lightning.chunk.lightning_attention_chunk_qkv`): one activation pass, one ``[B, T, H, 3D]``
    copy and one concatenation in the backward fewer, and a third of the layer's attention inputs kept for the
    backward. Where :func:`lightning_attention` takes another path (Triton, the one-token step), they run first.
    """
    if _route(qkv, qkv.shape[-1] // 3, initial_state, cu_seqlens) != "chunk":
        q, k, v = F.silu(qkv).split(qkv.shape[-1] // 3, dim=-1)
        return lightning_attention(q, k, v, slope, initial_state, block_size, cu_seqlens)
    return lightning_attention_chunk_qkv(qkv, slope, initial_state, block_size, cu_seqlens)


def lightning_decode(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, pool: Tensor, slots: Tensor) -> Tensor:
    """One decode token for each of ``B`` requests, their states in ``pool[slots]`` (``-1``: a padding row),
    updated in place: the Triton kernel on CUDA, the torch step elsewhere. ``q, k, v`` ``[B, H, D]`` ->
    ``o`` ``[B, H, D]``; ``pool`` ``[S, H, D, D]`` float32."""
    if q.is_cuda and fits_triton(q.shape[-1], q.dtype):
        from hyla.ops.lightning.triton import lightning_decode_slots

        return lightning_decode_slots(q, k, v, slope, pool, slots)
    return lightning_step_slots(q, k, v, slope, pool, slots)
