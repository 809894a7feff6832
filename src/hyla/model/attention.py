"""Softmax attention (grouped-query, RoPE) of MiniMax's full-attention layers."""

from __future__ import annotations

from torch import Tensor, nn

from hyla.config import HylaConfig
from hyla.model.cache import Cache
from hyla.ops.attention import softmax_attention
from hyla.ops.rope import apply_rope
from hyla.ops.varlen import Varlen


class SoftmaxAttention(nn.Module):
    def __init__(self, config: HylaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: Cache | None = None,
        cu_seqlens: Tensor | Varlen | None = None,
    ) -> Tensor:
        """``x`` ``[B, T, hidden]``, ``rope`` the cos/sin ``[1, T, rotary_dim]`` of its positions."""
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), *rope)
        k = apply_rope(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), *rope)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        # [B, T, H, D]
        o = softmax_attention(q, k, v, cu_seqlens) if cache is None else cache.attention(self.layer_idx, q, k, v)
        return self.o_proj(o.reshape(b, t, -1))
