"""A MoE block's experts on the CPU, by every path the engine has, from a few tokens to a prefill chunk.

One preset's expert shapes (``--preset``: its layers' stacked ``gate_up``/``down`` weights, random, stored
transposed as the serving engine stores them), ``N`` tokens routed top-k by a random router, every layer in turn
(as a step runs them: each layer's weights read once per step), through:

- ``grouped``: :func:`hyla.ops.moe.swiglu_experts`' one ``torch._grouped_mm`` over the sorted pairs (the CPU's
  default for inference from 2 to 512 tokens before packed experts);
- ``loop``: its loop over experts (``torch.mm`` per expert; training's path);
- ``packed``: :func:`hyla.ops.moe.prepared_swiglu_experts` on oneDNN-packed copies of each expert's matrices
  (what the engine runs eagerly from two tokens, float32: the same values);
- ``int8``: the same on fbgemm int8 copies (``--quantize int8``; another model's rounding).

Times are medians over ``--repeats`` rounds of all layers, the paths alternating round by round; the first round
is a warm-up. The packed path's outputs are checked against the grouped one's first.

Usage: python benchmarks/experts.py [--preset small] [--tokens 2 8 32 100 512] [--repeats 12] [--no-append]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import hyla
from hyla.bench import append_result, machine_description
from hyla.ops.moe import prepare_experts, prepared_swiglu_experts, route, swiglu_experts
from hyla.runtime import tune_malloc

RESULTS = Path(__file__).with_name("RESULTS.md")
PATHS = ("grouped", "loop", "packed", "int8")


def transposed(w: torch.Tensor) -> torch.Tensor:
    """``w`` with its last two dims stored transposed (same values and shape), as the engine stores weights."""
    return w.transpose(-1, -2).contiguous().transpose(-1, -2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["small", "medium"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2, 8, 32, 100, 512])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    tune_malloc()
    torch.manual_seed(0)
    config = hyla.preset(args.preset)
    e, h, i, k = config.num_experts, config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    layers = config.num_hidden_layers
    gate_up = [transposed(torch.randn(e, 2 * i, h) * h**-0.5) for _ in range(layers)]
    down = [transposed(torch.randn(e, h, i) * i**-0.5) for _ in range(layers)]
    copies = {kind: [prepare_experts(gu, d, kind) for gu, d in zip(gate_up, down, strict=True)]
              for kind in ("packed", "int8")}  # fmt: skip

    def run(path: str, layer: int, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if path in copies:
            return prepared_swiglu_experts(x, weights, experts, copies[path][layer], path)
        return swiglu_experts(x, weights, experts, gate_up[layer], down[layer], path)

    rows = [f"| tokens | {' | '.join(PATHS)} | grouped / packed |", "|---|" + "---|" * (len(PATHS) + 1)]
    with torch.inference_mode():
        for n in args.tokens:
            inputs = [(torch.randn(n, h), *route(torch.randn(n, e), k)[1:]) for _ in range(layers)]
            x, weights, experts = inputs[0]
            ref, got = run("grouped", 0, x, weights, experts), run("packed", 0, x, weights, experts)
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (got - ref).abs().max()
            times: dict[str, list[float]] = {path: [] for path in PATHS}
            for round_ in range(args.repeats + 1):
                for path in PATHS if round_ % 2 else reversed(PATHS):
                    start = time.perf_counter()
                    for layer, (x, weights, experts) in enumerate(inputs):
                        run(path, layer, x, weights, experts)
                    if round_:
                        times[path].append(time.perf_counter() - start)
            ms = {path: statistics.median(t) * 1e3 for path, t in times.items()}
            rows.append(f"| {n} | " + " | ".join(f"{ms[p]:.2f}" for p in PATHS) +
                        f" | {ms['grouped'] / ms['packed']:.2f}x |")  # fmt: skip
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    machine = machine_description()
    print(f"# {machine}\n{table}")
    if not args.no_append:
        append_result(RESULTS, f"The experts of `{args.preset}` by path (ms for all {layers} layers, medians)",
                      f"Machine: {machine}. Random weights stored transposed, {e} experts top-{k}, hidden {h}, "
                      f"intermediate {i}; a random router; float32 (int8: fbgemm copies). Paths alternated.",
                      "python benchmarks/experts.py " + " ".join(
                          ["--preset", args.preset, "--tokens", *map(str, args.tokens), "--repeats",
                           str(args.repeats)]), table)  # fmt: skip


if __name__ == "__main__":
    main()
