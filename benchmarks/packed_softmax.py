"""Packed documents through softmax attention: hyla's length buckets vs one SDPA call per document.

Training packs documents of mixed lengths into one ``[1, ΣT]`` row (``cu_seqlens``). ``softmax_attention`` pads each
to a multiple of 64 tokens and runs each padded length as one SDPA batch (multi-level padding); the alternative
without a varlen kernel is a loop of one SDPA call per document. Both are timed forward + backward (best of
``--repeats`` after a warm-up) on mixes of 8,192 tokens, GQA with two query heads per key/value head.

Usage: python benchmarks/packed_softmax.py [--heads 8] [--head-dim 64] [--repeats 3] [--no-append]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from hyla.bench import append_result, machine_description, run_times
from hyla.ops.attention import softmax_attention
from hyla.runtime import tune_malloc

RESULTS = Path(__file__).with_name("RESULTS.md")


def mixes() -> dict[str, list[int]]:
    """Document lengths of each 8,192-token batch."""
    generator = torch.Generator().manual_seed(0)
    spread = torch.randint(20, 513, (64,), generator=generator).tolist()  # the main job's documents: <= 512 tokens
    spread = [n for i, n in enumerate(spread) if sum(spread[: i + 1]) <= 8192]
    return {
        f"{len(spread) + 1} of 20-512 tokens": [*spread, 8192 - sum(spread)],
        "one of 4,096 + 64 of 64": [4096] + [64] * 64,
        "16 x 512": [512] * 16,
        "1 x 8,192": [8192],
    }


def per_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    bounds = cu_seqlens.tolist()
    parts = [softmax_attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in itertools.pairwise(bounds)]
    return torch.cat(parts, dim=1)


def time_mix(lengths: list[int], heads: int, head_dim: int, repeats: int, bucketed: bool) -> float:
    """Best forward + backward seconds of one packed batch of documents of ``lengths`` tokens."""
    q = torch.randn(1, sum(lengths), heads, head_dim, requires_grad=True)
    k, v = (torch.randn(1, sum(lengths), heads // 2, head_dim, requires_grad=True) for _ in range(2))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    attend = softmax_attention if bucketed else per_document

    def run() -> None:
        attend(q, k, v, cu_seqlens).sum().backward()
        q.grad = k.grad = v.grad = None

    return min(run_times(run, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    tune_malloc()
    lines = ["| documents | buckets fwd+bwd ms | one call per document fwd+bwd ms | speed-up |", "|---|---|---|---|"]
    for name, lengths in mixes().items():
        times = [time_mix(lengths, args.heads, args.head_dim, args.repeats, bucketed) for bucketed in (True, False)]
        lines.append(f"| {name} | {times[0] * 1e3:.1f} | {times[1] * 1e3:.1f} | {times[1] / times[0]:.2f}x |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    if not args.no_append:
        command = (
            f"python benchmarks/packed_softmax.py --heads {args.heads} --head-dim {args.head_dim} "
            f"--repeats {args.repeats}"
        )
        preamble = (
            f"Machine: {machine_description()}. {args.heads} query heads, {args.heads // 2} key/value heads x "
            f"{args.head_dim}, float32, 8,192 tokens per batch."
        )
        append_result(RESULTS, "Packed documents through softmax attention", preamble, command, table)


if __name__ == "__main__":
    main()
