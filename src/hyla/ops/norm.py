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


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, composed of tensor ops (autograd derives the
    backward); the statistic in float32, as transformers."""
    return weight * (x.float() * rms_scale(x, eps)).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """:func:`rms_norm_reference` (``[..., D]`` -> ``[..., D]``), with a hand-written backward when one is needed.

    The composed form's backward takes ten passes over ``[..., D]`` tensors (the product rule through each op,
    then ``vector_norm``'s own backward with its zero-norm mask); :class:`_RMSNorm` takes five, and saves the
    normalised input alone instead of both the input and the normalised input. Same forward values.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    """``y = w * xhat`` with ``xhat = x * r``, ``r = (mean(x^2) + eps)^-1/2``; backward
    ``dx = r * (g w - xhat * mean(g w xhat))``, ``dw = sum over rows of g * xhat``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        r = rms_scale(x, eps)
        xhat = (x.float() * r).to(x.dtype)
        ctx.save_for_backward(xhat, r, weight)
        return weight * xhat

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        xhat, r, weight = ctx.saved_tensors
        want_dx, want_dw = ctx.needs_input_grad[:2]
        compute = torch.promote_types(r.dtype, grad.dtype)  # float32, or float64 for float64 inputs
        g, xh = grad.to(compute), xhat.to(compute)
        dx = dw = None
        if want_dx:
            gw = g * weight.to(compute)
            mean = torch.linalg.vecdot(gw, xh).unsqueeze(-1).div_(-xh.shape[-1])
            dx = gw.addcmul_(xh, mean).mul_(r).to(xhat.dtype)
        if want_dw:
            dw = (g * xh).flatten(0, -2).sum(0).to(weight.dtype)
        return dx, dw, None


def gated_rms_norm_(gate: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``sigmoid(gate) * rms_norm(x, weight, eps)``, written into ``gate`` (``[..., D]`` each), for inference.

    Four passes over ``gate`` in place instead of the seven (and three fresh buffers) of the composed form;
    no autograd through it. Equal to the composed form to rounding (products taken in another order).
    """
    return gate.sigmoid_().mul_(x).mul_(rms_scale(x, eps)).mul_(weight)
