"""Prefill throughput: hyla vs transformers' MiniMaxForCausalLM on the same weights, side by side.

A prefill is one forward pass over a ``[1, T]`` prompt that produces the next token's logits
(``logits_to_keep=1`` for both). Both models load the same checkpoint into one process (with hyla's malloc
tuning, which speeds both up); runs alternate between them and the best of ``--repeats`` is kept, so that
both see the same machine state. hyla's rate is also reported as a
fraction of this machine's float32 matmul rate, measured in the same run, over the model's FLOPs:

    linear layers: 2 x active parameters (attention projections, router, the k chosen experts) per token
    lightning:     per head, 4 D^2 (read and update the state) + 2 B D (the causal half of the block B)
    softmax:       per head, 2 x 2 D x (position + 1) (QK^T and PV over the causal prefix)
    LM head:       2 x hidden x vocab for the one position kept

Usage: python benchmarks/prefill.py [--lengths 512 2048 8192] [--repeats 3] [--no-append]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import torch

import hyla
from hyla.bench import append_result, machine_description, run_times
from hyla.config import LIGHTNING, HylaConfig
from hyla.ops.lightning import CPU_BLOCK_SIZE
from hyla.runtime import tune_malloc

RESULTS = Path(__file__).with_name("RESULTS.md")


def prefill_flops(config: HylaConfig, t: int, block_size: int) -> float:
    """FLOPs of one prefill of ``t`` tokens (see the module docstring)."""
    h, d, heads = config.hidden_size, config.head_dim, config.num_attention_heads
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    linear = 2 * (config.num_parameters(active=True) - embeddings) * t
    attention = 0.0
    for kind in config.layer_types:
        if kind == LIGHTNING:
            attention += heads * t * (4 * d * d + 2 * block_size * d)
        else:
            attention += heads * 4 * d * t * (t + 1) / 2
    return linear + attention + 2 * h * config.vocab_size


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 4096) -> float:
    """This machine's matmul rate in FLOP/s (best of 5 ``n x n x n`` products)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, 5)


def best_time(fn, repeats: int) -> float:
    return min(run_times(fn, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    tune_malloc()  # process-wide: both models run under the same allocator settings

    from transformers import MiniMaxForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = hyla.preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        hyla.save_pretrained(hyla.HylaForCausalLM(config), tmp)
        ours = hyla.load(tmp)
        ours_bf16 = hyla.load(tmp, dtype=torch.bfloat16)
        # transformers' fastest experts kernel on this CPU is its eager per-expert loop (its grouped_mm is slower).
        theirs = MiniMaxForCausalLM.from_pretrained(tmp, experts_implementation="eager").eval()

    peak = matmul_rate()
    rows = []
    with torch.inference_mode():
        for t in args.lengths:
            ids = torch.randint(0, config.vocab_size, (1, t))
            runs = {"hyla": [], "transformers": [], "hyla bf16": []}
            for _ in range(args.repeats):  # alternate, so both see the same machine state
                for name, model in (("hyla", ours), ("transformers", theirs), ("hyla bf16", ours_bf16)):
                    runs[name].append(best_time(functools.partial(model, ids, logits_to_keep=1), 1))
            best = {k: min(v) for k, v in runs.items()}
            ref = ours(ids, logits_to_keep=1).logits.float()
            bf16_err = ((ours_bf16(ids, logits_to_keep=1).logits.float() - ref).abs().max() / ref.abs().max()).item()
            flops = prefill_flops(config, t, CPU_BLOCK_SIZE)
            rows.append(
                (
                    t,
                    t / best["hyla"],
                    t / best["transformers"],
                    best["transformers"] / best["hyla"],
                    flops / best["hyla"] / peak,
                    t / best["hyla bf16"],
                    bf16_err,
                )
            )

    header = (
        "| tokens | hyla fp32 tok/s | transformers fp32 tok/s | speed-up | hyla / matmul peak "
        "| hyla bf16 tok/s | bf16 logits rel. err |"
    )
    lines = [header, "|" + "---|" * 7]
    for t, ours_rate, theirs_rate, speedup, frac, bf16_rate, err in rows:
        lines.append(
            f"| {t} | {ours_rate:,.0f} | {theirs_rate:,.0f} | {speedup:.2f}x | {frac:.0%} "
            f"| {bf16_rate:,.0f} | {err:.1e} |"
        )
    table = "\n".join(lines)
    machine = machine_description()
    print(f"{args.preset}: {config.num_parameters() / 1e6:.1f}M parameters; {machine}")
    print(f"float32 matmul peak measured: {peak / 1e9:.0f} GFLOP/s")
    print(table)
    if not args.no_append:
        lightning = config.layer_types.count(LIGHTNING)
        softmax = config.num_hidden_layers - lightning
        append_result(
            RESULTS,
            f"Prefill, {args.preset} ({config.num_parameters() / 1e6:.1f}M, {lightning}:{softmax} hybrid)",
            f"Machine: {machine}; float32 matmul peak {peak / 1e9:.0f} GFLOP/s.",
            f"python benchmarks/prefill.py --lengths {' '.join(map(str, args.lengths))} --repeats {args.repeats}",
            table,
        )


if __name__ == "__main__":
    main()
