"""Compiled decode steps of several requests: the experts through the graph's own products or the packed copies.

A compiled decode step of B requests (``hyla serve --compile``) runs each layer's experts either inside the graph
(``torch.compile``'s own products: one gathered copy of an expert's matrices per (token, expert) pair) or as one
opaque op over the oneDNN-packed copies (each chosen expert's two products once over its tokens), chosen by
``PreparedSparseMoE.compiled_copies`` (set from the experts' size: ``PACKED_COMPILED_MIN_WEIGHTS``). Two engines
on the same random weights (float32, vocab 8192), one each way, decode B requests; 10-step timings alternate
between them, medians of ``--rounds``.

Usage: python benchmarks/compiled_experts.py [--preset small medium] [--requests 2 8] [--rounds 7] [--no-append]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import hyla
from hyla.bench import append_result, machine_description
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.model.linear import PreparedSparseMoE
from hyla.runtime import tune_malloc
from hyla.serve import EngineConfig, SamplingParams
from hyla.serve.engine import LLMEngine

RESULTS = Path(__file__).with_name("RESULTS.md")
SIDES = {"graph's products": False, "packed copies": True}


def step_times(preset: str, requests: int, rounds: int) -> dict[str, float]:
    """Median ms of a compiled decode step of ``requests`` requests, each side."""
    torch.manual_seed(0)
    base = hyla.HylaForCausalLM(hyla.preset(preset).replace(vocab_size=8192)).eval()
    prompts = [torch.randint(0, 256, (64,)).tolist() for _ in range(requests)]
    engines = {}
    for side, copies in SIDES.items():
        engine = LLMEngine(copy.deepcopy(base), byte_level_tokenizer(),
                           EngineConfig(max_num_seqs=32, max_model_len=2048, compile=True))  # fmt: skip
        for module in engine.model.modules():
            if isinstance(module, PreparedSparseMoE):
                module.compiled_copies = copies
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), [prompt], SamplingParams(max_tokens=1900, temperature=0, ignore_eos=True))
        for _ in range(5):  # prefill, then compile the step of B requests
            engine.step()
        engines[side] = engine
    times: dict[str, list[float]] = {side: [] for side in engines}
    with torch.inference_mode():
        for r in range(rounds):
            for side, engine in list(engines.items())[:: 1 if r % 2 else -1]:
                start = time.perf_counter()
                for _ in range(10):
                    engine.step()
                times[side].append((time.perf_counter() - start) / 10 * 1e3)
    return {side: statistics.median(t) for side, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["small", "medium"], choices=["small", "medium"])
    parser.add_argument("--requests", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    tune_malloc()
    lines = ["| preset | requests | " + " | ".join(f"{side} ms" for side in SIDES) + " | copies' speed-up |",
             "|---|---|" + "---|" * (len(SIDES) + 1)]  # fmt: skip
    for preset in args.preset:
        for b in args.requests:
            t = step_times(preset, b, args.rounds)
            graph, copies = (t[side] for side in SIDES)
            lines.append(f"| {preset} | {b} | {graph:.2f} | {copies:.2f} | {graph / copies:.2f}x |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        preamble = (f"Machine: {machine_description()}. Compiled decode steps of B requests, float32, random "
                    f"weights (vocab 8192); medians of {args.rounds} alternations of 10 steps.")  # fmt: skip
        command = (f"python benchmarks/compiled_experts.py --preset {' '.join(args.preset)} "
                   f"--requests {' '.join(map(str, args.requests))} --rounds {args.rounds}")  # fmt: skip
        append_result(RESULTS, "Compiled experts: the graph's products or the packed copies", preamble, command,
                      table)  # fmt: skip


if __name__ == "__main__":
    main()
