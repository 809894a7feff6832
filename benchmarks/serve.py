"""Serving throughput: hyla's server vs transformers' ``generate()`` with batching, on the same weights.

One run, one machine, float32 on the CPU. hyla: ``hyla serve`` in its own process, driven over HTTP by the
load generator of ``hyla bench serve`` (``C`` concurrent streaming clients, random token-id prompts of
``--input-len`` tokens, exactly ``--output-len`` generated). transformers: ``MiniMaxForCausalLM.generate``
on the same prompts in static batches of ``C`` (greedy, ``min_new_tokens = max_new_tokens``), in this process,
with its fastest experts kernel on this CPU (``eager``) and the same allocator settings as the server. The two
alternate level by level (the idle one waits). Both produce ``max(4, 2 C)`` completions per level; output
tokens/s = all generated tokens / wall time (hyla's includes HTTP, SSE and the scheduling of arriving requests).

Usage: python benchmarks/serve.py [--preset small] [--concurrency 1 8 32] [--input-len 128] [--output-len 128]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import hyla
from hyla.bench import append_result, machine_description
from hyla.bench.serve import launch_server, run_load
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.runtime import tune_malloc

RESULTS = Path(__file__).with_name("RESULTS.md")


def start_server(model_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    flags = ("--max-model-len", str(args.input_len + args.output_len), "--max-num-seqs", str(max(args.concurrency)))
    server, url = launch_server(model_dir, *flags)
    asyncio.run(run_load(url, 1, 2, args.input_len, 8))  # warm-up
    return server, url


def load_transformers(model_dir: Path, vocab: int, args: argparse.Namespace):
    from transformers import MiniMaxForCausalLM

    # transformers' fastest experts kernel on this CPU is its eager per-expert loop (grouped_mm is slower).
    model = MiniMaxForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager").eval()
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.randint(0, vocab, (1, args.input_len)), **gen)  # warm-up
    return model


@torch.inference_mode()
def transformers_rate(model, vocab: int, c: int, args: argparse.Namespace, rng: random.Random) -> float:
    """Output tokens/s of ``max(4, 2 c)`` completions in static batches of ``c``."""
    gen = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
    n = max(4, 2 * c)
    start = time.perf_counter()
    for _ in range(n // c):
        ids = torch.tensor([[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(c)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        assert out.shape[1] == args.input_len + args.output_len
    return n * args.output_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--price-per-hour", type=float, default=1.0)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    config = hyla.preset(args.preset)
    torch.manual_seed(0)
    tune_malloc()  # the allocator settings `hyla serve` runs with, for transformers in this process too
    hyla_results, theirs = [], []
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / args.preset
        hyla.save_pretrained(hyla.HylaForCausalLM(config), model_dir)
        byte_level_tokenizer().save(str(model_dir / "tokenizer.json"))
        server, url = start_server(model_dir, args)
        try:
            reference = load_transformers(model_dir, 256, args)  # 256: the byte-level tokenizer's ids
            for c in args.concurrency:  # the two sides alternate, level by level (one idles while the other runs)
                hyla_results.append(asyncio.run(run_load(url, c, max(4, 2 * c), args.input_len, args.output_len)))
                theirs.append(transformers_rate(reference, 256, c, args, rng))
                print(f"C={c}: hyla {hyla_results[-1].output_tokens_per_s:.1f}, transformers {theirs[-1]:.1f} out "
                      "tok/s", flush=True)  # fmt: skip
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    lines = [
        "| concurrent | hyla out tok/s | transformers out tok/s | speed-up | hyla req/s | TTFT p50 / p99 ms "
        "| TPOT p50 / p99 ms | $ / 1M out tokens |",
        "|" + "---|" * 8,
    ]
    for result, rate in zip(hyla_results, theirs, strict=True):
        r = result.row(args.price_per_hour)
        lines.append(
            f"| {r['concurrency']} | {r['out_tok_s']:.1f} | {rate:.1f} | {r['out_tok_s'] / rate:.2f}x "
            f"| {r['req_s']:.2f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
            f"| {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {r['usd_per_1m_out']:.2f} |"
        )
    table = "\n".join(lines)
    machine = machine_description()
    print(table)
    if not args.no_append:
        command = (
            f"python benchmarks/serve.py --preset {args.preset} --concurrency "
            f"{' '.join(map(str, args.concurrency))} --input-len {args.input_len} --output-len {args.output_len}"
        )
        title = f"Serving, {args.preset} ({config.num_parameters() / 1e6:.1f}M), float32"
        preamble = (
            f"Machine: {machine}; price ${args.price_per_hour}/h for the cost column. transformers at its "
            "fastest setting here (eager experts, hyla's allocator settings), alternated level by level."
        )
        append_result(RESULTS, title, preamble, command, table)


if __name__ == "__main__":
    main()
