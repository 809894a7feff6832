"""On a CUDA GPU: the serving engine against a full forward per token, then its decode throughput.

Correctness: greedy outputs of :class:`hyla.serve.LLM` on the GPU against the reference decode of the tests (a full
forward over the whole sequence for every token, float64 on the CPU: ``tests.helpers.full_forward_greedy``), for
every layer pattern of the tests, in three engine set-ups — everything in one chunk; small chunks and few KV blocks
(preemption); speculative decoding (``speculative="ngram"``) on prompts that repeat themselves — each prompt served
twice, the prefix cache on (the second time from the cache where its blocks were kept). In float64 on the GPU (PyTorch's
own kernels) the tokens must be equal; in float32 (the Triton lightning kernels) they may part only where the
reference's two best logits are within float32's error: each parting is printed with that margin.

Speed: tokens/s of whole ``generate`` calls (64-token random prompts, 128 new tokens each, greedy; the prompts'
prefill included), ``small`` and ``medium`` with random weights (vocab 8192), bfloat16, by concurrent requests;
then where one request's decode step goes: its median time, and PyTorch's profile of 10 steps (the operations
with the most host time, and the time the device was busy).

Usage (from the repository root): PYTHONPATH=src:. python benchmarks/gpu_serve_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as profile_steps

import hyla
from hyla.bench import decode_step_ms
from hyla.data.tokenizer import byte_level_tokenizer
from hyla.serve import LLM, EngineConfig, LLMEngine, SamplingParams
from tests.helpers import PATTERNS, full_forward_greedy, random_model

VOCAB = 256  # the byte-level tokenizer's ids
CACHE = dict(enable_prefix_caching=True)
SETUPS = {
    "one chunk": dict(max_num_seqs=7, max_num_batched_tokens=512, block_size=16),
    "chunks, preemption, prefix cache": dict(
        max_num_seqs=5, max_num_batched_tokens=24, block_size=4, num_blocks=40, **CACHE
    ),
    "speculative ngram, prefix cache": dict(
        max_num_seqs=3, max_num_batched_tokens=64, block_size=4, speculative="ngram", num_draft_tokens=4, **CACHE
    ),
}


def prompts(setup: str, seed: int) -> list[list[int]]:
    """Random prompts of awkward lengths; for speculation, prompts whose tokens repeat (drafts get accepted)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 17, 64, 5, 33, 2, 48]
    if not setup.startswith("speculative"):
        return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    motif = torch.randint(0, VOCAB, (6,), generator=g).tolist()
    return [(motif + torch.randint(0, VOCAB, (n % 7,), generator=g).tolist()) * 3 for n in lengths]


def margin(model: torch.nn.Module, ids: list[int]) -> float:
    """The reference's gap between its two best next-token logits (ids < VOCAB) after ``ids``."""
    with torch.no_grad():
        top = model(torch.tensor([ids])).logits[0, -1, :VOCAB].topk(2).values
    return (top[0] - top[1]).item()


def check(device: str) -> None:
    """Every pattern and set-up, float64 and float32 on ``device``; prints one line per case."""
    for name, pattern in PATTERNS.items():
        torch.manual_seed(0)
        ref = random_model(layer_types=pattern).double()
        for dtype in (torch.float64, torch.float32):
            model = copy.deepcopy(ref).to(device, dtype)
            for setup, config in SETUPS.items():
                try:
                    llm = LLM(model, byte_level_tokenizer(), EngineConfig(max_model_len=140, **config))
                    ps = prompts(setup, seed=len(setup))
                    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
                    runs = llm.generate(ps, params) + llm.generate(ps, params)  # the second from the cache
                    stats = llm.engine.stats
                    partings = []
                    for prompt, (out,) in zip(ps + ps, runs, strict=True):
                        expected = full_forward_greedy(ref, prompt, 24)
                        if out.token_ids != expected:
                            at = next(i for i, (a, b) in enumerate(zip(out.token_ids, expected, strict=True)) if a != b)
                            partings.append(f"token {at} (margin {margin(ref, prompt + expected[:at]):.1e})")
                    extra = f"; drafted {stats.draft_tokens}, accepted {stats.accepted_tokens}"
                    verdict = "all equal" if not partings else f"{len(partings)} parted: " + ", ".join(partings)
                    print(
                        f"{name:13} {str(dtype)[6:]:8} {setup:18} {len(runs)} outputs: {verdict}; preemptions "
                        f"{stats.preemptions}, cached prompt tokens {stats.hit_tokens}{extra}",
                        flush=True,
                    )
                except Exception:  # a check reports every case's failure and goes on
                    print(f"{name:13} {str(dtype)[6:]:8} {setup:18} FAILED:\n{traceback.format_exc()}", flush=True)


def throughput(device: str, presets: list[str], clients: list[int], dtype: torch.dtype) -> None:
    """Tokens/s of whole generate calls by preset and concurrent requests."""
    print(f"| preset | {str(dtype)[6:]} | " + " | ".join(f"{n} requests" for n in clients) + " |")
    print("|---|---|" + "---|" * len(clients), flush=True)
    for preset in presets:
        torch.manual_seed(0)
        model = hyla.HylaForCausalLM(hyla.preset(preset).replace(vocab_size=8192)).eval().to(device, dtype)
        cells = []
        for n in clients:
            try:
                llm = LLM(model, byte_level_tokenizer(), EngineConfig(max_num_seqs=n, max_model_len=256))
                ps = torch.randint(0, VOCAB, (n, 64)).tolist()
                params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
                llm.generate(ps[:2], SamplingParams(max_tokens=8, ignore_eos=True))  # warm
                torch.cuda.synchronize() if device == "cuda" else None
                start = time.perf_counter()
                llm.generate(ps, params)
                torch.cuda.synchronize() if device == "cuda" else None
                cells.append(f"{n * 128 / (time.perf_counter() - start):,.0f} tok/s")
                del llm
            except Exception as e:
                cells.append(f"failed: {type(e).__name__}: {e}"[:120])
        print(f"| {preset} | | " + " | ".join(cells) + " |", flush=True)


def profile(device: str, preset: str, dtype: torch.dtype) -> None:
    """One request's decode step on ``preset``: the median ms, and the operations that take the most host time."""
    torch.manual_seed(0)
    model = hyla.HylaForCausalLM(hyla.preset(preset).replace(vocab_size=8192)).eval().to(device, dtype)
    engine = LLMEngine(model, byte_level_tokenizer(), EngineConfig(max_num_seqs=4, max_model_len=256))
    generator = torch.Generator().manual_seed(1)
    decode_step_ms(engine, generator)  # warm
    print(f"{preset}: one request's decode step {decode_step_ms(engine, generator):.2f} ms", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile_steps(activities=activities) as prof:
        decode_step_ms(engine, generator, steps=10)
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3
    print(f"{preset}: device busy {busy:.1f} ms over the profiled prefill and ~14 steps", flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--presets", nargs="+", default=["small", "medium"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    if not args.skip_check:
        check(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    throughput(args.device, args.presets, args.clients, dtype)
    for preset in args.presets:
        profile(args.device, preset, dtype)


if __name__ == "__main__":
    main()
