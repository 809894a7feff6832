"""Rotary position embeddings (RoPE), optionally partial: only the first ``rotary_dim`` channels rotate."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_inv_freq(rotary_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """``[rotary_dim / 2]`` inverse frequencies ``theta^(-2i / rotary_dim)``, in float32."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Cosines and sines for integer ``positions`` ``[..., T]``: two ``[..., T, rotary_dim]`` tensors.

    Computed in float32 and then cast, as transformers does, so that logits match it bit for bit in float32.
    """
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by ``cos``/``sin`` ``[B or 1, T, R]`` on its first ``R`` channels.

    Rotation pairs channel ``i`` with ``i + R/2`` ("rotate half"), the convention of transformers' MiniMax.
    """
    r = cos.shape[-1]
    half = r // 2
    x1, x2, rest = x[..., :half], x[..., half:r], x[..., r:]
    c, s = cos[:, :, None, :half], sin[:, :, None, :half]  # the two halves of cos/sin are equal
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)
