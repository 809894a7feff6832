"""What each implementation of lightning attention takes (the dispatcher and the kernels both ask here)."""

from __future__ import annotations

import torch

TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # they compute in float32: float64 goes elsewhere


def fits_triton(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels take this head size and dtype: a dtype of :data:`TRITON_DTYPES` and ``head_dim``
    a multiple of 16 whose padded row (the next power of two) holds at most 512 bytes, so that the backward's tiles
    fit in shared memory — bfloat16/float16 up to 256, float32 up to 128 (an H100's 227 KB; float32 at 256 needs
    ~580 KB)."""
    padded = 1 << (head_dim - 1).bit_length()
    return dtype in TRITON_DTYPES and head_dim % 16 == 0 and padded * dtype.itemsize <= 512
