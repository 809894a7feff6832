"""The one-row int8 products of a decode step by path: fbgemm and each loop of hyla's q8 kernel.

A decode step of one request with ``--quantize int8`` multiplies one row by every int8 matrix (the linear layers,
the two chosen experts' matrices, the LM head). :func:`hyla.ops.linear.int8_linear` runs that row through
:func:`hyla.ops.gemv.gemv_q8`; this benchmark switches, inside one process, the path every one-row product takes —
``fbgemm`` (``torch.ops.quantized.linear_dynamic``), ``q8 plain`` (the kernel's loop the compiler vectorizes),
``q8 avx2`` (its AVX2 byte products), ``q8 vnni`` (its AVX512-VNNI loop), each where this CPU runs it, a
token's experts in one call each (:func:`hyla.ops.gemv.experts_q8`); and the fastest loop with a call per
expert product (``q8 fastest, experts a call per product``, as before ``experts_q8``) — by setting the modules'
attributes, and times whole decode steps of one request on random weights of a preset
(vocab 8192), eager or compiled, the paths alternating round by round (medians of the rounds' medians of 20
steps).

Usage: python benchmarks/int8_one_row.py [--preset small medium] [--compile] [--rounds 7] [--no-append]
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch

import hyla
import hyla.ops.linear as linear
import hyla.ops.moe as moe
from hyla.bench import append_result, machine_description, one_request_step_ms
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.ops.gemv import experts_q8, gemv_q8, q8_loops
from hyla.runtime import tune_malloc
from hyla.serve import EngineConfig
from hyla.serve.engine import LLMEngine

RESULTS = Path(__file__).with_name("RESULTS.md")
PER_PRODUCT = "q8 fastest, experts a call per product"
PATHS = ("fbgemm", "q8 plain", "q8 avx2", "q8 vnni", PER_PRODUCT)  # "q8 X": gemv_q8's loop X
TAKES = linear.q8_takes


def use(path: str) -> None:
    """Send every one-row int8 product through ``path`` (one of :data:`PATHS`): with a q8 loop, a token's experts
    in one call (``experts_q8``) but for :data:`PER_PRODUCT` (each expert's products through ``int8_linear``)."""
    kernel = path != "fbgemm"
    loop = path[3:] if kernel and path != PER_PRODUCT else None
    linear.INT8_GEMV_MAX_WEIGHTS = 2**62 if kernel else 0
    linear.q8_loops = lambda: ("vnni",) if kernel else ("plain",)  # "every size": the limit above decides
    linear.gemv_q8 = functools.partial(gemv_q8, loop=loop)
    moe.experts_q8 = functools.partial(experts_q8, loop=loop)
    moe.q8_takes = (lambda num_weights: False) if path == PER_PRODUCT else TAKES


def step_times(preset: str, compile: bool, rounds: int) -> dict[str, float]:
    """Median ms of a decode step of one request (a 64-token prompt) by path."""
    torch.manual_seed(0)
    model = hyla.HylaForCausalLM(hyla.preset(preset).replace(vocab_size=8192)).eval()
    config = EngineConfig(max_num_seqs=4, max_model_len=2048, compile=compile, quantize="int8")
    engine = LLMEngine(model, byte_level_tokenizer(), config)
    generator = torch.Generator().manual_seed(1)

    paths = [p for p in PATHS if p in ("fbgemm", PER_PRODUCT) or p[3:] in q8_loops()]
    results: dict[str, list[float]] = {p: [] for p in paths}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for path in paths if r % 2 else paths[::-1]:
                use(path)
                ms = one_request_step_ms(engine, generator)
                if r:  # the first round warms (and compiles)
                    results[path].append(ms)
    use(f"q8 {q8_loops()[-1]}")
    return {p: statistics.median(v) for p, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["small", "medium"], choices=["small", "medium"])
    parser.add_argument("--compile", action="store_true", help="compiled decode steps (the engine's --compile)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    tune_malloc()
    lines = ["| preset | " + " | ".join(f"{p} ms" for p in PATHS) + " | fastest vs fbgemm |",
             "|---|" + "---|" * (len(PATHS) + 1)]  # fmt: skip
    for preset in args.preset:
        t = step_times(preset, args.compile, args.rounds)
        cells = [f"{t[p]:.2f}" if p in t else "(not on this CPU)" for p in PATHS]
        lines.append(f"| {preset} | " + " | ".join(cells) + f" | {t['fbgemm'] / min(t.values()):.2f}x |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        preamble = (f"Machine: {machine_description()}. A decode step of one request, int8 linear layers and "
                    f"experts, {'compiled' if args.compile else 'eager'}, random weights (vocab 8192); medians over "
                    f"{args.rounds} rounds of the median of 20 steps, the paths alternating.")  # fmt: skip
        command = (f"python benchmarks/int8_one_row.py --preset {' '.join(args.preset)} --rounds {args.rounds}"
                   + " --compile" * args.compile)  # fmt: skip
        append_result(RESULTS, "int8 one-row products by path, whole decode steps", preamble, command, table)


if __name__ == "__main__":
    main()
