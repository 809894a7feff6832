"""The lightning-attention token mixer of MiniMax-01."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyla.config import HylaConfig
from hyla.model.cache import Cache
from hyla.model.norm import RMSNorm
from hyla.ops.conv import short_conv
from hyla.ops.lightning import lightning_attention_qkv
from hyla.ops.lightning.decay import lightning_slopes
from hyla.ops.norm import gated_rms_norm_
from hyla.ops.varlen import Varlen

# MiniMax's lightning norm uses its RMSNorm's default epsilon, not the config's rms_norm_eps.
LIGHTNING_NORM_EPS = 1e-6


class LightningAttention(nn.Module):
    """``out_proj(sigmoid(output_gate(x)) * norm(lightning(q, k, v)))`` with ``q, k, v = silu(qkv_proj(x))``
    (with ``config.lightning_qk_conv``, q and k convolved over the last tokens before the SiLU)."""

    def __init__(self, config: HylaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        inner = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * inner, bias=False)
        self.output_gate = nn.Linear(config.hidden_size, inner, bias=False)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.norm = RMSNorm(inner, LIGHTNING_NORM_EPS)
        self.num_layers = config.num_hidden_layers
        # [K, H, 2D] taps over the q and k channels (config.lightning_qk_conv; not MiniMax's): tap 0 the token itself
        taps = config.lightning_qk_conv
        self.qk_conv = nn.Parameter(torch.empty(taps, self.num_heads, 2 * self.head_dim)) if taps else None
        self.register_buffer("slope", torch.empty(self.num_heads), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.slope = lightning_slopes(self.num_heads, self.layer_idx, self.num_layers)

    def forward(self, x: Tensor, cache: Cache | None = None, cu_seqlens: Tensor | Varlen | None = None) -> Tensor:
        """``x`` ``[B, T, hidden]`` -> ``[B, T, hidden]``; with a ``cache``, continues and updates its state.

        ``cu_seqlens`` marks sequences packed along ``T`` (``B = 1``): each starts from a zero state.
        """
        b, t, _ = x.shape
        # In place when no backward will need the projection's output.
        inplace = not torch.is_grad_enabled()
        qkv = self.qkv_proj(x).view(b, t, self.num_heads, 3 * self.head_dim)
        if self.qk_conv is not None:
            qk, v = qkv.split((2 * self.head_dim, self.head_dim), dim=-1)
            qk, taps = qk.reshape(b, t, -1), self.qk_conv.flatten(1)
            qk = short_conv(qk, taps, cu_seqlens) if cache is None else cache.short_conv(self.layer_idx, qk, taps)
            qkv = torch.cat((qk.view(b, t, self.num_heads, -1), v), dim=-1)
        if cache is None:  # the SiLU and the q/k/v split inside the op, which picks its own blocking
            o, _ = lightning_attention_qkv(qkv, self.slope, cu_seqlens=cu_seqlens)
        else:
            q, k, v = F.silu(qkv, inplace=inplace).split(self.head_dim, dim=-1)  # each [B, T, H, D]
            o = cache.lightning(self.layer_idx, q, k, v, self.slope)
        o = o.reshape(b, t, -1)
        if inplace:
            return self.out_proj(gated_rms_norm_(self.output_gate(x), o, self.norm.weight, self.norm.eps))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * self.norm(o))
