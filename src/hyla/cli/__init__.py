"""hyla: train, run, chat with and serve hybrid lightning-attention language models on your own machine.

Start with `hyla train` (a small code model on this Python's standard library, 10-12 minutes on 2 cores), then
`hyla chat runs/default`, `hyla generate runs/default` or `hyla serve runs/default`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

# Each command's module (hyla.cli.NAME, with add_parsers() and the command's run function) and its line in
# `hyla --help`. Only the chosen command's module is imported: `hyla --help` loads neither torch nor a server.
COMMANDS = {
    "train": ("train", "train a model (default: the 2.3M demo on the Python standard library)"),
    "sweep": ("sweep", "train a grid of runs: layer patterns x depths x budgets"),
    "generate": ("generate", "continue a prompt with a model"),
    "chat": ("generate", "talk to a model, turn by turn, in the terminal"),
    "serve": ("serve", "serve a model over an OpenAI-compatible HTTP API"),
    "export": ("export", "write a model as a GGUF file for llama.cpp"),
    "eval": ("eval", "measure recall from context (mqar, passkey) and loss by position"),
    "bench": ("bench", "measure speed: attention scaling, a server under load"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``hyla`` parser: every command in full, or with ``command`` only that one (the others by name and
    help line, which is all ``hyla --help`` shows; ``""``: none in full)."""
    parser = argparse.ArgumentParser(prog="hyla", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    full = {m for m, _ in COMMANDS.values()} if command is None else {COMMANDS[command][0]} if command else set()
    for name, (module, help_line) in COMMANDS.items():
        if module not in full:
            commands.add_parser(name, help=help_line)
        elif not any(c == name for c in commands.choices):  # (a module adds all of its commands at once)
            importlib.import_module(f"hyla.cli.{module}").add_parsers(commands)
    # (one module may add several commands, in its own order: put them back in the order of COMMANDS)
    commands._choices_actions.sort(key=lambda action: list(COMMANDS).index(action.dest))
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse with only the chosen command's parser built; an unknown option is reported by the subcommand's own
    parser (its usage, not the top-level one) with the closest option it has."""
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else "")  # "": every command by name only
    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    chosen = parser
    while True:  # the deepest subcommand chosen: hyla bench serve, hyla eval passkey, ...
        sub = next((a for a in chosen._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, sub.dest, None) not in sub.choices:
            break
        chosen = sub.choices[getattr(args, sub.dest)]
    options = [o for action in chosen._actions for o in action.option_strings]
    hints = [f"{e} -> {close[0]}" for e in extras if e.startswith("-")
             for close in [difflib.get_close_matches(e.split("=")[0], options, n=1, cutoff=0.6)] if close]  # fmt: skip
    chosen.error(f"unrecognized arguments: {' '.join(extras)}" + (f" (did you mean: {'; '.join(hints)}?)"
                                                                 if hints else ""))  # fmt: skip
    raise AssertionError("unreachable: argparse's error() exits")


def main(argv: list[str] | None = None) -> int:
    """The ``hyla`` command. A :class:`~hyla.errors.HylaError` (a mistake in what was given) is one line and exit
    status 2; anything else is a bug in hyla and keeps its traceback."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    from hyla.errors import HylaError
    from hyla.runtime import tune_malloc

    tune_malloc()
    try:
        return args.run(args) or 0
    except HylaError as e:
        print(f"hyla: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nhyla: interrupted", file=sys.stderr)
        return 130
