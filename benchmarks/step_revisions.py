"""Whole decode steps at two git revisions of hyla, alternating processes on one machine.

Some changes cannot be switched inside one process (how a compiled graph reaches its kernels, which operators it
holds): this benchmark checks each revision out into a temporary worktree and, round by round, starts one process
per revision (the order alternating) that builds an engine on the same random weights of each preset (vocab 8192;
float32 or ``--quantize int8``; eager or ``--compile``, its compile before the timing) and times
:func:`hyla.bench.decode_step_ms` of ``--requests`` requests together (``one_request_step_ms`` at revisions before
it, one request) three times (the median of them, each the median of 20 steps). A process's
first step batch pays nothing of the build: the engine compiles its graphs when it is made. Reported: the median
over ``--rounds`` rounds per revision and preset.

Usage: python benchmarks/step_revisions.py REV_BEFORE [REV_AFTER (default: the working tree)] [--preset small medium]
       [--quantize int8] [--compile] [--requests 1] [--rounds 3] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hyla.bench import append_result, machine_description

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parent.parent
WORKING_TREE = "working tree"

# Run by each process, with the revision's src/ first on the path: prints {preset: ms}.
CHILD = """
import json, statistics, sys, torch, hyla
import hyla.bench
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.runtime import tune_malloc
from hyla.serve import EngineConfig
from hyla.serve.engine import LLMEngine
presets, quantize, compile, requests = json.loads(sys.argv[1])
several = hasattr(hyla.bench, "decode_step_ms")  # (older revisions: one_request_step_ms, one request only)
assert requests == 1 or several, "this revision times one request only"
step_ms = hyla.bench.decode_step_ms if several else hyla.bench.one_request_step_ms
assert hyla.__file__.startswith(sys.argv[2]), f"hyla imported from {hyla.__file__}, not {sys.argv[2]}"
tune_malloc()
out = {}
for preset in presets:
    torch.manual_seed(0)
    model = hyla.HylaForCausalLM(hyla.preset(preset).replace(vocab_size=8192)).eval()
    config = EngineConfig(max_num_seqs=max(4, requests), max_model_len=2048, compile=compile, quantize=quantize)
    engine = LLMEngine(model, byte_level_tokenizer(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        args = (requests,) if requests > 1 else ()
        out[preset] = statistics.median(step_ms(engine, generator, *args) for _ in range(3))
print(json.dumps(out))
"""


def source_dir(revision: str, scratch: Path) -> Path:
    """The ``src`` directory of ``revision`` (a worktree under ``scratch``), or of the working tree."""
    if revision == WORKING_TREE:
        return ROOT / "src"
    tree = scratch / revision.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    return tree / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="a git revision")
    parser.add_argument("after", nargs="?", default=WORKING_TREE, help="a git revision (default: the working tree)")
    parser.add_argument("--preset", nargs="+", default=["small", "medium"], choices=["small", "medium"])
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--compile", action="store_true", help="compiled decode steps (the engine's --compile)")
    parser.add_argument("--requests", type=int, default=1, help="requests decoding together in each step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    revisions = [args.before, args.after]
    times: dict[str, dict[str, list[float]]] = {r: {p: [] for p in args.preset} for r in revisions}
    with tempfile.TemporaryDirectory() as scratch:
        sources = {r: source_dir(r, Path(scratch)) for r in revisions}
        try:
            for round_ in range(args.rounds):
                for revision in revisions if round_ % 2 == 0 else revisions[::-1]:
                    src = str(sources[revision])
                    config = json.dumps([args.preset, args.quantize, args.compile, args.requests])
                    env = {**os.environ, "PYTHONPATH": src}
                    run = subprocess.run([sys.executable, "-c", CHILD, config, src], env=env, capture_output=True,
                                         text=True)  # fmt: skip
                    if run.returncode:
                        sys.exit(f"{revision}'s process failed:\n{run.stderr[-3000:]}")
                    for preset, ms in json.loads(run.stdout.splitlines()[-1]).items():
                        times[revision][preset].append(ms)
                    print(f"round {round_ + 1} {revision}: {times[revision]}", flush=True)
        finally:
            for revision in revisions:
                if revision != WORKING_TREE:
                    subprocess.run(["git", "worktree", "remove", "--force", str(sources[revision].parent)], cwd=ROOT,
                                   check=False, capture_output=True)  # fmt: skip
    lines = [f"| preset | {args.before} ms | {args.after} ms | speed-up | rounds (ms) |", "|---|---|---|---|---|"]
    for preset in args.preset:
        before, after = (statistics.median(times[r][preset]) for r in revisions)
        rounds = "; ".join(f"{r}: " + ", ".join(f"{t:.2f}" for t in times[r][preset]) for r in revisions)
        lines.append(f"| {preset} | {before:.2f} | {after:.2f} | {before / after:.2f}x | {rounds} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        what = f"{args.quantize or 'float32'}, {'compiled' if args.compile else 'eager'}"
        who = "one request" if args.requests == 1 else f"{args.requests} requests together"
        preamble = (f"Machine: {machine_description()}. A decode step of {who} ({what}), random weights "
                    f"(vocab 8192); per round one process per revision (alternating order), each the median of 3 "
                    f"timings of the median of 20 steps; medians over {args.rounds} rounds.")  # fmt: skip
        command = (f"python benchmarks/step_revisions.py {args.before}"
                   + f" {args.after}" * (args.after != WORKING_TREE) + f" --preset {' '.join(args.preset)} "
                   f"--rounds {args.rounds}" + f" --requests {args.requests}" * (args.requests > 1)
                   + f" --quantize {args.quantize}" * bool(args.quantize)
                   + " --compile" * args.compile)  # fmt: skip
        append_result(RESULTS, "Decode steps at two revisions", preamble, command, table)


if __name__ == "__main__":
    main()
