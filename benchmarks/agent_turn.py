"""Where a later agent turn's time goes outside the model, as its transcript grows (issue: "the agent turn").

An agent resends its whole transcript each call; with prefix caching only the ~``--new`` tokens of the last tool
result are computed, so work that scales with the whole transcript is overhead. In one process, on the `small`
preset (random weights, byte-level tokens: one token per byte), for each transcript length: the previous call
(the transcript minus its last ``--new`` tokens) is served first, then the later call is timed piece by piece —
parsing its JSON body, tokenizing the whole transcript, naming its blocks (the prefix-cache hashes), the engine's
admission and first step (the prefix lookup and the prefill of the new tokens), and a decode step for scale.
Medians of ``--repeats``. Prints a table and appends it to RESULTS.md.

Usage: python benchmarks/agent_turn.py [--lengths 1024 2048 4096 8000] [--new 100] [--repeats 5] [--no-append]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import hyla
from hyla.bench import append_result, machine_description
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.runtime import tune_malloc
from hyla.serve import EngineConfig, SamplingParams
from hyla.serve.cache import block_hashes
from hyla.serve.engine import LLMEngine

RESULTS = Path(__file__).with_name("RESULTS.md")
WORDS = [
    "def",
    "return",
    "self",
    "import",
    "class",
    "value",
    "key",
    "data",
    "result",
    "error",
    "request",
    "model",
    "token",
    "cache",
    "state",
]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def one_turn(engine: LLMEngine, transcript: str, new: int, turn: int) -> dict[str, float]:
    """Serve the call before (all but the last ``new`` characters), then time the later call's pieces (ms)."""
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine.add_request(f"prev{turn}", [engine.inputs.encode(transcript[:-new])], params)
    while engine.has_work():
        engine.step()
    body = json.dumps({"model": "m", "prompt": transcript, "max_tokens": 2})
    t_parse, parsed = timed(lambda: json.loads(body))
    t_encode, ids = timed(lambda: engine.inputs.encode(parsed["prompt"]))
    t_hash, _ = timed(lambda: block_hashes(ids, engine.config.block_size))
    t_add, _ = timed(lambda: engine.add_request(f"turn{turn}", [ids], params))
    t_first, _ = timed(engine.step)  # admission (prefix lookup) and the new tokens' prefill, to the first token
    t_decode, _ = timed(engine.step)
    while engine.has_work():
        engine.step()
    return {"parse": t_parse, "encode": t_encode, "hash": t_hash, "add": t_add, "first_step": t_first,
            "decode_step": t_decode}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    tune_malloc()
    torch.manual_seed(0)
    model = hyla.HylaForCausalLM(hyla.preset("small")).eval()
    config = EngineConfig(
        max_num_seqs=4, max_model_len=min(max(args.lengths) + 64, model.config.max_position_embeddings)
    )
    engine = LLMEngine(model, byte_level_tokenizer(), config)
    rng = random.Random(0)
    rows = ["| transcript tokens | parse JSON | tokenize all | hash blocks | add_request | first step (lookup + "
            f"{args.new} new) | decode step | cached share |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    turn = 0
    for length in args.lengths:
        samples: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            words = []
            while sum(len(w) + 1 for w in words) < length:
                words.append(rng.choice(WORDS))
            transcript = " ".join(words)[:length]
            before = engine.stats.hit_tokens
            for key, value in one_turn(engine, transcript, args.new, turn).items():
                samples.setdefault(key, []).append(value)
            samples.setdefault("cached", []).append((engine.stats.hit_tokens - before) / length)
            turn += 1
        ms = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        rows.append(f"| {length:,} | {ms['parse']:.2f} | {ms['encode']:.2f} | {ms['hash']:.2f} | {ms['add']:.2f} | "
                    f"{ms['first_step']:.1f} | {ms['decode_step']:.1f} | {ms['cached'] / 1e3:.2f} |")  # fmt: skip
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    machine = machine_description()
    print(f"# {machine}\n{table}")
    if not args.no_append:
        append_result(RESULTS, "A later agent turn, outside the model (ms, medians)",
                      f"Machine: {machine}. `small`, random weights, byte-level tokens, prefix caching on, float32, "
                      f"{args.repeats} transcripts per length, each served once without its last {args.new} tokens "
                      "first. 'cached share': prompt tokens of the later call read from the prefix cache.",
                      "python benchmarks/agent_turn.py " + " ".join(
                          ["--lengths", *map(str, args.lengths), "--new", str(args.new), "--repeats",
                           str(args.repeats)]), table)  # fmt: skip


if __name__ == "__main__":
    main()
