"""Whole decode steps with the one-row kernels of an earlier commit against this tree's, in one process.

:mod:`hyla.ops.gemv` is built from its C++ source on first use; this benchmark builds the source of ``--before``
(a git revision) beside this tree's and switches between the two kernels step batch by step batch, on one engine
(one request, a 64-token prompt; random weights of a preset, vocab 8192; float32 or ``--quantize int8``; eager
or ``--compile``). The two revisions' kernels must take the same arguments (``gemv_t``; ``gemv_q8_t`` with
int8); a kernel the earlier revision lacks runs this tree's on both sides. Compiled graphs call this tree's
registered operators (``torch.ops.hyla.gemv``, ...) from C++: for the A/B they reach both sides' kernels through
one Python function each instead (the same path for both, slower than the engine's). Medians over ``--rounds``
rounds of the median of 20 steps, the two alternating.

Usage: python benchmarks/gemv_before_after.py --before REV [--preset small medium] [--quantize int8] [--compile]
       [--rounds 9] [--no-append]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import statistics
import subprocess
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

import hyla
import hyla.ops.gemv as gemv
from hyla.bench import append_result, decode_step_ms, machine_description
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.runtime import tune_malloc
from hyla.serve import EngineConfig
from hyla.serve.engine import LLMEngine

RESULTS = Path(__file__).with_name("RESULTS.md")


def kernel_at(revision: str) -> object:
    """The C++ kernels of ``hyla/ops/gemv.py`` as of ``revision``, built as this tree's are."""
    text = subprocess.run(["git", "show", f"{revision}:src/hyla/ops/gemv.py"], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).parent).stdout  # fmt: skip
    source = next(ast.literal_eval(node.value) for node in ast.parse(text).body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_SOURCE")  # fmt: skip
    functions = ["gemv_t", "experts_gemv_t", "gemv_q8_t", "experts_q8_t", "lightning_decode_t", "has_vnni", "q8_level"]
    functions = [f for f in functions if f"{f}(" in source]
    name = "hyla_gemv_" + hashlib.sha256(source.encode()).hexdigest()[:10] + "_" + gemv._machine_tag()
    return load_inline(name, source, functions=functions, extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"])  # fmt: skip


class Kernels:
    """An earlier revision's kernels, with this tree's for any it lacks."""

    def __init__(self, earlier: object, this_tree: object) -> None:
        self.earlier, self.this_tree = earlier, this_tree

    def __getattr__(self, name: str) -> object:
        return getattr(self.earlier, name, None) or getattr(self.this_tree, name)


def through_python() -> torch.library.Library:
    """Send the compiled graphs' calls of ``torch.ops.hyla``'s kernels to whichever kernels ``gemv._kernel()``
    returns now (until the returned library is destroyed)."""
    ops = torch.library.Library("hyla", "IMPL")
    for op in ("gemv", "experts_gemv", "lightning_decode"):
        ops.impl(op, lambda *args, op=op: getattr(gemv._kernel(), f"{op}_t")(*args), "CPU")
    return ops


def step_times(preset: str, kernels: dict[str, object], quantize: str | None, compile: bool, rounds: int):
    """Median ms of a decode step of one request with each kernel."""
    torch.manual_seed(0)
    model = hyla.HylaForCausalLM(hyla.preset(preset).replace(vocab_size=8192)).eval()
    config = EngineConfig(max_num_seqs=4, max_model_len=2048, compile=compile, quantize=quantize)
    engine = LLMEngine(model, byte_level_tokenizer(), config)
    generator = torch.Generator().manual_seed(1)

    built = gemv._kernel
    results: dict[str, list[float]] = {name: [] for name in kernels}
    names = list(kernels)
    ops = through_python()
    try:
        with torch.inference_mode():
            for r in range(rounds + 1):
                for name in names if r % 2 else names[::-1]:
                    gemv._kernel = lambda k=kernels[name]: k  # what gemv(), gemv_q8() and through_python() call
                    ms = decode_step_ms(engine, generator)
                    if r:  # the first round warms (and compiles)
                        results[name].append(ms)
    finally:
        gemv._kernel = built
        ops._destroy()
    return {name: statistics.median(v) for name, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a git revision whose kernels to compare")
    parser.add_argument("--preset", nargs="+", default=["small", "medium"], choices=["small", "medium"])
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--compile", action="store_true", help="compiled decode steps (the engine's --compile)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    tune_malloc()
    kernels = {args.before: Kernels(kernel_at(args.before), gemv._kernel()), "this tree": gemv._kernel()}
    lines = [f"| preset | {args.before} ms | this tree ms | speed-up |", "|---|---|---|---|"]
    for preset in args.preset:
        t = step_times(preset, kernels, args.quantize, args.compile, args.rounds)
        lines.append(f"| {preset} | {t[args.before]:.2f} | {t['this tree']:.2f} | "
                     f"{t[args.before] / t['this tree']:.2f}x |")  # fmt: skip
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        what = f"{args.quantize or 'float32'}, {'compiled' if args.compile else 'eager'}"
        preamble = (f"Machine: {machine_description()}. A decode step of one request ({what}), random weights "
                    f"(vocab 8192); medians over {args.rounds} rounds of the median of 20 steps, the kernels of "
                    f"{args.before} and of this tree alternating in one process.")  # fmt: skip
        command = (f"python benchmarks/gemv_before_after.py --before {args.before} --preset {' '.join(args.preset)} "
                   f"--rounds {args.rounds}" + f" --quantize {args.quantize}" * bool(args.quantize)
                   + " --compile" * args.compile)  # fmt: skip
        append_result(RESULTS, "One-row kernels before and after, whole decode steps", preamble, command, table)


if __name__ == "__main__":
    main()
