"""``hyla bench context`` (attention scaling with context length) and ``hyla bench serve`` (a server under load)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parsers(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="measure speed: attention scaling, a server under load",
                                description="Benchmarks: `hyla bench context` (lightning vs softmax attention "
                                "across context lengths), `hyla bench serve` (a server under load).")  # fmt: skip
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    ctx = benches.add_parser("context", help="lightning vs softmax attention across context lengths",
                             description="Time one lightning layer, its kernel and softmax attention from 1k to 64k "
                             "tokens; print a table and write it, with its plot, into --out.")  # fmt: skip
    ctx.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="auto: cuda if there is a GPU, else cpu (default: auto)")  # fmt: skip
    ctx.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                     help="default: bfloat16 on CUDA, float32 on the CPU")  # fmt: skip
    ctx.add_argument("--lengths", type=int, nargs="+", default=None,
                     help="default: 1k..64k on the CPU, 4k..128k on CUDA")  # fmt: skip
    ctx.add_argument("--hidden", type=int, default=512, help="the layer's width (default: 512)")
    ctx.add_argument("--heads", type=int, default=8, help="attention heads (default: 8)")
    ctx.add_argument("--repeats", type=int, default=3, help="timed runs per length, the median kept (default: 3)")
    ctx.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    ctx.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where context.md (table, machine, command) and "
        "context.png go (default: a new hyla-bench/context-DEVICE-TIME in the working directory)",
    )
    ctx.add_argument(
        "--append-results",
        type=Path,
        default=None,
        metavar="RESULTS.md",
        help="also append the table to this file (hyla's own record: benchmarks/RESULTS.md)",
    )
    ctx.set_defaults(run=run_bench_context)

    sv = benches.add_parser("serve", help="load-test an OpenAI-compatible server (start one with hyla serve)",
                            description="Send streaming completions at several concurrency levels and report "
                            "tokens/s, time to first token, time per output token and $ per 1M tokens.")  # fmt: skip
    sv.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    sv.add_argument("--api-key", default=None, help="the server's key, if it has one")
    sv.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients at once, per level")
    sv.add_argument("--requests", type=int, default=None, help="per level (default: max(4, 2 x concurrency))")
    sv.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
    sv.add_argument("--output-len", type=int, default=128, help="generated tokens (default: 128)")
    sv.add_argument("--price-per-hour", type=float, default=1.0,
                    help="the machine's price in $ an hour, for $ per 1M output tokens (default: 1.0)")  # fmt: skip
    sv.add_argument("--workload", choices=["random", "chat", "agent"], default="random",
                    help="random prompts; chat: conversations sharing a system prompt, resent whole each turn; "
                    "agent: transcripts growing by a tool result each call (default: random)")  # fmt: skip
    sv.add_argument("--turns", type=int, default=4, help="turns per conversation or agent (default: 4)")
    sv.add_argument("--system-words", type=int, default=400, help="words of the shared system prompt (default: 400)")
    sv.add_argument("--user-words", type=int, default=60,
                    help="words of each user message or tool result (default: 60)")  # fmt: skip
    sv.set_defaults(run=run_bench_serve)


def run_bench_context(args: argparse.Namespace) -> None:
    import torch

    from hyla.bench import context
    from hyla.errors import ConfigError

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available")
    lengths = args.lengths or [2**i for i in (range(12, 18) if cuda else range(10, 17))]
    if args.hidden % args.heads:
        raise ConfigError(f"--heads ({args.heads}) must divide --hidden ({args.hidden})")
    out = Path(args.out or f"hyla-bench/context-{device}-{time.strftime('%Y%m%d-%H%M%S')}")
    context.main(lengths, device, args.dtype or ("bfloat16" if cuda else "float32"), args.hidden,
                 args.heads, args.repeats, not args.no_backward, out, args.append_results)  # fmt: skip


def run_bench_serve(args: argparse.Namespace) -> None:
    from hyla.bench import serve as bench_serve
    from hyla.errors import ConfigError

    if min(args.concurrency) < 1 or args.input_len < 1 or args.output_len < 1:
        raise ConfigError("--concurrency, --input-len and --output-len must be >= 1")
    bench_serve.main(args.url, args.concurrency, args.requests, args.input_len, args.output_len,
                     args.price_per_hour, args.api_key, args.workload, args.turns, args.system_words,
                     args.user_words)  # fmt: skip
