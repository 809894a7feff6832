"""Speculative decoding (prompt lookup) for one user: decode tokens/s with it off and on, on trained weights.

Two workloads, one request at a time (``max_num_seqs=1``, as ``hyla generate`` and ``hyla chat`` run), greedy:
``code`` continues a prefix of a file of the Python standard library (text that copies from its context), and
``random`` continues random token ids (nothing to copy: speculation must not cost there). The two engines, each
with its own copy of the model, alternate prompt by prompt; each pair's outputs are checked to be equal (greedy:
speculation is exact). Decode speed is the tokens after the first over the time after the first (the prefill
excluded); the acceptance rate is the engine's drafted tokens accepted.

    python benchmarks/speculative.py --model runs/default
"""

from __future__ import annotations

import argparse
import random
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from hyla.bench import append_result, machine_description
from hyla.checkpoint import load_pretrained
from hyla.runtime import tune_malloc
from hyla.serve import LLM, EngineConfig, SamplingParams

RESULTS = Path(__file__).parent / "RESULTS.md"


def code_prompts(count: int, chars: int, seed: int) -> list[str]:
    """Prefixes of ``chars`` characters of ``count`` standard-library files (seeded choice), each cut at a line."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 4 * chars)
    rng = random.Random(seed)
    prompts = []
    for path in rng.sample(files, count):
        text = path.read_text(errors="replace")
        start = rng.randrange(0, len(text) - 2 * chars)
        start = text.find("\n", start) + 1
        prompts.append(text[start : text.rfind("\n", start, start + chars) + 1])
    return prompts


def decode_speed(llm: LLM, prompt: str | list[int], max_tokens: int) -> tuple[float, list[int]]:
    """Tokens/s after the first output, and the output tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    first, first_count, tokens = None, 0, []
    for out in llm.stream([prompt], params):
        tokens += out.token_ids
        if first is None:
            first, first_count = time.perf_counter(), len(tokens)
    return (len(tokens) - first_count) / (time.perf_counter() - first), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained model or run directory")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per workload")
    parser.add_argument("--chars", type=int, default=1500, help="characters of each code prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, nargs="+", default=[4])
    parser.add_argument("--compile", action="store_true", help="both engines with --compile")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    tune_malloc()
    torch.manual_seed(0)

    def engine(**spec) -> LLM:
        loaded = load_pretrained(args.model)
        context = min(loaded.model.config.max_position_embeddings, 4096)
        config = EngineConfig(max_num_seqs=1, max_model_len=context, compile=args.compile, **spec)
        return LLM(loaded.model, loaded.tokenizer, config)

    sides = {"off": engine()}
    for k in args.num_draft_tokens:
        sides[f"ngram k={k}"] = engine(speculative="ngram", num_draft_tokens=k)
    vocab = sides["off"].engine.vocab_size
    rng = random.Random(1)
    workloads = {"code": code_prompts(args.prompts, args.chars, seed=0),
                 "random": [[rng.randrange(vocab) for _ in range(300)] for _ in range(args.prompts)]}  # fmt: skip
    for llm in sides.values():  # warm up each engine once
        decode_speed(llm, workloads["code"][0], 8)
    rows = ["| workload | " + " | ".join(f"{name} tok/s" for name in sides) + " | speed-up | accepted drafts |",
            "|---|" + "---|" * (len(sides) + 2)]  # fmt: skip
    for workload, prompts in workloads.items():
        speeds: dict[str, list[float]] = {name: [] for name in sides}
        before = {name: (llm.engine.stats.draft_tokens, llm.engine.stats.accepted_tokens) for name, llm in
                  sides.items()}  # fmt: skip
        for prompt in prompts:
            outputs = {}
            for name, llm in sides.items():
                speed, outputs[name] = decode_speed(llm, prompt, args.max_tokens)
                speeds[name].append(speed)
            if any(out != outputs["off"] for out in outputs.values()):
                raise SystemExit(f"speculation changed a greedy output on {workload}: a bug")
        medians = {name: statistics.median(v) for name, v in speeds.items()}
        best = max((n for n in sides if n != "off"), key=medians.get)
        drafted, accepted = (b - a for a, b in zip(before[best], (sides[best].engine.stats.draft_tokens,
                                                                  sides[best].engine.stats.accepted_tokens),
                                                   strict=True))  # fmt: skip
        rate = f"{accepted / drafted:.2f} of {drafted:,} ({best})" if drafted else f"none drafted ({best})"
        rows.append(f"| {workload} | " + " | ".join(f"{medians[n]:.1f}" for n in sides) +
                    f" | {medians[best] / medians['off']:.2f}x | {rate} |")  # fmt: skip
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    machine = machine_description()
    print(f"# {machine}\n{table}")
    if not args.no_append:
        flags = [
            "--model",
            args.model,
            "--prompts",
            str(args.prompts),
            "--max-tokens",
            str(args.max_tokens),
            "--num-draft-tokens",
            *map(str, args.num_draft_tokens),
            *(["--compile"] if args.compile else []),
        ]
        command = "python benchmarks/speculative.py " + " ".join(flags)
        append_result(
            RESULTS,
            "Speculative decoding (prompt lookup), one user, trained weights",
            f"Machine: {machine}. Model {args.model}; one request at a time, greedy, {args.max_tokens} "
            f"new tokens, medians over {args.prompts} prompts per workload (code: {args.chars}-character "
            "prefixes of standard-library files; random: 300 random token ids), the engines alternating "
            "prompt by prompt, every output checked equal to speculation off."
            + (" Both with --compile." if args.compile else ""),
            command,
            table,
        )


if __name__ == "__main__":
    main()
