"""The precision computations run in, whatever their inputs' dtype."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed (lightning states kept, losses taken) in float32; float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


# The dtypes a user names on the command line, by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
