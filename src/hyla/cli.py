"""The ``hyla`` command: one subcommand per function, parsing arguments and calling it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time

import torch

from hyla.checkpoint import CheckpointError, load
from hyla.config import ConfigError, preset
from hyla.data.tokenizer import byte_level_tokenizer, load_tokenizer
from hyla.errors import DataError
from hyla.model import HylaForCausalLM
from hyla.runtime import tune_malloc
from hyla.serve import LLM, EngineConfig, RequestError, SamplingParams
from hyla.serve.api import DEFAULT_MAX_REQUEST_BYTES
from hyla.train.loop import TrainConfig, load_train_toml, train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def run_generate(
    model_dir: str | None, preset_name: str, prompt: str, params: SamplingParams, seed: int, dtype: str
) -> None:
    """Stream a continuation of ``prompt`` from a model directory, or from a randomly initialised preset."""
    torch.manual_seed(seed)
    if model_dir is not None:
        model = load(model_dir, dtype=DTYPES[dtype])
        source = model_dir
    else:
        model = HylaForCausalLM(preset(preset_name)).to(DTYPES[dtype]).eval()
        source = f"preset {preset_name!r} (random weights: expect noise until you train one)"
    tokenizer = load_tokenizer(model_dir) if model_dir is not None else byte_level_tokenizer()
    context = min(model.config.max_position_embeddings, 4096)
    llm = LLM(model, tokenizer, EngineConfig(max_num_seqs=1, max_model_len=context))
    print(f"# {source}: {model.config.num_parameters() / 1e6:.1f}M parameters, {dtype}", file=sys.stderr)
    print(prompt, end="", flush=True)
    start = time.perf_counter()
    first, count = None, 0
    for out in llm.stream([prompt], params):
        first = first or time.perf_counter()
        count += len(out.token_ids)
        print(out.text, end="", flush=True)
    end = time.perf_counter()
    print()
    decode = f", decode {(count - 1) / (end - first):.1f} tok/s" if count > 1 else ""
    prompt_tokens = len(tokenizer.encode(prompt).ids)
    print(f"# prompt {prompt_tokens} tokens, prefill {(first - start) * 1e3:.0f} ms; generated {count} tokens{decode}",
          file=sys.stderr)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyla", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream a continuation of a prompt")
    gen.add_argument("model_dir", nargs="?", default=None, help="a model directory (default: a random preset)")
    gen.add_argument("--preset", default="small", help="preset used when no model directory is given")
    gen.add_argument("--prompt", default="def fibonacci(n):\n")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")

    tr = commands.add_parser("train", help="train a model on a corpus (default: the Python standard library)")
    for f in dataclasses.fields(TrainConfig):
        if f.type in ("int", "float", "str", "str | None"):
            kind = {"int": int, "float": float}.get(f.type, str)
            default = f.default if f.default is not dataclasses.MISSING else None
            # None: not given, so that a --config file's value (or the dataclass default) applies.
            tr.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f"default: {default}")
    tr.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a field of the model preset, e.g. --set hidden_size=256")  # fmt: skip
    tr.add_argument("--config", default=None, metavar="FILE.toml",
                    help="the run's fields (a [model] table: preset overrides); flags override it")  # fmt: skip
    tr.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")

    srv = commands.add_parser("serve", help="serve a model directory over an OpenAI-compatible HTTP API")
    srv.add_argument("model_dir")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    srv.add_argument("--served-model-name", default=None, help="default: the directory's name")
    srv.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    srv.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in dataclasses.fields(EngineConfig):
        srv.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default, help=f"default: {f.default}")
    srv.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which new ones get 503")
    srv.add_argument("--tokenizer", default=None, metavar="PATH",
                     help="a tokenizer.json (default: the one in the model directory)")  # fmt: skip
    srv.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                     help="request bodies past this size get 413 (default: %(default)s)")  # fmt: skip
    srv.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                     help="on SIGINT/SIGTERM, seconds running requests get to finish")  # fmt: skip

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    ctx = bench.add_parser("context", help="lightning vs softmax attention across context lengths")
    ctx.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ctx.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                     help="default: bfloat16 on CUDA, float32 on the CPU")  # fmt: skip
    ctx.add_argument("--lengths", type=int, nargs="+", default=None,
                     help="default: 1k..64k on the CPU, 4k..128k on CUDA")  # fmt: skip
    ctx.add_argument("--hidden", type=int, default=512)
    ctx.add_argument("--heads", type=int, default=8)
    ctx.add_argument("--repeats", type=int, default=3)
    ctx.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    ctx.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ctx.add_argument("--plot", default=None, help="PNG path (default: benchmarks/context-DEVICE.png)")
    sv = bench.add_parser("serve", help="load-test an OpenAI-compatible server (start one with hyla serve)")
    sv.add_argument("--url", default="http://127.0.0.1:8000/v1")
    sv.add_argument("--api-key", default=None)
    sv.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    sv.add_argument("--requests", type=int, default=None, help="per level (default: max(4, 2 x concurrency))")
    sv.add_argument("--input-len", type=int, default=128)
    sv.add_argument("--output-len", type=int, default=128)
    sv.add_argument("--price-per-hour", type=float, default=1.0, help="the machine's price, for $ per 1M tokens")
    return parser


def run_train(args: argparse.Namespace) -> None:
    """``hyla train``: a TOML file's fields, then the flags given, then preset overrides from ``--set``."""
    fields = load_train_toml(args.config) if args.config else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    fields.update({k: v for k, v in given.items() if v is not None})
    overrides = fields.pop("model", {})
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes FIELD=VALUE, got {item!r}")
        overrides[name] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    metrics = train(TrainConfig(**fields, model=overrides), resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for text in metrics.pop("samples", []):
        print(f"--- sample ---\n{text}")
    if "unigram_entropy" in metrics:
        verdict = "learned" if metrics["learned"] else "NOT yet below"
        print(f"held-out loss {metrics['held_out_loss']:.3f} nats/token over {metrics['held_out_tokens']:,} tokens; "
              f"unigram entropy {metrics['unigram_entropy']:.3f}; "
              f"ratio {metrics['ratio']:.3f} ({verdict} the 0.6 bar); plot: {metrics['plot']}")  # fmt: skip
    print(json.dumps(metrics))


def run_serve(args: argparse.Namespace) -> None:
    """``hyla serve``: the first SIGINT or SIGTERM starts a graceful shutdown, a second one stops at once."""
    from hyla.serve.api import serve

    stop = threading.Event()

    def on_signal(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        print(f"hyla: {name}: shutting down (no new requests; running ones have {args.shutdown_timeout:g} s to "
              f"finish; {name} again to stop now)", file=sys.stderr, flush=True)  # fmt: skip
        stop.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    config = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    try:
        serve(args.model_dir, stop, args.host, args.port, args.api_key, args.served_model_name, config,
              args.max_waiting, DTYPES[args.dtype], args.device, args.tokenizer, args.max_request_bytes,
              args.shutdown_timeout, log=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_bench_context(args: argparse.Namespace) -> None:
    from pathlib import Path

    from hyla.bench import context

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    lengths = args.lengths or [2**i for i in (range(12, 18) if cuda else range(10, 17))]
    if args.hidden % args.heads:
        raise ValueError(f"--heads ({args.heads}) must divide --hidden ({args.hidden})")
    results = None if args.no_append else Path("benchmarks/RESULTS.md")
    plot = Path(args.plot or f"benchmarks/context-{args.device}.png")
    context.main(lengths, args.device, args.dtype or ("bfloat16" if cuda else "float32"), args.hidden,
                 args.heads, args.repeats, not args.no_backward, results, plot)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()
    try:
        if args.command == "generate":
            params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed)  # fmt: skip
            run_generate(args.model_dir, args.preset, args.prompt, params, args.seed, args.dtype)
        elif args.command == "serve":
            run_serve(args)
        elif args.command == "train":
            run_train(args)
        elif args.command == "bench" and args.bench == "context":
            run_bench_context(args)
        elif args.command == "bench" and args.bench == "serve":
            from hyla.bench import serve as bench_serve

            if min(args.concurrency) < 1 or args.input_len < 1 or args.output_len < 1:
                raise ValueError("--concurrency, --input-len and --output-len must be >= 1")
            bench_serve.main(args.url, args.concurrency, args.requests, args.input_len, args.output_len,
                             args.price_per_hour, args.api_key)  # fmt: skip
    except (CheckpointError, ConfigError, DataError, RequestError, ValueError) as e:
        print(f"hyla: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nhyla: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
