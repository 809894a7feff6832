"""``hyla serve``: a model behind an OpenAI-compatible HTTP API; SIGINT/SIGTERM shut it down gracefully."""

from __future__ import annotations

import argparse
import os
import sys

from hyla.cli.common import (
    MODEL_DIR_HELP,
    add_config_flags,
    add_dtype_arg,
    add_tokenizer_arg,
    config_from_args,
    resolve_dtype,
    stop_on_signals,
)
from hyla.serve.config import API_KEY_ENV, ServerConfig

# The flags of ServerConfig that come first in --help.
_ADDRESS = ("host", "port", "api_key", "served_model_name")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    import torch

    from hyla.serve.engine import QUANTIZE, SPECULATIVE, EngineConfig
    from hyla.serve.runner import COMPILED_MAX_BATCH

    srv = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a model directory (or a run directory's model) with continuous "
                              "batching behind /v1/completions, /v1/chat/completions, /v1/models, /health and "
                              "/metrics. SIGINT/SIGTERM shut it down gracefully.")  # fmt: skip
    srv.add_argument("model_dir", help=MODEL_DIR_HELP)
    add_config_flags(srv, ServerConfig, only=_ADDRESS)
    add_tokenizer_arg(srv)
    add_dtype_arg(srv, gpu=True)
    srv.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    add_config_flags(srv, EngineConfig, skip=("compile", "speculative"), choices={"quantize": [q for q in QUANTIZE
                     if q]})  # fmt: skip
    srv.add_argument("--speculative", choices=[*(s for s in SPECULATIVE if s), "off"], default=None,
                     help="ngram: speculative decoding with drafts from the request's own context (prompt lookup; "
                     "exact); off: none (default: ngram where the decode steps compile, off where they do not, "
                     "where it does not pay: RESULTS.md; the log says what it chose)")  # fmt: skip
    srv.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"CPU: run decode steps of up to {COMPILED_MAX_BATCH} requests through a torch.compile'd "
        "forward (compiled at start, cached on disk; measured in RESULTS.md) (default: on where a "
        "C++ compiler is found and the model is float32 on the CPU; the log says what it chose)",
    )
    add_config_flags(srv, ServerConfig, skip=_ADDRESS)
    srv.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    """``hyla serve``: the first SIGINT or SIGTERM starts a graceful shutdown, a second one stops at once."""
    from hyla.serve.api import serve
    from hyla.serve.engine import EngineConfig

    server = config_from_args(ServerConfig, args)
    server.api_key = server.api_key or os.environ.get(API_KEY_ENV) or None
    auto_compile, auto_speculative = args.compile is None, args.speculative is None
    args.compile = bool(args.compile)
    args.speculative = None if args.speculative in (None, "off") else args.speculative
    config = config_from_args(EngineConfig, args)
    dtype, dtype_text = resolve_dtype(args.dtype, args.device)
    what = f"shutting down (no new requests; running ones have {server.shutdown_timeout:g} s to finish)"
    with stop_on_signals(what) as stop:
        serve(args.model_dir, stop, server, config, dtype, args.device, args.tokenizer,
              log=lambda line: print(line, file=sys.stderr, flush=True), dtype_text=dtype_text,
              auto_compile=auto_compile, auto_speculative=auto_speculative)  # fmt: skip
