"""float32 vs bfloat16 on this CPU: matrix products alone against whole decode steps — what ``--dtype auto``
measures (:func:`hyla.bench.dtype.measure_decode`) and why it measures a decode step, not products.

Three measurements, each in both dtypes, alternated, ``--rounds`` rounds: (1) decode-sized products (1 and 16 rows
through a 2048 x 2048 weight, 4 times each); (2) ``measure_decode``: a two-layer model of `small`'s width through
the serving engine; (3) the whole `small` preset (random weights) decoding 40 greedy tokens after a 16-token prompt,
one request. Prints a table and appends it to RESULTS.md.

Usage: python benchmarks/dtype.py [--rounds 3] [--no-append]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hyla
from hyla.bench import append_result, machine_description
from hyla.bench.dtype import measure_decode
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.runtime import tune_malloc
from hyla.serve import LLM, EngineConfig, SamplingParams

RESULTS = Path(__file__).with_name("RESULTS.md")
DTYPES = (torch.float32, torch.bfloat16)


def products(dtype: torch.dtype) -> float:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 2048, generator=g).to(dtype)
    xs = [torch.randn(m, 2048, generator=g).to(dtype) for m in (1, 16)]
    F.linear(xs[0], w)
    start = time.perf_counter()
    for _ in range(4):
        for x in xs:
            F.linear(x, w)
    return time.perf_counter() - start


def small_decode(llm: LLM, seed: int) -> float:
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([[1 + seed] * 16], params)
    return (time.perf_counter() - start) / 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    tune_malloc()
    torch.manual_seed(0)
    base = hyla.HylaForCausalLM(hyla.preset("small")).eval()
    engines = {}
    for dtype in DTYPES:
        model = hyla.HylaForCausalLM(base.config).eval()
        model.load_state_dict(base.state_dict())
        engines[dtype] = LLM(model.to(dtype), byte_level_tokenizer(), EngineConfig(max_num_seqs=1, max_model_len=256))
        small_decode(engines[dtype], 0)  # warm-up
    seen: dict[str, dict[torch.dtype, list[float]]] = {k: {d: [] for d in DTYPES} for k in ("products", "two", "small")}
    for r in range(args.rounds):
        two = measure_decode()
        for dtype in DTYPES:
            seen["products"][dtype].append(products(dtype))
            seen["two"][dtype].append(two[str(dtype).removeprefix("torch.")])
            seen["small"][dtype].append(small_decode(engines[dtype], r + 1))
    names = {"products": "products: 2048 x 2048, 1 and 16 rows, x4 (ms)",
             "two": "measure_decode: two layers of `small`, a decode step (ms)",
             "small": "`small` (68.7M), a decode step, one request (ms)"}  # fmt: skip
    lines = ["| what | float32 | bfloat16 | float32 / bfloat16 | rounds (f32 / bf16) |", "|---|---|---|---|---|"]
    for key, name in names.items():
        f32, bf16 = (statistics.median(seen[key][d]) * 1e3 for d in DTYPES)
        rounds = ", ".join(f"{a * 1e3:.1f}/{b * 1e3:.1f}" for a, b in zip(*(seen[key][d] for d in DTYPES), strict=True))
        lines.append(f"| {name} | {f32:.2f} | {bf16:.2f} | {f32 / bf16:.2f}x | {rounds} |")
    table = "\n".join(lines)
    machine = machine_description()
    print(f"# {machine}\n{table}")
    if not args.no_append:
        append_result(RESULTS, "float32 vs bfloat16: products vs decode steps (`--dtype auto`)",
                      f"Machine: {machine}. Medians of {args.rounds} alternated rounds; random weights.",
                      f"python benchmarks/dtype.py --rounds {args.rounds}", table)  # fmt: skip


if __name__ == "__main__":
    main()
