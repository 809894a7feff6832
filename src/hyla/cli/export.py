"""``hyla export``: a model as one GGUF file that llama.cpp runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hyla.cli.common import MODEL_DIR_HELP, add_tokenizer_arg


def add_parsers(commands: argparse._SubParsersAction) -> None:
    ex = commands.add_parser("export", help="write a model as a GGUF file for llama.cpp",
                             description="Write a model directory (or a run directory's model) as one GGUF file "
                             "that llama.cpp's MiniMax-01 architecture runs (llama-server, llama-cli, "
                             "llama-cpp-python). Models llama.cpp would compute differently (per-sub-layer DeepNorm "
                             "factors, betas other than 1, pre-norm) are refused with the reason.")  # fmt: skip
    ex.add_argument("model_dir", help=MODEL_DIR_HELP)
    ex.add_argument("--format", choices=["gguf"], default="gguf", help="the file format (default: gguf)")
    ex.add_argument("--outtype", choices=["f32", "bf16", "q8_0"], default="f32",
                    help="the matrices' type; norms and the router stay f32 (default: f32)")  # fmt: skip
    ex.add_argument("--output", default=None, metavar="FILE",
                    help="where to write (default: MODEL_DIR/NAME-OUTTYPE.gguf)")  # fmt: skip
    add_tokenizer_arg(ex)
    ex.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    ex.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> None:
    from hyla.checkpoint import load_pretrained
    from hyla.data.tokenizer import DEFAULT_CHAT_TEMPLATE
    from hyla.interop.gguf import export_gguf

    name = Path(args.model_dir).resolve().name
    output = Path(args.output or Path(args.model_dir) / f"{name}-{args.outtype}.gguf")
    loaded = load_pretrained(args.model_dir, tokenizer=args.tokenizer)
    template = loaded.chat_template.source if loaded.chat_template else DEFAULT_CHAT_TEMPLATE
    start = time.perf_counter()
    kept = export_gguf(loaded.model, loaded.tokenizer, output, args.outtype, name, template, args.overwrite)
    size = output.stat().st_size / 2**20
    print(f"wrote {output} ({size:.1f} MiB, {args.outtype}, {time.perf_counter() - start:.1f} s)")
    if kept:
        print(f"kept in float32 (rows not a whole number of {args.outtype} blocks): {', '.join(kept)}")
    print(f"run it with llama.cpp: llama-server -m {output}   or   llama-cli -m {output} -p 'def '")
