"""Matmul-only floors: how fast any eager-PyTorch engine could at best run a model's decode step or training step
on this machine, counting nothing but the weight matrix products that every implementation must do.

A decode step of ``m`` requests multiplies ``m`` hidden vectors by every dense weight (attention projections,
router, LM head) and by the experts the tokens chose (``m * k`` token-expert pairs, spread evenly over the
experts — the best case for the matrix shapes); a training step of ``N`` tokens does the three products of
forward and backward (``x W^T``, ``dy W``, ``dy^T x``) for the same matrices. The script times exactly those
``torch`` products on the model's own (random) weights, stored as the serving engine stores them, median of
``--repeats``; attention scores, norms, routing, sampling and the HTTP layer all come on top. It also measures
the memory read bandwidth (a sum over 512 MB). The results bound the serving and training targets: a target that
needs a step faster than its floor cannot be met by scheduling or by fewer Python operations. For decode steps
it also gives the memory floor: the bytes of the weights the step must read (every dense matrix, the experts its
tokens touch) over that bandwidth, what a perfect kernel would take (float32).

Usage: python benchmarks/roofline.py [--preset small] [--vocab N] [--decode 1 32] [--train-tokens 4096] [--no-append]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import hyla
from hyla.bench import append_result, machine_description, run_times
from hyla.model.linear import transpose_weights
from hyla.ops.linear import can_pack, pack, packed_linear

RESULTS = Path(__file__).with_name("RESULTS.md")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(run_times(fn, repeats)) * 1e3


def matrices(model: hyla.HylaForCausalLM) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every dense weight a token passes through (LM head included, embeddings not), and every layer's
    experts as ``(gate_up [E, 2I, H], down [E, H, I])``."""
    dense = [model.lm_head.weight]
    experts = []
    for layer in model.model.layers:
        dense += [p for p in layer.self_attn.parameters() if p.dim() == 2]
        dense.append(layer.mlp.gate.weight)
        experts.append((layer.mlp.gate_up_proj, layer.mlp.down_proj))
    return dense, experts


def tokens_per_expert(num_tokens: int, top_k: int, num_experts: int) -> list[int]:
    """``num_tokens * top_k`` pairs spread as evenly as they go over the experts (empty experts dropped)."""
    pairs = num_tokens * top_k
    return [n for n in (pairs // num_experts + (e < pairs % num_experts) for e in range(num_experts)) if n]


def decode_step(model: hyla.HylaForCausalLM, m: int) -> Callable[[], None]:
    """The step's products as the serving engine runs them: dense weights packed for oneDNN from two rows on."""
    dense, experts = matrices(model)
    inputs = {w.shape[1]: torch.randn(m, w.shape[1]) for w in dense}
    packed = [pack(w) if m > 1 and can_pack(w) else None for w in dense]
    counts = tokens_per_expert(m, model.config.num_experts_per_tok, model.config.num_experts)
    hidden = torch.randn(max(counts), model.config.hidden_size)
    inner = torch.randn(max(counts), model.config.intermediate_size)

    @torch.inference_mode()
    def step() -> None:
        for w, p in zip(dense, packed, strict=True):
            F.linear(inputs[w.shape[1]], w) if p is None else packed_linear(inputs[w.shape[1]], p)
        for gate_up, down in experts:
            for e, n in enumerate(counts):
                F.linear(hidden[:n], gate_up[e])
                F.linear(inner[:n], down[e])

    return step


def train_step(model: hyla.HylaForCausalLM, num_tokens: int) -> Callable[[], None]:
    dense, experts = matrices(model)
    counts = tokens_per_expert(num_tokens, model.config.num_experts_per_tok, model.config.num_experts)
    pairs = [(w, num_tokens) for w in dense] + [(w[e], n) for ws in experts for w in ws for e, n in enumerate(counts)]
    tensors = [(w.detach(), torch.randn(n, w.shape[1]), torch.randn(n, w.shape[0])) for w, n in pairs]

    def step() -> None:
        for w, x, dy in tensors:
            F.linear(x, w)  # forward
            dy @ w  # input gradient
            dy.t() @ x  # weight gradient

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=None, help="the preset's vocab_size changed to this")
    parser.add_argument("--decode", type=int, nargs="+", default=[1, 32], help="requests per decode step")
    parser.add_argument("--train-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = hyla.preset(args.preset)
    config = config.replace(vocab_size=args.vocab) if args.vocab else config
    model = hyla.HylaForCausalLM(config).eval()

    big = torch.randn(128 * 2**20)  # 512 MB
    bandwidth = big.numel() * 4 / median_ms(big.sum, 5) / 1e6  # GB/s
    del big
    rows = []
    train_ms = median_ms(train_step(model, args.train_tokens), max(args.repeats // 4, 3))
    transpose_weights(model)  # the serving engine's layout
    dense, experts = matrices(model)
    for m in args.decode:
        ms = median_ms(decode_step(model, m), args.repeats)
        touched = min(config.num_experts, m * config.num_experts_per_tok)
        weights = sum(w.numel() for w in dense) + sum(touched * (g[0].numel() + d[0].numel()) for g, d in experts)
        memory_ms = weights * 4 / bandwidth / 1e6
        rows.append(
            (
                f"decode step, {m} request{'s' * (m > 1)}",
                ms,
                m / ms * 1e3,
                f"{memory_ms:.2f} ({m / memory_ms * 1e3:,.0f} tok/s)",
            )
        )
    rows.append((f"training step, {args.train_tokens} tokens (fwd + bwd products)", train_ms,
                 args.train_tokens / train_ms * 1e3, ""))  # fmt: skip

    lines = ["| step | matmul-only time ms | floor-implied max tokens/s | memory floor ms (max tokens/s) |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {ms:.2f} | {rate:,.0f} | {memory} |" for name, ms, rate, memory in rows]
    table = "\n".join(lines)
    header = (f"Machine: {machine_description()}; memory read bandwidth {bandwidth:.1f} GB/s (sum over 512 MB). "
              f"Preset `{args.preset}`{f' with vocab {args.vocab}' if args.vocab else ''} "
              f"({config.num_parameters() / 1e6:.1f}M parameters), float32.")  # fmt: skip
    print(header)
    print(table)
    if not args.no_append:
        vocab = f" --vocab {args.vocab}" if args.vocab else ""
        decode = " ".join(map(str, args.decode))
        command = (f"python benchmarks/roofline.py --preset {args.preset}{vocab} --decode {decode} "
                   f"--train-tokens {args.train_tokens} --repeats {args.repeats}")  # fmt: skip
        append_result(RESULTS, f"Matmul-only floors, {args.preset}, float32", header, command, table)


if __name__ == "__main__":
    main()
