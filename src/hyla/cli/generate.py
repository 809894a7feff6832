"""``hyla generate`` (continue a prompt) and ``hyla chat`` (a conversation in the terminal)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from hyla.cli.common import add_model_args, load_for_generation

if TYPE_CHECKING:
    from hyla.data.tokenizer import ChatTemplate
    from hyla.serve import LLM, SamplingParams


def add_parsers(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser("generate", help="continue a prompt with a model",
                              description="Stream a continuation of a prompt, then print the prefill and decode "
                              "speed.")  # fmt: skip
    add_model_args(gen)
    gen.add_argument("--prompt", default="def fibonacci(n):\n", help="the text to continue")
    _add_sampling(gen, max_tokens=64, temperature=0.8)
    gen.set_defaults(run=run_generate)

    ch = commands.add_parser("chat", help="talk to a model, turn by turn, in the terminal",
                             description="An interactive prompt on a model: each line you type is a turn, the "
                             "reply streams back, the conversation is kept. With a chat template in the model "
                             "directory the turns are chat messages; without one (a code model, like the demo) "
                             "each line is added to the text so far and continued. /reset forgets, /quit ends; "
                             "input can be piped (each turn is then echoed before its reply).")  # fmt: skip
    add_model_args(ch)
    ch.add_argument("--mode", choices=["auto", "chat", "completion"], default="auto",
                    help="auto: chat if the model has a chat template, else completion")  # fmt: skip
    ch.add_argument("--system", default=None, help="a system message (chat mode)")
    ch.add_argument("--context", type=int, default=4096, help="tokens of conversation kept (default: 4096)")
    _add_sampling(ch, max_tokens=128, temperature=0.7)
    ch.set_defaults(run=run_chat)


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
    group.add_argument("--speculative", choices=["ngram"], default=None,
                       help="ngram: draft tokens from the text so far and verify them in one step (the same "
                       "distribution; faster where the text repeats itself)")  # fmt: skip
    group.add_argument("--num-draft-tokens", type=int, default=32, help="speculative: tokens drafted at most; a "
                       "request starts at 4 and doubles while all are kept (default: %(default)s)")  # fmt: skip


def _engine_config(args: argparse.Namespace, context: int):
    """One request at a time, with ``--speculative`` if given."""
    from hyla.serve import EngineConfig

    return EngineConfig(max_num_seqs=1, max_model_len=context, speculative=args.speculative,
                        num_draft_tokens=args.num_draft_tokens)  # fmt: skip


def _sampling(args: argparse.Namespace) -> SamplingParams:
    from hyla.serve import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)  # fmt: skip


def run_generate(args: argparse.Namespace) -> None:
    """Stream a continuation of ``--prompt``, then report prefill and decode speed."""
    import torch

    from hyla.serve import LLM

    torch.manual_seed(args.seed)
    loaded, line = load_for_generation(args, args.preset)
    context = min(loaded.model.config.max_position_embeddings, 4096)
    llm = LLM(loaded.model, loaded.tokenizer, _engine_config(args, context))
    print(line, file=sys.stderr)
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    first, first_count, count = None, 0, 0
    for out in llm.stream([args.prompt], _sampling(args)):
        count += len(out.token_ids)
        if first is None:
            first, first_count = time.perf_counter(), count
        print(out.text, end="", flush=True)
    end = time.perf_counter()
    print()
    decode = f", decode {(count - first_count) / (end - first):.1f} tok/s" if count > first_count else ""
    stats = llm.engine.stats
    if stats.draft_tokens:
        decode += f" (speculative: {stats.accepted_tokens} of {stats.draft_tokens} drafted tokens accepted)"
    prompt_tokens = len(loaded.tokenizer.encode(args.prompt).ids)
    print(f"# prompt {prompt_tokens} tokens, prefill {(first - start) * 1e3:.0f} ms; generated {count} tokens{decode}",
          file=sys.stderr)  # fmt: skip


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
    from hyla.errors import RequestError

    engine = llm.engine
    room = engine.config.max_model_len - (params.max_tokens or 0) - 1
    messages: list[dict] = [{"role": "system", "content": system}] if system and template else []
    history = ""
    for line in lines:
        text = line.rstrip("\n")
        if echo:
            write(f"> {text}\n")
        if text.strip() in ("/quit", "/exit"):
            return
        if text.strip() == "/reset":
            messages, history = messages[:1] if system and template else [], ""
            write("(history cleared)\n")
            continue
        if text.strip() == "/help":
            write("type a line and press enter; /reset forgets the conversation, /quit ends\n")
            continue
        if template is not None:
            messages.append({"role": "user", "content": text})
            try:
                prompt = template.render(messages)
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
        if template is not None:
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
    from hyla.errors import ConfigError
    from hyla.serve import LLM

    loaded, line = load_for_generation(args, args.preset)
    template = loaded.chat_template if args.mode != "completion" else None
    if args.mode == "chat" and template is None:
        raise ConfigError("--mode chat needs a chat_template in the model directory's tokenizer_config.json")
    context = min(loaded.model.config.max_position_embeddings, args.context)
    if args.max_tokens >= context:
        raise ConfigError(f"--max-tokens ({args.max_tokens}) must be below the context ({context})")
    llm = LLM(loaded.model, loaded.tokenizer, _engine_config(args, context))
    mode = "chat" if template else "completion: each line is appended to the text so far and continued"
    print(f"{line}; {mode}; /reset forgets, /quit ends", file=sys.stderr, flush=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat(llm, _sampling(args), _stdin_lines("> "), write, template, args.system, echo=not sys.stdin.isatty())
