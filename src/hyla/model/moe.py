"""The sparse mixture-of-experts feed-forward block: a linear router and SwiGLU experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hyla.config import HylaConfig
from hyla.ops.moe import load_balancing_stats, route, swiglu_experts


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts; weights are stored stacked, one tensor for all experts."""

    def __init__(self, config: HylaConfig) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(h, e, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # per expert: [gate; up] rows
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: Tensor, router_stats: bool = False) -> tuple[Tensor, Tensor | None]:
        """``x`` ``[B, T, hidden]`` -> (``[B, T, hidden]``, load-balancing stats ``[2, E]`` if ``router_stats``)."""
        flat = x.reshape(-1, x.shape[-1])
        probs, weights, experts = route(self.gate(flat), self.top_k)
        y = self.experts(flat, weights, experts)
        return y.view_as(x), load_balancing_stats(probs, experts) if router_stats else None

    def experts(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """The routed experts' SwiGLU: ``x`` ``[N, hidden]``, ``weights``/``experts`` ``[N, k]`` -> ``[N, hidden]``."""
        return swiglu_experts(x, weights, experts, self.gate_up_proj, self.down_proj)
