"""int8 (``hyla serve --quantize int8``: linear layers and experts) vs float32: decode-step time and held-out loss.

Speed: two engines on the same `small` (``--preset medium``) weights (vocab 8192), float32 and
``quantize="int8"``, each decoding ``B`` requests; 20-step timings alternate between the two, medians of 5.
Accuracy: the held-out loss (per token, each document from its start, up to 1,024 tokens) of a trained model,
``--model`` (default: the main job's run directory), with float32 and with int8.

Usage: python benchmarks/quantize.py [--model runs/default] [--preset small] [--requests 1 8 32] [--no-append]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import hyla
from hyla.bench import append_result, machine_description
from hyla.checkpoint import find_model_dir, load
from hyla.data.corpus import discover
from hyla.data.tokenizer import byte_level_tokenizer, load_tokenizer
from hyla.eval import document_ids, loss_by_position
from hyla.model.linear import prepare_for_cpu_inference
from hyla.runtime import tune_malloc
from hyla.serve import EngineConfig, SamplingParams
from hyla.serve.engine import LLMEngine

RESULTS = Path(__file__).with_name("RESULTS.md")


def step_times(preset: str, requests: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = hyla.HylaForCausalLM(hyla.preset(preset).replace(vocab_size=8192)).eval()
    prompts = [torch.randint(0, 256, (128,)).tolist() for _ in range(requests)]
    engines = {}
    for name, quantize in (("float32", None), ("int8", "int8")):
        engine = LLMEngine(copy.deepcopy(base), byte_level_tokenizer(), EngineConfig(max_model_len=2048,
                                                                                     quantize=quantize))  # fmt: skip
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), [prompt], SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
        for _ in range(3):
            engine.step()
        engines[name] = engine
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(5):
        for name, engine in engines.items():
            start = time.perf_counter()
            for _ in range(20):
                engine.step()
            times[name].append((time.perf_counter() - start) / 20 * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def held_out_loss(run: Path) -> dict[str, float]:
    path = find_model_dir(run)
    tokenizer = load_tokenizer(path)
    fraction = json.loads((run / "train.json").read_text())["eval_fraction"]
    docs, split = document_ids(discover(None), tokenizer, fraction, 1000, 1024)
    losses = {}
    for name, quantize in (("float32", None), ("int8", "int8")):
        model = load(path).eval()
        prepare_for_cpu_inference(model, quantize)
        result = loss_by_position(model, docs, split)
        losses[name] = sum(result.sums) / sum(result.counts)
    losses["tokens"] = sum(len(d) - 1 for d in docs)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("runs/default"), help="a `hyla train` run directory")
    parser.add_argument("--preset", default="small", choices=["small", "medium"], help="the speed model's preset")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    tune_malloc()
    lines = ["| decode step | float32 ms | int8 ms | speed-up |", "|---|---|---|---|"]
    for b in args.requests:
        t = step_times(args.preset, b)
        lines.append(f"| {b} request{'s' * (b > 1)} | {t['float32']:.2f} | {t['int8']:.2f} | "
                     f"{t['float32'] / t['int8']:.2f}x |")  # fmt: skip
        print(lines[-1], flush=True)
    loss = held_out_loss(args.model)
    row = f"| {args.model.name}, {loss['tokens']:,} tokens | {loss['float32']:.4f} | {loss['int8']:.4f} |"
    lines += ["", "| held-out loss (nats/token) | float32 | int8 |", "|---|---|---|", row]
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        preamble = (f"Machine: {machine_description()}. Decode steps of the `{args.preset}` preset (vocab 8192), "
                    "medians of 5 alternations of 20 steps; the loss of the trained model on its run's held-out "
                    "documents.")  # fmt: skip
        command = (f"python benchmarks/quantize.py --model {args.model} --preset {args.preset} "
                   f"--requests {' '.join(map(str, args.requests))}")  # fmt: skip
        title = "int8 linear layers and experts vs float32 (hyla serve --quantize int8)"
        append_result(RESULTS, title, preamble, command, table)


if __name__ == "__main__":
    main()
