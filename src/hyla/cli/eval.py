"""``hyla eval mqar|passkey|loss``: recall from context and loss by position, a table, JSON and a plot."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hyla.cli.common import MODEL_DIR_HELP, add_dtype_arg, add_tokenizer_arg, load_for_generation

# Default context lengths of `hyla eval mqar|passkey`, and the tokens kept free after a prompt for its answer.
EVAL_LENGTHS = {"mqar": [64, 128, 256, 512], "passkey": [256, 512, 1024, 2048]}
ANSWER_ROOM = 16


def add_parsers(commands: argparse._SubParsersAction) -> None:
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
        add_tokenizer_arg(t)
        add_dtype_arg(t)
        t.add_argument("--out", default=None, metavar="DIR", help="where TASK.json and TASK.png go (default: "
                       "MODEL_DIR/eval)")  # fmt: skip
        t.add_argument("--seed", type=int, default=0, help="the random tasks' seed (default: 0)")
        if task in EVAL_LENGTHS:
            defaults = " ".join(map(str, EVAL_LENGTHS[task]))
            t.add_argument("--lengths", type=int, nargs="+", default=None,
                           help=f"context lengths in tokens (default: {defaults}, those the model's context "
                           "holds)")  # fmt: skip
        if task == "mqar":
            t.add_argument("--pairs", type=int, nargs="+", default=[4, 8, 16],
                           help="key-value pairs per context (default: 4 8 16)")  # fmt: skip
            t.add_argument("--contexts", type=int, default=8, help="random contexts per cell (default: 8)")
            t.add_argument("--queries", type=int, default=4, help="keys asked per context (default: 4)")
        elif task == "passkey":
            t.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                           help="where the key sits, 0 (start) to 1 (end) (default: 0 0.25 0.5 0.75 1)")  # fmt: skip
            t.add_argument("--trials", type=int, default=4, help="random keys per cell (default: 4)")
        else:
            t.add_argument("--data", default=None, help="a folder or file of text (default: this Python's stdlib)")
            t.add_argument("--context", type=int, default=1024, help="tokens read per document (default: 1024)")
            t.add_argument("--documents", type=int, default=200, help="documents read at most (default: 200)")
            t.add_argument("--all", action="store_true",
                           help="use every document, not only a run's held-out ones")  # fmt: skip
        t.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    """``hyla eval mqar|passkey|loss``: print the table, write JSON and PNG beside the model."""
    from hyla import eval as evaluation
    from hyla.data.corpus import discover
    from hyla.serve import LLM, EngineConfig

    loaded, line = load_for_generation(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    name = Path(args.model_dir).resolve().name
    print(line, file=sys.stderr)
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
