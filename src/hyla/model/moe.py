"""The sparse mixture-of-experts feed-forward block: a linear router and SwiGLU experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hyla.config import HylaConfig
from hyla.ops.moe import COMPILED_GEMV_MAX_TOKENS, load_balancing_stats, route, swiglu_experts


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts; weights are stored stacked, one tensor for all experts."""

    def __init__(self, config: HylaConfig) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(h, e, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # per expert: [gate; up] rows
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        # A decode step's experts through hyla.ops.gemv (one token; in a compiled graph a few): set by
        # prepare_for_cpu_inference.
        self.use_gemv = False

    def forward(self, x: Tensor, router_stats: bool = False) -> tuple[Tensor, Tensor | None]:
        """``x`` ``[B, T, hidden]`` -> (``[B, T, hidden]``, load-balancing stats ``[2, E]`` if ``router_stats``)."""
        flat = x.reshape(-1, x.shape[-1])
        probs, weights, experts = route(self.gate(flat), self.top_k)
        y = self.experts(flat, weights, experts)
        return y.view_as(x), load_balancing_stats(probs, experts) if router_stats else None

    def experts(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """The routed experts' SwiGLU: ``x`` ``[N, hidden]``, ``weights``/``experts`` ``[N, k]`` -> ``[N, hidden]``."""
        path = "gemv" if self.gemv_takes(x) else None
        return swiglu_experts(x, weights, experts, self.gate_up_proj, self.down_proj, path)

    def gemv_takes(self, x: Tensor) -> bool:
        """Whether the experts of ``x`` ``[N, hidden]`` run through :func:`hyla.ops.gemv.experts_gemv`: a block
        prepared for it (``use_gemv``, the weights stored transposed), no gradient, one token (in a compiled graph
        up to :data:`~hyla.ops.moe.COMPILED_GEMV_MAX_TOKENS`; eager, several tokens take the prepared copies)."""
        compiling = torch.compiler.is_compiling()
        most = COMPILED_GEMV_MAX_TOKENS if compiling else 1
        gemv = self.use_gemv and x.shape[0] <= most and (compiling or not torch.is_grad_enabled())
        return gemv and self.gate_up_proj[0].t().is_contiguous() and self.down_proj[0].t().is_contiguous()
