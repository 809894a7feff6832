"""Packed batches through the lightning kernel: many short sequences vs one long one, the same token count.

A serving step or a continuation batch packs many sequences, each with its own initial state, into one
``[1, ΣT, H, D]`` call (``cu_seqlens``); training packs documents the same way. This times
``lightning_attention`` on such batches — forward without gradients, and forward + backward — for N sequences
of L tokens each (every sequence with a random initial state), best of ``--repeats`` after a warm-up.

Usage: python benchmarks/packed.py [--device cpu] [--heads 8] [--head-dim 64] [--repeats 3] [--no-append]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hyla.bench import append_result, machine_description, run_times
from hyla.ops.lightning import lightning_attention
from hyla.runtime import tune_malloc

RESULTS = Path(__file__).with_name("RESULTS.md")
SHAPES = ((2048, 4), (256, 32), (64, 128), (16, 512), (1, 8192))


def time_shape(num: int, length: int, heads: int, head_dim: int, device: str, repeats: int) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) for ``num`` packed sequences of ``length`` tokens."""
    slope = 2.0 ** (-8 * (torch.arange(heads, device=device) + 1) / heads)
    q, k, v = (torch.randn(1, num * length, heads, head_dim, device=device, requires_grad=True) for _ in range(3))
    init = torch.randn(num, heads, head_dim, head_dim, device=device)
    cu_seqlens = torch.arange(num + 1) * length

    def forward() -> None:
        with torch.no_grad():
            lightning_attention(q, k, v, slope, init, cu_seqlens=cu_seqlens)

    def forward_backward() -> None:
        o, final = lightning_attention(q, k, v, slope, init, cu_seqlens=cu_seqlens)
        (o.sum() + final.sum()).backward()
        q.grad = k.grad = v.grad = None  # the kernel's work ends at dq, dk, dv

    return min(run_times(forward, repeats, device)), min(run_times(forward_backward, repeats, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    tune_malloc()
    lines = ["| sequences x tokens | forward ms | forward + backward ms |", "|---|---|---|"]
    for num, length in SHAPES:
        fwd, fwd_bwd = time_shape(num, length, args.heads, args.head_dim, args.device, args.repeats)
        lines.append(f"| {num} x {length} | {fwd * 1e3:.1f} | {fwd_bwd * 1e3:.1f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        command = (
            f"python benchmarks/packed.py --device {args.device} --heads {args.heads} --head-dim {args.head_dim} "
            f"--repeats {args.repeats}"
        )
        preamble = (
            f"Machine: {machine_description(args.device)}. {args.heads} heads x {args.head_dim}, float32, every "
            "sequence with its own initial state; 8,192 tokens per batch."
        )
        append_result(RESULTS, "Packed batches through the lightning kernel", preamble, command, table)


if __name__ == "__main__":
    main()
