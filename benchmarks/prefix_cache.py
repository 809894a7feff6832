"""Prefix caching on vs off: `hyla serve` twice on the same weights, the chat and agent workloads of
`hyla bench serve` alternated between the two servers, medians over repeats.

chat: ``--conversations`` conversations of ``--turns`` turns sharing one system prompt, each turn resending the
whole conversation (~2k tokens by the last turn with the defaults); agent: one transcript growing by a tool
result per call. Each repeat uses new text (another seed), so that a repeat does not find the previous one's
prompts in the cache. Reported per workload and server: TTFT of first turns and of later turns (p50, p99),
output tokens/s and the prefix-hit rate; the ratio column is off / on (higher: caching helps).

Usage: python benchmarks/prefix_cache.py [--preset small] [--repeats 3] [--no-append]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile
from pathlib import Path

import torch

import hyla
from hyla.bench import append_result, machine_description
from hyla.bench.serve import launch_server, run_load
from hyla.data.tokenizer import byte_level_tokenizer

RESULTS = Path(__file__).with_name("RESULTS.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=300)
    parser.add_argument("--user-words", type=int, default=40)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = hyla.preset(args.preset)
    workloads = {"chat": args.conversations, "agent": 1}
    rows: dict[tuple[str, bool], list[dict]] = {(w, c): [] for w in workloads for c in (False, True)}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / args.preset
        hyla.save_pretrained(hyla.HylaForCausalLM(config), model_dir)
        byte_level_tokenizer().save(str(model_dir / "tokenizer.json"))
        flags = ("--max-num-seqs", "8", "--max-model-len", "4096")
        servers = {caching: launch_server(model_dir, *flags, "--enable-prefix-caching" if caching else
                                          "--no-enable-prefix-caching") for caching in (False, True)}  # fmt: skip
        try:
            for repeat in range(args.repeats):
                order = (False, True) if repeat % 2 == 0 else (True, False)  # alternate who goes first
                for workload, concurrency in workloads.items():
                    for caching in order:
                        result = asyncio.run(run_load(
                            servers[caching][1], concurrency, 0, 0, args.output_len, workload=workload,
                            turns=args.turns if workload == "chat" else 2 * args.turns, seed=repeat + 1,
                            system_words=args.system_words, user_words=args.user_words))  # fmt: skip
                        rows[workload, caching].append(result.row(1.0))
                        r = rows[workload, caching][-1]
                        print(
                            f"repeat {repeat} {workload} caching={'on' if caching else 'off'}: later-turn TTFT "
                            f"{r['ttft_later_p50_ms']:.0f} ms, hit rate {r['prefix_hit_rate']:.2f}",
                            flush=True,
                        )
        finally:
            for server, _ in servers.values():
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)

    def med(workload: str, caching: bool, key: str) -> float:
        return statistics.median(r[key] for r in rows[workload, caching])

    lines = ["| workload | prefix caching | TTFT turn 1 p50 ms | TTFT later turns p50 / p99 ms | out tok/s "
             "| prefix-hit rate | later-turn TTFT off / on |", "|" + "---|" * 7]  # fmt: skip
    for workload in workloads:
        for caching in (False, True):
            ratio = med(workload, False, "ttft_later_p50_ms") / med(workload, True, "ttft_later_p50_ms")
            m = {key: med(workload, caching, key) for key in rows[workload, caching][0] if key != "workload"}
            lines.append(
                f"| {workload} | {'on' if caching else 'off'} | {m['ttft_turn1_p50_ms']:.0f} "
                f"| {m['ttft_later_p50_ms']:.0f} / {m['ttft_later_p99_ms']:.0f} | {m['out_tok_s']:.1f} "
                f"| {m['prefix_hit_rate']:.2f} | {f'{ratio:.1f}x' if caching else ''} |"
            )
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        command = (f"python benchmarks/prefix_cache.py --preset {args.preset} --repeats {args.repeats} "
                   f"--conversations {args.conversations} --turns {args.turns} --system-words {args.system_words} "
                   f"--user-words {args.user_words} --output-len {args.output_len}")  # fmt: skip
        title = f"Prefix caching, {args.preset} ({config.num_parameters() / 1e6:.1f}M), float32, byte tokens"
        preamble = (f"Machine: {machine_description()}. Two `hyla serve` processes on the same weights, workloads "
                    f"alternated, medians of {args.repeats} repeats (each of new text).")  # fmt: skip
        append_result(RESULTS, title, preamble, command, table)


if __name__ == "__main__":
    main()
