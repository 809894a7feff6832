"""What several commands share: model and dtype flags, flags made from config dataclasses, the signal handling
of long-running commands, and loading a model for generation."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from hyla.checkpoint import Pretrained

MODEL_DIR_HELP = "a model directory or a `hyla train` run directory"
DTYPE_NAMES = ("bfloat16", "float32", "float64")
# Flag types of config fields, by their annotation.
_FLAG_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    only: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    choices: dict[str, list] | None = None,
    given_only: bool = False,
) -> None:
    """A flag per field of config dataclass ``cls`` (``--max-num-seqs`` for ``max_num_seqs``), its help from the
    field's ``metadata["help"]`` and its default the field's; ``given_only``: every default None (so a value
    given is told from one not given). Fields without help (dicts, tuples) get no flag."""
    for f in dataclasses.fields(cls):
        if (only and f.name not in only) or f.name in skip or "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kind: dict = {"action": argparse.BooleanOptionalAction} if f.type == "bool" else {"type": _FLAG_TYPES[f.type]}
        if choices and f.name in choices:
            kind["choices"] = choices[f.name]
        text = f.metadata["help"]
        parser.add_argument(f"--{f.name.replace('_', '-')}", **kind, default=None if given_only else default,
                            help=text if "(default:" in text else f"{text} (default: {default})")  # fmt: skip


def config_from_args(cls: type, args: argparse.Namespace):
    """An instance of config dataclass ``cls`` from the flags :func:`add_config_flags` made."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def add_tokenizer_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="a tokenizer.json (default: the model directory's)")  # fmt: skip


def add_dtype_arg(parser: argparse.ArgumentParser, gpu: bool = False) -> None:
    gpu_text = "bfloat16 on a GPU; " if gpu else ""
    parser.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                        help=f"auto: {gpu_text}on a CPU with AMX/AVX512-BF16 the faster of bfloat16 and float32 "
                        "(measured once per machine), else float32")  # fmt: skip


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """A model directory, optional: without one, a random model of ``--preset``."""
    parser.add_argument("model_dir", nargs="?", default=None, help=f"{MODEL_DIR_HELP} (default: a random preset)")
    parser.add_argument("--preset", default="small", help="the random model's preset without a directory")
    add_tokenizer_arg(parser)
    add_dtype_arg(parser)


def resolve_dtype(name: str, device: str) -> tuple[torch.dtype, str]:
    """``--dtype``: a dtype by name, or ``auto``: what the device runs fastest; and the words that say so."""
    from hyla.bench.dtype import auto_dtype
    from hyla.ops.precision import DTYPES

    if name != "auto":
        return DTYPES[name], name
    dtype, why = auto_dtype(device)
    return dtype, f"dtype auto: {str(dtype).removeprefix('torch.')}, as {why}"


def load_for_generation(args: argparse.Namespace, preset_name: str = "small") -> tuple[Pretrained, str]:
    """The model of ``args.model_dir`` (a model or run directory) with its tokenizer and chat template, or without
    a directory a random ``preset_name`` with byte tokens; and a line that says what was loaded."""
    from hyla.checkpoint import Pretrained, load_pretrained
    from hyla.config import preset
    from hyla.data.tokenizer import byte_level_tokenizer, load_tokenizer
    from hyla.model import HylaForCausalLM

    dtype, dtype_text = resolve_dtype(args.dtype, "cpu")
    if args.model_dir is None:
        model = HylaForCausalLM(preset(preset_name)).to(dtype).eval()
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else byte_level_tokenizer()
        loaded = Pretrained(model, tokenizer, None, None)
        source = f"preset {preset_name!r} (random weights: expect noise until you train one)"
    else:
        loaded = load_pretrained(args.model_dir, dtype=dtype, tokenizer=args.tokenizer)
        source = str(loaded.path)
    size = loaded.model.config.num_parameters() / 1e6
    return loaded, f"# {source}: {size:.1f}M parameters; {dtype_text}"


def is_main_rank() -> bool:
    """Rank 0 under torchrun (the one that prints), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def stop_on_signals(what: str) -> Iterator[threading.Event]:
    """An event set by the first SIGINT or SIGTERM, which prints ``hyla: SIGNAL: {what}``; a second signal stops
    at once (KeyboardInterrupt, or the default SIGTERM). The long-running commands (train, sweep, serve) stop
    at a safe point when the event is set. The previous handlers come back at the end."""
    stop = threading.Event()

    def on_signal(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if is_main_rank():
            print(f"\nhyla: {name}: {what} ({name} again to stop at once)", file=sys.stderr, flush=True)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
