"""Next-token cross-entropy straight from hidden states, without materialising the ``[N, vocab]`` logits.

The LM head and the loss are fused and taken ``chunk`` rows at a time: each chunk's logits give its loss and,
at once, its gradients with respect to the hidden states and the head's weight, kept for the backward. For a
4096-token batch and a 32768-id vocabulary that replaces two fresh 0.5 GB tensors per step (the logits and their
gradient, page-faulted on every step) with 16 MB pieces. ``F.cross_entropy(hidden @ weight.T, targets)`` is the
reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
CHUNK_BYTES = 16 * 2**20  # per chunk of float32 logits: stays below glibc's largest mmap threshold (32 MB)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, rows with ``-100`` ignored.

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; targets: ``[N]`` ids or ``-100``.
        chunk: rows per piece (default: as many as fit :data:`CHUNK_BYTES` of float32 logits).

    Returns:
        The scalar mean over the counted rows (0 when none is counted), float32 (float64 for float64 inputs).
    """
    chunk = chunk or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(hidden.dtype)
            total = torch.zeros((), dtype=compute, device=hidden.device)
            dh = torch.empty_like(hidden) if want_dh else None
            dw = torch.zeros_like(weight, dtype=compute) if want_dw else None
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start : start + chunk], targets[start : start + chunk]
                logits = (h @ w.t()).to(compute)  # [c, V]
                lse = torch.logsumexp(logits, dim=-1)
                counted = t != IGNORE_INDEX
                safe = t.clamp(min=0)
                picked = logits.gather(1, safe[:, None]).squeeze(1)
                total += ((lse - picked) * counted).sum()
                if want_dh or want_dw:
                    # d(sum of losses)/d logits = softmax - one_hot, zero on ignored rows.
                    grad = logits.sub_(lse[:, None]).exp_()
                    grad[torch.arange(len(t), device=t.device), safe] -= 1
                    grad.mul_(counted[:, None])
                    g = grad.to(hidden.dtype)
                    if want_dh:
                        dh[start : start + chunk] = g @ w
                    if want_dw:
                        dw += (g.t() @ h).to(compute)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        ctx.save_for_backward(dh if want_dh else None, dw if want_dw else None, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad: Tensor):
        dh, dw, count = ctx.saved_tensors
        scale = grad / count
        dh = dh * scale.to(dh.dtype) if dh is not None else None
        dw = (dw * scale).to(ctx.weight_dtype) if dw is not None else None
        return dh, dw, None, None
