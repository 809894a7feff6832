"""Training throughput: hyla vs transformers' MiniMaxForCausalLM, the same config, weights and batch.

One training step = forward + backward (next-token loss plus the MoE load-balancing loss, which transformers
computes with ``output_router_logits=True``) + a fused AdamW step (``hyla train``'s optimizer, and the default of
transformers' Trainer from torch 2.8). Both models start from the same checkpoint in one process (with hyla's malloc
tuning, which speeds both up); steps alternate between them and the median of ``--steps`` timed steps is kept. The
batch is ``[batch, seq_len]`` random tokens, unpacked (transformers' MiniMax has no packed-sequence path).

``--ceiling`` adds a third, timed the same way: hyla with its lightning-attention op (SiLU of q, k, v included)
replaced by a copy of v's pre-activation (the projections, gated norm, MoE, softmax layer and optimizer all still
run). It is not a model; its speed-up over transformers bounds what any lightning kernel, however fast, could give
at this shape.

Usage: python benchmarks/train.py [--presets demo small] [--batch 4] [--seq-len 1024] [--steps 5] [--ceiling]
    [--no-append]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import hyla
import hyla.model.lightning
from hyla.bench import append_result, machine_description
from hyla.runtime import tune_malloc

RESULTS = Path(__file__).with_name("RESULTS.md")


def step_fn(model, ids: torch.Tensor, hf: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    coef = model.config.router_aux_loss_coef

    def step() -> None:
        if hf:
            loss = model(input_ids=ids, labels=ids, output_router_logits=True).loss  # includes coef * aux
        else:
            out = model.loss(ids)  # the LM head fused into the loss
            loss = out.loss + coef * out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def free_lightning(step):
    """``step`` with every lightning-attention op (its SiLU included) replaced by a copy of v (see ``--ceiling``)."""

    def copy_v(qkv, *args, **kwargs):
        return qkv[..., -(qkv.shape[-1] // 3) :].clone(), None

    def run() -> None:
        real = hyla.model.lightning.lightning_attention_qkv
        hyla.model.lightning.lightning_attention_qkv = copy_v
        try:
            step()
        finally:
            hyla.model.lightning.lightning_attention_qkv = real

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["demo", "small"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ceiling", action="store_true", help="also time hyla with a free lightning op")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    from transformers import MiniMaxForCausalLM

    tune_malloc()
    rows = []
    for name in args.presets:
        config = hyla.preset(name)
        torch.manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
        with tempfile.TemporaryDirectory() as tmp:
            hyla.save_pretrained(hyla.HylaForCausalLM(config), tmp)
            ours = hyla.load(tmp).train()
            # transformers' fastest experts kernel on this CPU is its eager per-expert loop (grouped_mm is slower).
            theirs = MiniMaxForCausalLM.from_pretrained(tmp, dtype=torch.float32, experts_implementation="eager")
            theirs.train()
        steps = {"hyla": step_fn(ours, ids, hf=False), "transformers": step_fn(theirs, ids, hf=True)}
        if args.ceiling:  # (its own optimizer over the same parameters: the weights drift, the shapes do not)
            steps["ceiling"] = free_lightning(step_fn(ours, ids, hf=False))
        times: dict[str, list[float]] = {k: [] for k in steps}
        for fn in steps.values():
            fn()  # warm-up
        for _ in range(args.steps):
            for key, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        tokens = args.batch * args.seq_len
        rates = {key: tokens / statistics.median(t) for key, t in times.items()}
        rows.append((name, config.num_parameters() / 1e6, rates))
        print(f"{name}: " + ", ".join(f"{key} {rate:,.0f} tok/s" for key, rate in rates.items()), flush=True)

    header = "| preset | parameters | hyla tok/s | transformers tok/s | speed-up |"
    if args.ceiling:
        header += " hyla, free lightning op: tok/s | ceiling speed-up |"
    lines = [header, "|---" * header.count(" |") + "|"]
    for name, params, rates in rows:
        ours_rate, theirs_rate = rates["hyla"], rates["transformers"]
        line = f"| {name} | {params:.1f}M | {ours_rate:,.0f} | {theirs_rate:,.0f} | {ours_rate / theirs_rate:.2f}x |"
        if args.ceiling:
            line += f" {rates['ceiling']:,.0f} | {rates['ceiling'] / theirs_rate:.2f}x |"
        lines.append(line)
    table = "\n".join(lines)
    machine = machine_description()
    print(table)
    if not args.no_append:
        command = (
            f"python benchmarks/train.py --presets {' '.join(args.presets)} --batch {args.batch} "
            f"--seq-len {args.seq_len} --steps {args.steps}" + (" --ceiling" if args.ceiling else "")
        )
        preamble = (
            f"Machine: {machine}. Batch {args.batch} x {args.seq_len} tokens, median of {args.steps} steps. "
            "transformers with its eager experts (its fastest here), alternated step by step."
        )
        append_result(RESULTS, "Training step (forward + backward + AdamW), float32", preamble, command, table)


if __name__ == "__main__":
    main()
