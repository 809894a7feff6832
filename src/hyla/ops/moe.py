"""Mixture of experts as functions: top-k routing, batched dispatch to SwiGLU experts, load-balancing stats.

Dispatch sorts the ``N * k`` (token, expert) pairs by expert so that each expert's tokens are one
contiguous slice; every expert then runs as one matrix product over its slice: one ``torch._grouped_mm`` on CUDA
and for the CPU's small inference batches (a decode step: 15-30% faster from 4 to 512 tokens, measured), a loop
over experts for the CPU's large or training batches (~3x faster than the grouped kernel at prefill sizes).
The CPU's decode steps of one token skip the dispatch: each (token, expert) pair runs its two products
directly (``pairs``; the sorting and gathering cost more than the products there). Inside a compiled graph
(the serving engine's captured decode step) there is no host round trip and no ``_grouped_mm`` (which the
compiler does not take): a few tokens' pairs index their expert matrices by the routed ids and multiply them as a
batch (``gather``, inductor fuses the indexing into its products); more tokens run every expert on every token
and weight the outputs by the router, zero for experts not chosen (``dense``: each expert's weights read once).
Otherwise there is never a loop over tokens. The loop has a hand-written backward (:class:`_SwiGLUExperts`);
under autocast, which must cast each product, it is composed of autograd ops instead. The serving engine's eager
CPU steps of two tokens and more take :func:`prepared_swiglu_experts` instead: the same dispatch, each expert's
products on oneDNN-packed (or int8) copies of its matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hyla.ops.gemv import experts_gemv
from hyla.ops.linear import Int8Weight, int8_linear, pack, packed_linear, q8_max_rows, quantize_int8


def route(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax router, top-k, renormalised over the chosen k (MiniMax / Mixtral).

    Args:
        router_logits: ``[N, E]``.

    Returns:
        ``probs`` ``[N, E]`` (float32), ``weights`` ``[N, k]`` (float32, rows sum to 1), ``experts`` ``[N, k]``.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


CPU_GROUPED_MAX_TOKENS = 512
# On the CPU, up to this many tokens run their experts as (token, expert) pairs instead of the grouped kernel,
# which wins from two tokens on (measured on `small`: RESULTS.md, "Same-process A/B measurements behind code
# comments").
CPU_PAIRS_MAX_TOKENS = 1
PATHS = ("loop", "grouped", "pairs", "gemv", "gather", "dense")
# Inside a compiled graph, up to this many tokens index their experts' weights (``k`` matrices read per token);
# more run every expert once (``E`` matrices): the crossover measured on `small`, 8 experts top-2 (RESULTS.md,
# "Same-process A/B measurements behind the compiled decode step"): 4 gathered tokens read as many as dense.
COMPILED_GATHER_MAX_TOKENS = 3
# Inside a compiled graph of a model prepared for CPU inference (``SparseMoE.use_gemv``), up to this many tokens
# (a verify step's last token and drafts, a decode step of a few requests) run their experts through one call of
# :func:`hyla.ops.gemv.experts_gemv`, which reads each chosen expert once for all of them (RESULTS.md, "Reading:
# speculation on a trained `small`": faster up to 16 tokens than the graph's products on `small` and the packed
# copies on `medium`).
COMPILED_GEMV_MAX_TOKENS = 16


def swiglu_experts(
    x: Tensor,
    weights: Tensor,
    experts: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    path: str | None = None,
) -> Tensor:
    """Run each token through its chosen SwiGLU experts and sum the outputs by router weight.

    Args:
        x: ``[N, H]`` tokens.
        weights: ``[N, k]`` router weights; experts: ``[N, k]`` expert ids.
        gate_up_proj: ``[E, 2I, H]`` (gate rows first, then up rows); down_proj: ``[E, H, I]``.
        path: ``"grouped"``: one ``torch._grouped_mm`` for all experts (default on CUDA, and on the CPU without
            autograd for at most :data:`CPU_GROUPED_MAX_TOKENS` tokens); ``"pairs"``: each (token, expert) pair on
            its own (default on the CPU without autograd for at most :data:`CPU_PAIRS_MAX_TOKENS` tokens);
            ``"gather"``: each pair's expert weights indexed and multiplied as a batch (the default inside
            ``torch.compile`` for up to :data:`COMPILED_GATHER_MAX_TOKENS` tokens: it reads ``k`` matrices per
            token); ``"dense"``: every expert on every token (the default inside ``torch.compile`` for more:
            ``E / k`` times the products);
            ``"loop"``: a loop over experts (the CPU's default otherwise); ``"gemv"``: all tokens' experts in one
            call of :func:`hyla.ops.gemv.experts_gemv`, each chosen expert read once (transposed float32 expert
            weights, inference only: what a ``SparseMoE`` prepared for it asks for one token, and inside
            ``torch.compile`` for up to :data:`COMPILED_GEMV_MAX_TOKENS`; one opaque operation there).

    Returns:
        ``[N, H]`` in ``x``'s dtype.
    """
    if path is None:
        cpu_inference = not x.is_cuda and not torch.is_grad_enabled()
        if torch.compiler.is_compiling():
            path = "gather" if x.shape[0] <= COMPILED_GATHER_MAX_TOKENS else "dense"
        elif cpu_inference and x.shape[0] <= CPU_PAIRS_MAX_TOKENS:
            path = "pairs"
        elif x.dtype != torch.float64 and (x.is_cuda or (cpu_inference and x.shape[0] <= CPU_GROUPED_MAX_TOKENS)):
            path = "grouped"  # (the grouped kernel has no float64)
        else:
            path = "loop"
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "gemv":
        return experts_gemv(x, weights, experts, gate_up_proj, down_proj)
    if path == "pairs":
        return _pairs(x, weights, experts, gate_up_proj, down_proj)
    if path == "gather":
        return _gathered(x, weights, experts, gate_up_proj, down_proj)
    if path == "dense":
        return _dense(x, weights, experts, gate_up_proj, down_proj)
    grouped = path == "grouped"
    if not grouped and not torch.is_autocast_enabled(x.device.type):
        return _SwiGLUExperts.apply(x, weights, experts, gate_up_proj, down_proj)
    dispatch = _Dispatch(experts, gate_up_proj.shape[0])
    xs = x.index_select(0, dispatch.token)  # [N * k, H]
    if grouped:
        offsets = torch.cumsum(dispatch.counts, 0).to(torch.int32)
        gate, up = torch._grouped_mm(xs, gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offsets)
    else:  # the loop over experts composed of autograd ops: under autocast, which casts each product
        ys = torch.cat(
            [
                F.linear(F.silu(g) * u, down_proj[e])
                for e, (lo, hi) in dispatch.segments()
                for g, u in [F.linear(xs[lo:hi], gate_up_proj[e]).chunk(2, dim=-1)]
            ]
            or [xs[:0]]
        )
    # The k outputs are weighted and summed in x's dtype (float32 under bfloat16 autocast), as index_add_ did.
    return dispatch.combine(ys.to(x.dtype), weights.to(x.dtype))


def _pairs(x: Tensor, weights: Tensor, experts: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """Each (token, expert) pair's SwiGLU, added to its token's output by router weight: no sorting, gathering or
    scattering (for a single token, where that bookkeeping costs more than the products)."""
    inter = down_proj.shape[-1]
    out = torch.zeros_like(x)
    for n, row in enumerate(experts.tolist()):  # on the CPU, .tolist() waits for nothing
        for j, e in enumerate(row):
            gate_up = torch.mm(x[n : n + 1], gate_up_proj[e].t())  # [1, 2I]
            y = torch.mm(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], down_proj[e].t())  # [1, H]
            out[n : n + 1] += y * weights[n, j].to(y.dtype)
    return out


def _gathered(x: Tensor, weights: Tensor, experts: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """Each (token, expert) pair's SwiGLU as batched matrix-vector products on its expert's indexed weights,
    summed by router weight: ``[N, H]`` -> ``[N, H]``, composed of autograd ops."""
    inter, top_k = down_proj.shape[-1], experts.shape[1]
    chosen = experts.reshape(-1)  # [N k]
    xs = x.repeat_interleave(top_k, dim=0)[:, :, None]  # [N k, H, 1]
    gate_up = torch.bmm(gate_up_proj[chosen], xs)[..., 0]  # [N k, 2I]
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    ys = torch.bmm(down_proj[chosen], act[:, :, None])[..., 0].view(*experts.shape, -1)  # [N, k, H]
    return torch.linalg.vecdot(ys, weights.to(ys.dtype)[..., None], dim=1)


def _dense(x: Tensor, weights: Tensor, experts: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """Every expert's SwiGLU on every token, summed by router weight (zero for the experts a token did not
    choose: exact, the outputs being finite): ``[N, H]`` -> ``[N, H]``, composed of autograd ops."""
    inter, num_experts = down_proj.shape[-1], gate_up_proj.shape[0]
    gate_up = torch.bmm(x.expand(num_experts, *x.shape), gate_up_proj.transpose(1, 2))  # [E, N, 2I]
    ys = torch.bmm(F.silu(gate_up[..., :inter]) * gate_up[..., inter:], down_proj.transpose(1, 2))  # [E, N, H]
    dense_weights = x.new_zeros(x.shape[0], num_experts).scatter(1, experts, weights.to(x.dtype))  # [N, E]
    return torch.einsum("enh,ne->nh", ys, dense_weights)


EXPERT_COPIES = ("packed", "int8")


def prepare_experts(gate_up_proj: Tensor, down_proj: Tensor, kind: str) -> list[tuple[object, object]]:
    """Each expert's two matrices prepared for the CPU's products: ``kind="packed"`` reordered for oneDNN
    (:func:`~hyla.ops.linear.pack`, float32: the same values), ``"int8"`` as int8 with one scale per output row
    (:func:`~hyla.ops.linear.quantize_int8`). ``[(gate_up [2I, H], down [H, I])]``, one pair per expert, for
    :func:`prepared_swiglu_experts`."""
    if kind not in EXPERT_COPIES:
        raise ValueError(f"kind must be one of {EXPERT_COPIES}, got {kind!r}")
    make = pack if kind == "packed" else quantize_int8
    return [(make(gu), make(d)) for gu, d in zip(gate_up_proj, down_proj, strict=True)]


def prepared_swiglu_experts(
    x: Tensor, weights: Tensor, experts: Tensor, copies: Sequence[tuple[object, object]], kind: str
) -> Tensor:
    """:func:`swiglu_experts` through prepared copies of the experts (``copies = prepare_experts(..., kind)``):
    each chosen expert's two products once over its tokens (one token: each of its pairs directly). ``"packed"``:
    float32, the float products up to summation order, 1.1-1.8x faster than the grouped kernel from 2 to 512
    tokens on `small` (``benchmarks/experts.py``, RESULTS.md); ``"int8"``: each product through
    :func:`~hyla.ops.linear.int8_linear` (the serving engine's modules send a decode step's tokens to
    :func:`~hyla.ops.gemv.experts_q8` instead: the same products, every expert in one call).
    ``x`` ``[N, H]``, ``weights``/``experts`` ``[N, k]`` -> ``[N, H]`` float32. Inference only."""
    product = packed_linear if kind == "packed" else int8_linear

    def swiglu(rows: Tensor, gate_up: object, down: object) -> Tensor:
        gate, up = product(rows, gate_up).chunk(2, dim=-1)
        return product(F.silu(gate) * up, down)

    x = x.float()
    if x.shape[0] == 1:  # one token: no sorting or gathering, as the float ``pairs`` path
        chosen = [copies[e] for e in experts[0].tolist()]
        out = torch.zeros_like(x)
        for j, pair in enumerate(chosen):
            out.add_(swiglu(x, *pair), alpha=weights[0, j].item())
        return out
    dispatch = _Dispatch(experts, len(copies))
    xs = x.index_select(0, dispatch.token)
    ys = torch.cat([swiglu(xs[lo:hi], *copies[e]) for e, (lo, hi) in dispatch.segments()] or [xs[:0]])
    return dispatch.combine(ys, weights.float())


class Q8Experts(NamedTuple):
    """Every expert's ``(q8 layout, scales)`` of its gate/up and of its down weight, as
    :func:`~hyla.ops.gemv.experts_q8` takes them, and the most tokens one call takes (:func:`q8_max_rows`)."""

    gate_up: list[tuple[Tensor, Tensor]]
    down: list[tuple[Tensor, Tensor]]
    max_rows: int


def q8_experts(copies: Sequence[tuple[Int8Weight, Int8Weight]]) -> Q8Experts | None:
    """What :func:`~hyla.ops.gemv.experts_q8` reads of ``prepare_experts(..., "int8")``'s copies; None where no
    token's products go to the q8 kernel (:func:`~hyla.ops.linear.q8_max_rows` 0; a bias)."""
    max_rows = min(q8_max_rows(w.layout.numel()) for pair in copies for w in pair)
    if max_rows == 0 or any(w.bias is not None for pair in copies for w in pair):
        return None
    gate_up, down = ([(w.layout, w.scale) for w in ws] for ws in zip(*copies, strict=True))
    return Q8Experts(gate_up, down, max_rows)


class _Dispatch:
    """Where each of the ``N * k`` (token, expert) pairs goes: sorted by expert, each expert one slice.

    ``token`` ``[N * k]``: the token of each sorted pair; ``slot`` ``[N * k]``: for each pair in token-major order
    (``n * k + j``), its row in the sorted order; ``counts`` ``[E]``: pairs per expert.
    """

    def __init__(self, experts: Tensor, num_experts: int) -> None:
        flat = experts.reshape(-1)
        self.top_k = experts.shape[1]
        self.order = torch.argsort(flat, stable=True)  # [N * k], grouped by expert
        self.token = self.order // self.top_k
        self.slot = torch.empty_like(self.order)
        self.slot[self.order] = torch.arange(len(self.order), device=flat.device)
        self.counts = torch.bincount(flat, minlength=num_experts)

    def segments(self) -> list[tuple[int, tuple[int, int]]]:
        """``(expert, (lo, hi))`` for each expert with pairs: its rows ``lo:hi`` of the sorted order."""
        ends = torch.cumsum(self.counts, 0).tolist()
        return [(e, (end - n, end)) for e, (n, end) in enumerate(zip(self.counts.tolist(), ends, strict=True)) if n]

    def combine(self, ys: Tensor, weights: Tensor) -> Tensor:
        """``out[n] = sum_j weights[n, j] * ys[slot[n * k + j]]``: ``ys`` ``[N * k, H]`` sorted -> ``[N, H]``."""
        per_token = ys.index_select(0, self.slot).view(-1, self.top_k, ys.shape[-1])  # [N, k, H]
        out = per_token[:, 0] * weights[:, :1]
        for j in range(1, self.top_k):
            out = out.addcmul(per_token[:, j], weights[:, j : j + 1])
        return out


class _SwiGLUExperts(torch.autograd.Function):
    """The loop over experts with a hand-written backward (the CPU's training path).

    Each expert's products write straight into slices of shared buffers, and the backward runs the same loop:
    no concatenation of the experts' outputs or of the gate/up gradients, no full-size zero gradient per
    expert slice of the stacked weights, no scatter (pairs are gathered back to their tokens, ``k`` per token).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, experts: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
        inter = down_proj.shape[-1]
        dispatch = _Dispatch(experts, gate_up_proj.shape[0])
        segments = dispatch.segments()
        xs = x.index_select(0, dispatch.token)  # [M, H], M = N * k
        gate_up = xs.new_empty(xs.shape[0], 2 * inter)
        silu = xs.new_empty(xs.shape[0], inter)
        act = xs.new_empty(xs.shape[0], inter)
        ys = torch.empty_like(xs)
        for e, (lo, hi) in segments:
            gu = torch.mm(xs[lo:hi], gate_up_proj[e].t(), out=gate_up[lo:hi])
            torch.mul(torch.ops.aten.silu.out(gu[:, :inter], out=silu[lo:hi]), gu[:, inter:], out=act[lo:hi])
            torch.mm(act[lo:hi], down_proj[e].t(), out=ys[lo:hi])
        ctx.dispatch, ctx.segments = dispatch, segments
        ctx.save_for_backward(xs, gate_up, silu, act, ys, weights, gate_up_proj, down_proj)
        return dispatch.combine(ys, weights.to(ys.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        xs, gate_up, silu, act, ys, weights, gate_up_proj, down_proj = ctx.saved_tensors
        dispatch: _Dispatch = ctx.dispatch
        inter = down_proj.shape[-1]
        want_dx, want_dw, _, want_dgu, want_ddown = ctx.needs_input_grad
        grad_pairs = grad.index_select(0, dispatch.token)  # [M, H]: each pair's output gradient
        dweights = None
        if want_dw:  # d out / d weights[n, j] = ys[slot[n * k + j]]
            dot = torch.linalg.vecdot(grad_pairs, ys)
            dweights = dot.index_select(0, dispatch.slot).view_as(weights).to(weights.dtype)
        dys = grad_pairs.mul_(weights.reshape(-1).index_select(0, dispatch.order)[:, None].to(grad.dtype))
        dxs = torch.empty_like(xs) if want_dx else None
        dgu = torch.zeros_like(gate_up_proj) if want_dgu else None
        ddown = torch.zeros_like(down_proj) if want_ddown else None
        dgate_up = torch.empty_like(gate_up)
        for e, (lo, hi) in ctx.segments:
            if want_ddown:
                torch.mm(dys[lo:hi].t(), act[lo:hi], out=ddown[e])
            dact = dys[lo:hi] @ down_proj[e]  # [n, I]
            gate, up = gate_up[lo:hi, :inter], gate_up[lo:hi, inter:]
            torch.mul(dact, silu[lo:hi], out=dgate_up[lo:hi, inter:])
            torch.ops.aten.silu_backward.grad_input(dact.mul_(up), gate, grad_input=dgate_up[lo:hi, :inter])
            if want_dgu:
                torch.mm(dgate_up[lo:hi].t(), xs[lo:hi], out=dgu[e])
            if want_dx:
                torch.mm(dgate_up[lo:hi], gate_up_proj[e], out=dxs[lo:hi])
        dx = None
        if want_dx:  # each token's k pair gradients summed
            dx = dxs.index_select(0, dispatch.slot).view(-1, dispatch.top_k, xs.shape[-1]).sum(1)
        return dx, dweights, None, dgu, ddown


def load_balancing_stats(probs: Tensor, experts: Tensor) -> Tensor:
    """Per-expert sums for the load-balancing loss of one layer: ``[2, E]`` float32.

    Row 0 counts the (token, expert) assignments per expert, row 1 sums the router probability per expert;
    :func:`load_balancing_loss` turns the sums of one or many layers into the loss.
    """
    num_experts = probs.shape[-1]
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).float()
    return torch.stack((counts, probs.float().sum(0)))


def load_balancing_loss(stats: Tensor, num_tokens: int) -> Tensor:
    """GShard / Switch load-balancing loss ``E * sum_e f_e P_e`` from summed :func:`load_balancing_stats`.

    ``f_e`` is the fraction of tokens sent to expert ``e`` (summing to k over experts) and ``P_e`` the mean
    router probability; ``num_tokens`` is the number of rows that went into the sums (tokens x layers). Summing
    the layers' stats before the product is what transformers' Mixtral and MiniMax do, so the value matches.
    """
    f, p = stats / num_tokens
    return (f * p).sum() * stats.shape[-1]
