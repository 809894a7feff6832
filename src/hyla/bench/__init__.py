"""Benchmark harnesses behind `hyla bench ...`, and what every benchmark records of the machine it ran on."""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hyla.runtime import cpu_info

if TYPE_CHECKING:
    from hyla.serve.engine import LLMEngine

# The CPU flags that decide which kernels run (and whether bfloat16 is fast): named in every CPU result.
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_description(device: str = "cpu") -> str:
    """The CPU (model and the flags that matter) or, for ``device="cuda"``, the GPU, and the torch build a result
    was measured on, for RESULTS.md."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model, flags = cpu_info()
    named = [f for f in _FLAGS if f in flags]
    flag_text = f" ({' '.join(named) or 'none of ' + ' '.join(_FLAGS)})"
    return f"{model}{flag_text}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_times(fn: Callable[[], object], repeats: int, device: str | torch.device = "cpu") -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after one warm-up call; on CUDA each waits for the GPU."""
    cuda = torch.device(device).type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def append_result(path: str | Path, title: str, preamble: str, command: str, table: str) -> None:
    """Append one dated section to a RESULTS.md: its title, what it ran on, the command that made it, the table."""
    with Path(path).open("a") as f:
        f.write(f"\n### {title} — {datetime.date.today()}\n\n{preamble}\nCommand: `{command}`\n\n{table}\n")


def decode_step_ms(
    engine: LLMEngine, generator: torch.Generator, requests: int = 1, prompt_tokens: int = 64, steps: int = 20
) -> float:
    """Median ms of ``steps`` decode steps of ``requests`` requests together on ``engine`` (an idle ``LLMEngine``
    with room for them): fresh random prompts of ``prompt_tokens`` byte ids from ``generator``, all prefilled
    first, run to their end afterwards."""
    from hyla.serve import SamplingParams  # (the engines sit above bench's helpers)

    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for r in range(requests):
        prompt = torch.randint(0, 256, (prompt_tokens,), generator=generator).tolist()
        engine.add_request(f"r{r}", [prompt], params)
    while any(not seq.output_ids for seqs in engine.requests.values() for seq in seqs):  # the prefills
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_work():
        engine.step()
    return statistics.median(times) * 1e3
