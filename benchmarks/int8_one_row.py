"""The int8 products of decode steps by path: fbgemm and each loop of hyla's q8 kernel, one request or several.

A decode step with ``--quantize int8`` multiplies a row per request by every int8 matrix (the linear layers, the
chosen experts' matrices, the LM head). :func:`hyla.ops.linear.int8_linear` runs a decode step's rows through
:func:`hyla.ops.gemv.gemv_q8` and the serving modules send a step's tokens to :func:`hyla.ops.gemv.experts_q8`;
this benchmark switches, inside one process, the path every such product takes — ``fbgemm``
(``torch.ops.quantized.linear_dynamic``, per expert), ``q8 plain`` (the kernel's loop the compiler vectorizes),
``q8 avx2`` (its AVX2 byte products), ``q8 vnni`` (its AVX512-VNNI loop), each where this CPU runs it, a step's
experts in one call each; and the fastest loop with a call per expert product (``q8 fastest, experts a call per
product``) — by setting the modules' attributes (and dropping the MoE blocks' cached copies), and times whole
eager decode steps of ``--requests`` requests on random weights of a preset (vocab 8192), the paths alternating
round by round (medians of the rounds' medians of 20 steps). Compiled steps bake their path into the graph:
compare them across revisions with ``step_revisions.py``.

Usage: python benchmarks/int8_one_row.py [--preset small medium] [--requests 1 8] [--rounds 7] [--no-append]
"""

from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch

import hyla
import hyla.model.linear as prepared
import hyla.ops.linear as linear
import hyla.ops.moe as moe
from hyla.bench import append_result, decode_step_ms, machine_description
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.ops.gemv import experts_q8, gemv_q8, q8_loops
from hyla.runtime import tune_malloc
from hyla.serve import EngineConfig
from hyla.serve.engine import LLMEngine

RESULTS = Path(__file__).with_name("RESULTS.md")
PER_PRODUCT = "q8 fastest, experts a call per product"
PATHS = ("fbgemm", "q8 plain", "q8 avx2", "q8 vnni", PER_PRODUCT)  # "q8 X": gemv_q8's loop X
MAX_ROWS = linear.q8_max_rows


def use(path: str, model: torch.nn.Module) -> None:
    """Send every int8 product of a decode step through ``path`` (one of :data:`PATHS`): with a q8 loop, a step's
    experts in one call (``experts_q8``) but for :data:`PER_PRODUCT` (each expert's products through
    ``int8_linear``)."""
    kernel = path != "fbgemm"
    loop = path[3:] if kernel and path != PER_PRODUCT else None
    linear.INT8_GEMV_MAX_WEIGHTS = 2**62 if kernel else 0
    linear.q8_loops = lambda: ("vnni",) if kernel else ("plain",)  # plain and the limit 0: fbgemm for every size
    linear.gemv_q8 = functools.partial(gemv_q8, loop=loop)
    prepared.experts_q8 = functools.partial(experts_q8, loop=loop)
    moe.q8_max_rows = (lambda num_weights: 0) if path == PER_PRODUCT else MAX_ROWS
    for module in model.modules():
        if isinstance(module, prepared.PreparedSparseMoE):
            module._copies.clear()  # made again on the next step, with this path's q8_experts


def step_times(preset: str, requests: int, rounds: int) -> dict[str, float]:
    """Median ms of an eager decode step of ``requests`` requests (64-token prompts) by path."""
    torch.manual_seed(0)
    model = hyla.HylaForCausalLM(hyla.preset(preset).replace(vocab_size=8192)).eval()
    config = EngineConfig(max_num_seqs=max(4, requests), max_model_len=2048, quantize="int8")
    engine = LLMEngine(model, byte_level_tokenizer(), config)
    generator = torch.Generator().manual_seed(1)

    paths = [p for p in PATHS if p in ("fbgemm", PER_PRODUCT) or p[3:] in q8_loops()]
    results: dict[str, list[float]] = {p: [] for p in paths}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for path in paths if r % 2 else paths[::-1]:
                use(path, engine.runner.model)
                ms = decode_step_ms(engine, generator, requests)
                if r:  # the first round warms
                    results[path].append(ms)
    use(f"q8 {q8_loops()[-1]}", engine.runner.model)
    return {p: statistics.median(v) for p, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["small", "medium"], choices=["small", "medium"])
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8], help="requests decoding together")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    tune_malloc()
    lines = ["| preset | requests | " + " | ".join(f"{p} ms" for p in PATHS) + " | fastest vs fbgemm |",
             "|---|---|" + "---|" * (len(PATHS) + 1)]  # fmt: skip
    for preset in args.preset:
        for requests in args.requests:
            t = step_times(preset, requests, args.rounds)
            cells = [f"{t[p]:.2f}" if p in t else "(not on this CPU)" for p in PATHS]
            lines.append(
                f"| {preset} | {requests} | " + " | ".join(cells) + f" | {t['fbgemm'] / min(t.values()):.2f}x |"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        preamble = (f"Machine: {machine_description()}. An eager decode step of the requests, int8 linear layers "
                    f"and experts, random weights (vocab 8192); medians over "
                    f"{args.rounds} rounds of the median of 20 steps, the paths alternating.")  # fmt: skip
        command = (f"python benchmarks/int8_one_row.py --preset {' '.join(args.preset)} "
                   f"--requests {' '.join(map(str, args.requests))} --rounds {args.rounds}")  # fmt: skip
        append_result(RESULTS, "int8 products of decode steps by path", preamble, command, table)


if __name__ == "__main__":
    main()
