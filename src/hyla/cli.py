"""hyla: train, run, chat with and serve hybrid lightning-attention language models on your own machine.

Start with `hyla train` (a small code model on this Python's standard library, 10-12 minutes on 2 cores), then
`hyla chat runs/default`, `hyla generate runs/default` or `hyla serve runs/default`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from hyla.checkpoint import find_model_dir, load
from hyla.config import preset
from hyla.data.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    byte_level_tokenizer,
    load_chat_template,
    load_tokenizer,
)
from hyla.errors import HylaError, RequestError
from hyla.model import HylaForCausalLM
from hyla.ops.precision import DTYPES
from hyla.runtime import auto_dtype, tune_malloc
from hyla.serve import LLM, EngineConfig, SamplingParams
from hyla.serve.config import API_KEY_ENV, ServerConfig
from hyla.serve.engine import QUANTIZE
from hyla.train.loop import TrainConfig, load_train_toml, resume_config, train

# The prompts of the samples at the end of `hyla train` (the default corpus is Python code).
SAMPLE_PROMPTS = ("class Parser:\n    def ", "    for i in range(", "def test_")


# -- generate --------------------------------------------------------------------------------------------------


def resolve_dtype(name: str, device: str) -> tuple[torch.dtype, str]:
    """``--dtype``: a dtype by name, or ``auto``: what the device runs fastest; and the words that say so."""
    if name != "auto":
        return DTYPES[name], name
    dtype, why = auto_dtype(device)
    return dtype, f"dtype auto: {str(dtype).removeprefix('torch.')}, as {why}"


def _model_and_tokenizer(model_dir: str | None, dtype: str, tokenizer_path: str | None, preset_name: str = "small"):
    """A trained model (a model or run directory) with its tokenizer, or without a directory a random
    ``preset_name`` with byte tokens, and a line that says what was loaded."""
    path = None if model_dir is None else find_model_dir(model_dir)
    torch_dtype, dtype_text = resolve_dtype(dtype, "cpu")
    if path is None:
        model = HylaForCausalLM(preset(preset_name)).to(torch_dtype).eval()
        source = f"preset {preset_name!r} (random weights: expect noise until you train one)"
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else byte_level_tokenizer()
    else:
        tokenizer = load_tokenizer(tokenizer_path or path)
        model, source = load(path, dtype=torch_dtype), str(path)
    return model, tokenizer, f"# {source}: {model.config.num_parameters() / 1e6:.1f}M parameters; {dtype_text}"


def run_generate(args: argparse.Namespace) -> None:
    """Stream a continuation of ``--prompt``, then report prefill and decode speed."""
    torch.manual_seed(args.seed)
    model, tokenizer, loaded = _model_and_tokenizer(args.model_dir, args.dtype, args.tokenizer, args.preset)
    context = min(model.config.max_position_embeddings, 4096)
    llm = LLM(model, tokenizer, EngineConfig(max_num_seqs=1, max_model_len=context))
    print(loaded, file=sys.stderr)
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    first, count = None, 0
    for out in llm.stream([args.prompt], _sampling(args)):
        first = first or time.perf_counter()
        count += len(out.token_ids)
        print(out.text, end="", flush=True)
    end = time.perf_counter()
    print()
    decode = f", decode {(count - 1) / (end - first):.1f} tok/s" if count > 1 else ""
    prompt_tokens = len(tokenizer.encode(args.prompt).ids)
    print(f"# prompt {prompt_tokens} tokens, prefill {(first - start) * 1e3:.0f} ms; generated {count} tokens{decode}",
          file=sys.stderr)  # fmt: skip


def _sampling(args: argparse.Namespace, **changes) -> SamplingParams:
    fields = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed)  # fmt: skip
    return SamplingParams(**{**fields, **changes})


def _add_sampling(parser: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", "--max-new-tokens", type=int, default=max_tokens,
                       help="tokens to generate (default: %(default)s)")  # fmt: skip
    group.add_argument("--temperature", type=float, default=temperature,
                       help="0: always the likeliest token; higher: more varied (default: %(default)s)")  # fmt: skip
    group.add_argument("--top-k", type=int, default=50, help="draw from the k likeliest tokens, 0: all (default: 50)")
    group.add_argument("--top-p", type=float, default=1.0,
                       help="draw from the likeliest tokens covering this probability (default: 1, all)")  # fmt: skip
    group.add_argument("--seed", type=int, default=0, help="the same seed gives the same text (default: 0)")


# -- chat ------------------------------------------------------------------------------------------------------


def chat(
    llm: LLM,
    params: SamplingParams,
    lines: Iterable[str],
    write: Callable[[str], None],
    template: ChatTemplate | None = None,
    system: str | None = None,
    echo: bool = False,
) -> None:
    """The conversation loop of ``hyla chat``: each line of ``lines`` is a turn, its reply streamed to ``write``.

    With a chat ``template`` (Jinja, as transformers' ``chat_template``), turns are user messages and the
    history is the list of messages; without one (completion mode, for code models), the history is the text so
    far and each line is appended to it and continued. ``/reset`` forgets the history, ``/quit`` ends; when the
    history outgrows the context, its oldest tokens are dropped. ``echo`` writes each turn (``> line``) before its
    reply, so that a transcript of piped input reads as a conversation.
    """
    render = template.render if template else None
    engine = llm.engine
    room = engine.config.max_model_len - (params.max_tokens or 0) - 1
    messages: list[dict] = [{"role": "system", "content": system}] if system and render else []
    history = ""
    for line in lines:
        text = line.rstrip("\n")
        if echo:
            write(f"> {text}\n")
        if text.strip() in ("/quit", "/exit"):
            return
        if text.strip() == "/reset":
            messages, history = messages[:1] if system and render else [], ""
            write("(history cleared)\n")
            continue
        if text.strip() == "/help":
            write("type a line and press enter; /reset forgets the conversation, /quit ends\n")
            continue
        if render is not None:
            messages.append({"role": "user", "content": text})
            try:
                prompt = render(messages)
            except RequestError as e:  # the template refused this conversation: say so, keep the session
                messages.pop()
                write(f"(the chat template refused this turn: {e})\n")
                continue
        else:
            history += text + "\n"
            prompt = history
        ids = engine.tokenizer.encode(prompt).ids
        if len(ids) > room:
            write(f"(the conversation is past the {engine.config.max_model_len}-token context: its oldest "
                  f"{len(ids) - room} tokens are dropped)\n")  # fmt: skip
            ids = ids[-room:]
        reply = ""
        for out in llm.stream([ids], params):
            reply += out.text
            write(out.text)
        write("\n")
        if render is not None:
            messages.append({"role": "assistant", "content": reply})
        else:
            history += reply + "\n"


def _stdin_lines(prompt: str) -> Iterator[str]:
    """Lines typed at a prompt (a terminal) or read from a pipe; ends at end of input."""
    interactive = sys.stdin.isatty()
    while True:
        try:
            yield input(prompt) if interactive else next(sys.stdin)
        except (EOFError, StopIteration):
            return


def run_chat(args: argparse.Namespace) -> None:
    model, tokenizer, loaded = _model_and_tokenizer(args.model_dir, args.dtype, args.tokenizer, args.preset)
    template = None
    if args.model_dir is not None and args.mode != "completion":
        source = load_chat_template(find_model_dir(args.model_dir))
        if source is not None:  # compiled in the sandbox; a malformed one fails here, in words
            template = ChatTemplate(source, f"the chat_template of {args.model_dir}")
    if args.mode == "chat" and template is None:
        raise HylaError("--mode chat needs a chat_template in the model directory's tokenizer_config.json")
    context = min(model.config.max_position_embeddings, args.context)
    if args.max_tokens >= context:
        raise HylaError(f"--max-tokens ({args.max_tokens}) must be below the context ({context})")
    llm = LLM(model, tokenizer, EngineConfig(max_num_seqs=1, max_model_len=context))
    mode = "chat" if template else "completion: each line is appended to the text so far and continued"
    print(f"{loaded}; {mode}; /reset forgets, /quit ends", file=sys.stderr, flush=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat(llm, _sampling(args), _stdin_lines("> "), write, template, args.system, echo=not sys.stdin.isatty())


# -- train -----------------------------------------------------------------------------------------------------


def _samples(model: HylaForCausalLM, tokenizer: Tokenizer, seed: int) -> list[str]:
    """A continuation of each of :data:`SAMPLE_PROMPTS` (temperature 0.6, top-p 0.95, seeded)."""
    llm = LLM(model.eval(), tokenizer, EngineConfig(max_num_seqs=len(SAMPLE_PROMPTS), max_model_len=512))
    params = SamplingParams(max_tokens=80, temperature=0.6, top_p=0.95, seed=seed)
    return [p + c[0].text for p, c in zip(SAMPLE_PROMPTS, llm.generate(list(SAMPLE_PROMPTS), params), strict=True)]


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """A TOML file's fields, then the flags given, then preset overrides from ``--set``; with ``--resume``, the
    run's own config (its ``train.json``) with what of those a resumed run may change."""
    fields = load_train_toml(args.config) if args.config else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    fields.update({k: v for k, v in given.items() if v is not None})
    overrides = fields.pop("model", {})
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise HylaError(f"--set takes FIELD=VALUE, got {item!r}")
        overrides[name] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    if args.resume:
        run_dir = fields.pop("run_dir", TrainConfig.run_dir)
        return resume_config(run_dir, {**fields, "model": overrides} if overrides else fields)
    return TrainConfig(**fields, model=overrides)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by the first SIGINT or SIGTERM (training stops after the step); a second one stops at once."""
    stop = threading.Event()
    main = int(os.environ.get("RANK", "0")) == 0

    def on_signal(signum: int, frame) -> None:
        if main:
            print(f"\nhyla: {signal.Signals(signum).name}: stopping after this step (again to stop at once)",
                  file=sys.stderr, flush=True)  # fmt: skip
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_train(args: argparse.Namespace) -> int:
    """``hyla train``: Ctrl-C or SIGTERM stops at the end of the step, saves a checkpoint and says how to resume."""
    cfg = _train_config(args)
    with _stop_on_signals() as stop:
        metrics = train(cfg, resume=args.resume, overwrite=args.overwrite, stop=stop, sampler=_samples)
    if int(os.environ.get("RANK", "0")) == 0:
        print(_train_summary(cfg, metrics))
    return 130 if metrics.get("interrupted") else 0


def run_sweep(args: argparse.Namespace) -> int:
    """``hyla sweep``: a grid of runs; Ctrl-C stops after the step, the same command continues."""
    from hyla.train import sweep

    with _stop_on_signals() as stop:
        rows = sweep.sweep(args.grid, args.out, stop, log=lambda line: print(line, flush=True))
    if stop.is_set():
        return 130
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    out = Path(args.out)
    fits = {} if "mqar" in rows[0] else sweep.fit_families(rows)
    print(f"\n{sweep.table(rows)}\n\nwrote {out / 'sweep.json'} and {sweep.plot(rows, out / 'sweep.png', fits)}")
    if fits:
        (out / "fits.json").write_text(json.dumps(fits, indent=1) + "\n")
        for pattern, law in fits.items():
            ci = {p: "[{:.3g}, {:.3g}]".format(*law["intervals"][p]) for p in ("E", "alpha", "beta")}
            print(f"{pattern}: L = {law['E']:.3f} {ci['E']} + {law['A']:.3g}/N^{law['alpha']:.3f} {ci['alpha']} "
                  f"+ {law['B']:.3g}/D^{law['beta']:.3f} {ci['beta']} ({law['runs']} runs)")  # fmt: skip
            if not law["floor_identified"]:
                print(f"  {pattern}: the fitted floor E is at its bound (0): these runs are too far from convergence "
                      "to identify it, so the law and its frontier extrapolate; train longer or larger")  # fmt: skip
        print(f"wrote {out / 'fits.json'} (the laws, 95% bootstrap intervals and compute-optimal N, D per decade)")
    return 0


def _train_summary(cfg: TrainConfig, m: dict) -> str:
    """What a run did, where its model is, and the commands that come next."""
    run = cfg.run_dir
    if m.get("already_finished"):
        return (f"{run} already finished its {m['step']} steps: nothing to do. To train it further, raise --steps "
                f"(hyla train --run-dir {run} --resume --steps {2 * m['step']}), or start a new run with another "
                "--run-dir.")  # fmt: skip
    lines = [f"--- sample ---\n{text}" for text in m.get("samples", [])]
    if m.get("interrupted") and "held_out_loss" not in m:
        lines.append(f"interrupted at step {m['step']}; checkpoint saved; resume with: "
                     f"hyla train --run-dir {shlex.quote(str(run))} --resume")  # fmt: skip
        return "\n".join(lines)
    if "held_out_loss" in m:
        verdict = "learned" if m["learned"] else "not yet learned: the bar is 0.6"
        scope = (f"all {m['held_out_tokens']:,} held-out tokens" if m["held_out_complete"] else
                 f"the first {m['held_out_tokens']:,} held-out tokens (evaluation interrupted)")  # fmt: skip
        lines.append(f"held-out loss {m['held_out_loss']:.3f} nats/token over {scope} = {m['ratio']:.3f} x the "
                     f"unigram entropy ({m['unigram_entropy']:.3f}) — {verdict}")  # fmt: skip
    lines += [
        f"model: {m.get('model_dir', Path(run) / 'checkpoint' / 'model')}  (report: {Path(run) / 'report.json'}, "
        f"curve: {Path(run) / 'loss.png'}, every step: {Path(run) / 'metrics.jsonl'})",
        "next:",
        f'  hyla generate {run} --prompt "def fibonacci(n):"',
        f"  hyla chat {run}",
        f"  hyla serve {run}",
    ]
    return "\n".join(lines)


# -- serve -----------------------------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> None:
    """``hyla serve``: the first SIGINT or SIGTERM starts a graceful shutdown, a second one stops at once."""
    from hyla.serve.api import serve

    stop = threading.Event()

    def on_signal(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        print(f"hyla: {name}: shutting down (no new requests; running ones have {args.shutdown_timeout:g} s to "
              f"finish; {name} again to stop now)", file=sys.stderr, flush=True)  # fmt: skip
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    config = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    server = ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)})
    server.api_key = server.api_key or os.environ.get(API_KEY_ENV) or None
    server.served_model_name = server.served_model_name or Path(args.model_dir).resolve().name
    dtype, dtype_text = resolve_dtype(args.dtype, args.device)
    try:
        serve(str(find_model_dir(args.model_dir)), stop, server, config, dtype, args.device, args.tokenizer,
              log=lambda line: print(line, file=sys.stderr, flush=True), dtype_text=dtype_text)  # fmt: skip
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- export ----------------------------------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> None:
    """``hyla export``: the model as a GGUF file that llama.cpp runs."""
    from hyla.interop.gguf import export_gguf

    path = find_model_dir(args.model_dir)
    output = Path(args.output or Path(args.model_dir) / f"{Path(args.model_dir).resolve().name}-{args.outtype}.gguf")
    tokenizer = load_tokenizer(args.tokenizer or path)
    template = load_chat_template(path)
    model = load(path)
    start = time.perf_counter()
    kept = export_gguf(model, tokenizer, output, args.outtype, Path(args.model_dir).resolve().name,
                       template or DEFAULT_CHAT_TEMPLATE, args.overwrite)  # fmt: skip
    size = output.stat().st_size / 2**20
    print(f"wrote {output} ({size:.1f} MiB, {args.outtype}, {time.perf_counter() - start:.1f} s)")
    if kept:
        print(f"kept in float32 (rows not a whole number of {args.outtype} blocks): {', '.join(kept)}")
    print(f"run it with llama.cpp: llama-server -m {output}   or   llama-cli -m {output} -p 'def '")


# -- eval ------------------------------------------------------------------------------------------------------


def run_eval(args: argparse.Namespace) -> None:
    """``hyla eval mqar|passkey|loss``: print the table, write JSON and PNG beside the model."""
    from hyla import eval as evaluation
    from hyla.data.corpus import discover

    model, tokenizer, loaded = _model_and_tokenizer(args.model_dir, args.dtype, args.tokenizer)
    name = Path(args.model_dir).resolve().name
    print(loaded, file=sys.stderr)
    start = time.perf_counter()
    if args.task == "loss":
        run = Path(args.model_dir) / "train.json"
        held_out = json.loads(run.read_text()).get("eval_fraction") if run.is_file() and not args.all else None
        docs, split = evaluation.document_ids(discover(args.data), tokenizer, held_out, args.documents, args.context)
        result = evaluation.loss_by_position(model, docs, split)
        title = f"{name}: loss by position ({result.documents} {split} documents)"
    else:
        # Room for the answer after the longest prompt; default lengths are those that fit the model's context.
        limit = model.config.max_position_embeddings - ANSWER_ROOM
        if args.lengths is None:
            defaults = EVAL_LENGTHS[args.task]
            args.lengths = [n for n in defaults if n <= limit] or [min(defaults)]
        context = min(max(args.lengths) + ANSWER_ROOM, model.config.max_position_embeddings)
        llm = LLM(model, tokenizer, EngineConfig(max_model_len=context))
        if args.task == "mqar":
            result = evaluation.mqar(llm, args.lengths, args.pairs, args.contexts, args.queries, args.seed)
        else:
            result = evaluation.passkey(llm, args.lengths, args.depths, args.trials, args.seed)
        title = f"{name}: {args.task} accuracy (chance {result.chance:.2g})"
    print(f"{title}\n\n{result.table()}\n")
    files = evaluation.save(result, args.out or Path(args.model_dir) / "eval", args.task, title)
    print(f"wrote {files[0]} and {files[1]} ({time.perf_counter() - start:.0f} s)")


# Default context lengths of `hyla eval mqar|passkey`, and the tokens kept free after a prompt for its answer.
EVAL_LENGTHS = {"mqar": [64, 128, 256, 512], "passkey": [256, 512, 1024, 2048]}
ANSWER_ROOM = 16


# -- bench -----------------------------------------------------------------------------------------------------


def run_bench_context(args: argparse.Namespace) -> None:
    from hyla.bench import context

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise HylaError("--device cuda, but no CUDA device is available")
    lengths = args.lengths or [2**i for i in (range(12, 18) if cuda else range(10, 17))]
    if args.hidden % args.heads:
        raise HylaError(f"--heads ({args.heads}) must divide --hidden ({args.hidden})")
    out = Path(args.out or f"hyla-bench/context-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}")
    context.main(lengths, args.device, args.dtype or ("bfloat16" if cuda else "float32"), args.hidden,
                 args.heads, args.repeats, not args.no_backward, out, args.append_results)  # fmt: skip


def run_bench_serve(args: argparse.Namespace) -> None:
    from hyla.bench import serve as bench_serve

    if min(args.concurrency) < 1 or args.input_len < 1 or args.output_len < 1:
        raise HylaError("--concurrency, --input-len and --output-len must be >= 1")
    bench_serve.main(args.url, args.concurrency, args.requests, args.input_len, args.output_len,
                     args.price_per_hour, args.api_key, args.workload, args.turns, args.system_words,
                     args.user_words)  # fmt: skip


# -- the parser ------------------------------------------------------------------------------------------------


MODEL_DIR_HELP = "a model directory or a `hyla train` run directory"


def _add_tokenizer_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="a tokenizer.json (default: the model directory's)")  # fmt: skip


def _add_dtype_arg(parser: argparse.ArgumentParser, gpu: bool = False) -> None:
    gpu_text = "bfloat16 on a GPU; " if gpu else ""
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help=f"auto: {gpu_text}on a CPU with AMX/AVX512-BF16 the faster of bfloat16 and float32 "
                        "(measured once per machine), else float32")  # fmt: skip


def _add_model_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("model_dir", nargs="?", default=None, help=f"{MODEL_DIR_HELP} (default: a random {what})")
    parser.add_argument("--preset", default="small", help="the random model's preset without a directory")
    _add_tokenizer_arg(parser)
    _add_dtype_arg(parser)


# Flag types of config fields, by their annotation.
_FLAG_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}


def _add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    only: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    choices: dict[str, list] | None = None,
    given_only: bool = False,
) -> None:
    """A flag per field of config dataclass ``cls`` (``--max-num-seqs`` for ``max_num_seqs``), its help from the
    field's ``metadata["help"]`` and its default the field's; ``given_only``: every default None (so a value
    given is told from one not given). Fields of other types (dicts, tuples) get no flag."""
    for f in dataclasses.fields(cls):
        if (only and f.name not in only) or f.name in skip or "help" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kind: dict = {"action": argparse.BooleanOptionalAction} if f.type == "bool" else {"type": _FLAG_TYPES[f.type]}
        if choices and f.name in choices:
            kind["choices"] = choices[f.name]
        parser.add_argument(f"--{f.name.replace('_', '-')}", **kind, default=None if given_only else default,
                            help=f.metadata["help"] if "(default:" in f.metadata["help"] else
                            f"{f.metadata['help']} (default: {default})")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="hyla", description=__doc__, formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tr = commands.add_parser("train", help="train a model (default: the 2.3M demo on the Python standard library)",
                             description="Train a model. With no flags: the main job, a 2.3M-parameter code model "
                             "on this Python's standard library (10-12 minutes on 2 CPU cores), into runs/default. "
                             "A run directory is never replaced by accident: continue it with --resume or "
                             "replace it with --overwrite.")  # fmt: skip
    # Defaults None: not given, so that a --config file's value (or the dataclass default) applies.
    _add_config_flags(tr, TrainConfig, given_only=True)
    tr.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a field of the model preset, e.g. --set hidden_size=256 (repeatable)")  # fmt: skip
    tr.add_argument("--config", default=None, metavar="FILE.toml",
                    help="the run's fields from a TOML file ([model]: preset changes); flags override it")  # fmt: skip
    tr.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace the run in --run-dir, deleting its files")

    sw = commands.add_parser("sweep", help="train a grid of runs: layer patterns x depths x budgets",
                             description="Train every cell of a grid file (TOML: [base] run fields, [model] "
                             "model fields, [grid] pattern = [softmax, lightning, hybrid:N], depth = [...], steps = "
                             "[...], optional width; optional [task] name = \"mqar\" to train on recall; see "
                             "hyla/train/sweep.py) as a `hyla train` run under OUT/runs, skipping finished runs and "
                             "resuming interrupted ones (under torchrun each run trains sharded); prints a table "
                             "and writes OUT/sweep.json, OUT/sweep.png and, with five runs of a pattern, "
                             "OUT/fits.json.")  # fmt: skip
    sw.add_argument("grid", help="the grid file (TOML)")
    sw.add_argument("--out", required=True, help="the sweep's directory (runs, tokenizer, results)")

    gen = commands.add_parser("generate", help="continue a prompt with a model",
                              description="Stream a continuation of a prompt, then print the prefill and decode "
                              "speed.")  # fmt: skip
    _add_model_args(gen, "preset")
    gen.add_argument("--prompt", default="def fibonacci(n):\n", help="the text to continue")
    _add_sampling(gen, max_tokens=64, temperature=0.8)

    ch = commands.add_parser("chat", help="talk to a model, turn by turn, in the terminal",
                             description="An interactive prompt on a model: each line you type is a turn, the "
                             "reply streams back, the conversation is kept. With a chat template in the model "
                             "directory the turns are chat messages; without one (a code model, like the demo) "
                             "each line is added to the text so far and continued. /reset forgets, /quit ends; "
                             "input can be piped.")  # fmt: skip
    _add_model_args(ch, "preset")
    ch.add_argument("--mode", choices=["auto", "chat", "completion"], default="auto",
                    help="auto: chat if the model has a chat template, else completion")  # fmt: skip
    ch.add_argument("--system", default=None, help="a system message (chat mode)")
    ch.add_argument("--context", type=int, default=4096, help="tokens of conversation kept (default: 4096)")
    _add_sampling(ch, max_tokens=128, temperature=0.7)

    srv = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a model directory (or a run directory's model) with continuous "
                              "batching behind /v1/completions, /v1/chat/completions, /v1/models, /health and "
                              "/metrics. SIGINT/SIGTERM shut it down gracefully.")  # fmt: skip
    srv.add_argument("model_dir", help=MODEL_DIR_HELP)
    _add_config_flags(srv, ServerConfig, only=("host", "port", "api_key", "served_model_name"))
    _add_tokenizer_arg(srv)
    _add_dtype_arg(srv, gpu=True)
    srv.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    _add_config_flags(srv, EngineConfig, choices={"quantize": [q for q in QUANTIZE if q]})
    _add_config_flags(srv, ServerConfig, skip=("host", "port", "api_key", "served_model_name"))

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
    _add_tokenizer_arg(ex)
    ex.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")

    ev = commands.add_parser("eval", help="measure recall from context (mqar, passkey) and loss by position",
                             description="Evaluate a model directory (or a run directory's model): `mqar` (multi-query "
                             "associative recall: key-value pairs, filler, a key asked again; accuracy by length "
                             "and pairs), `passkey` (a number hidden at a depth of filler text; accuracy by length "
                             "and depth), `loss` (held-out loss by token position: does more context help?). "
                             "Prints a table and writes TASK.json and TASK.png into --out (replacing the previous "
                             "ones of the same task).")  # fmt: skip
    tasks = ev.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, what in (("mqar", "multi-query associative recall"), ("passkey", "a number hidden in filler text"),
                       ("loss", "held-out loss by token position")):  # fmt: skip
        t = tasks.add_parser(task, help=what, description=what)
        t.add_argument("model_dir", help=MODEL_DIR_HELP)
        _add_tokenizer_arg(t)
        _add_dtype_arg(t)
        t.add_argument("--out", default=None, metavar="DIR", help="where TASK.json and TASK.png go (default: "
                       "MODEL_DIR/eval)")  # fmt: skip
        t.add_argument("--seed", type=int, default=0, help="the random tasks' seed (default: 0)")
        if task == "mqar":
            t.add_argument("--lengths", type=int, nargs="+", default=None,
                           help="context lengths in tokens (default: 64 128 256 512, those the model's context "
                           "holds)")  # fmt: skip
            t.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16],
                           help="key-value pairs per context (default: 4 8 16)")  # fmt: skip
            t.add_argument("--contexts", type=int, default=8, help="random contexts per cell (default: 8)")
            t.add_argument("--queries", type=int, default=4, help="keys asked per context (default: 4)")
        elif task == "passkey":
            t.add_argument("--lengths", type=int, nargs="+", default=None,
                           help="context lengths in tokens (default: 256 512 1024 2048, those the model's context "
                           "holds)")  # fmt: skip
            t.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                           help="where the key sits, 0 (start) to 1 (end) (default: 0 0.25 0.5 0.75 1)")  # fmt: skip
            t.add_argument("--trials", type=int, default=4, help="random keys per cell (default: 4)")
        else:
            t.add_argument("--data", default=None, help="a folder or file of text (default: this Python's stdlib)")
            t.add_argument("--context", type=int, default=1024, help="tokens read per document (default: 1024)")
            t.add_argument("--documents", type=int, default=200, help="documents read at most (default: 200)")
            t.add_argument("--all", action="store_true",
                           help="use every document, not only a run's held-out ones")  # fmt: skip

    bench = commands.add_parser("bench", help="measure speed: attention scaling, a server under load",
                                description="Benchmarks: `hyla bench context` (lightning vs softmax attention "
                                "across context lengths), `hyla bench serve` (a server under load).")  # fmt: skip
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    ctx = benches.add_parser("context", help="lightning vs softmax attention across context lengths",
                             description="Time one lightning layer, its kernel and softmax attention from 1k to 64k "
                             "tokens; print a table and write it, with its plot, into --out.")  # fmt: skip
    ctx.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
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
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, but an unknown option is reported by the subcommand's own parser (its usage, not the
    top-level one) with the closest option it has."""
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    command = parser
    while True:  # the deepest subcommand chosen: hyla bench serve, hyla eval passkey, ...
        sub = next((a for a in command._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, sub.dest, None) not in sub.choices:
            break
        command = sub.choices[getattr(args, sub.dest)]
    options = [o for action in command._actions for o in action.option_strings]
    hints = [f"{e} -> {close[0]}" for e in extras if e.startswith("-")
             for close in [difflib.get_close_matches(e.split("=")[0], options, n=1, cutoff=0.6)] if close]  # fmt: skip
    command.error(f"unrecognized arguments: {' '.join(extras)}" + (f" (did you mean: {'; '.join(hints)}?)"
                                                                  if hints else ""))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    tune_malloc()
    commands: dict[str, Callable[[argparse.Namespace], int | None]] = {
        "generate": run_generate,
        "chat": run_chat,
        "serve": run_serve,
        "train": run_train,
        "export": run_export,
        "eval": run_eval,
        "sweep": run_sweep,
        "context": run_bench_context,
        "serve-bench": run_bench_serve,
    }
    name = "serve-bench" if args.command == "bench" and args.bench == "serve" else getattr(args, "bench", None)
    try:
        return commands[name or args.command](args) or 0
    except (HylaError, ValueError) as e:
        print(f"hyla: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nhyla: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
