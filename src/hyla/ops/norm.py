"""RMS normalisation, and the gated form that ends a lightning-attention layer."""

from __future__ import annotations

import torch
from torch import Tensor


def rms_scale(x: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last dim: ``[..., D]`` -> ``[..., 1]``, in float32 whatever
    ``x``'s dtype (float64 too), as transformers' MiniMax norm computes it.

    One read of ``x`` (``vector_norm``), where ``x.pow(2).mean(-1)`` writes and reads back a squared copy.
    """
    norm = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    return norm.pow(2).div(x.shape[-1]).add(eps).rsqrt()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim; the statistic in float32, as transformers."""
    return weight * (x.float() * rms_scale(x, eps)).to(x.dtype)


def gated_rms_norm_(gate: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``sigmoid(gate) * rms_norm(x, weight, eps)``, written into ``gate`` (``[..., D]`` each), for inference.

    Four passes over ``gate`` in place instead of the seven (and three fresh buffers) of the composed form;
    no autograd through it. Equal to the composed form to rounding (products taken in another order).
    """
    return gate.sigmoid_().mul_(x).mul_(rms_scale(x, eps)).mul_(weight)
