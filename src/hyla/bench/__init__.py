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


def one_request_step_ms(
    engine: LLMEngine, generator: torch.Generator, prompt_tokens: int = 64, steps: int = 20
) -> float:
    """Median ms of ``steps`` decode steps of one request on ``engine`` (an idle ``LLMEngine``): a fresh random
    prompt of ``prompt_tokens`` byte ids from ``generator``, prefilled first, run to its end afterwards."""
    from hyla.serve import SamplingParams  # (the engines sit above bench's helpers)

    prompt = torch.randint(0, 256, (prompt_tokens,), generator=generator).tolist()
    engine.add_request("r", [prompt], SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True))
    engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while engine.has_work():
        engine.step()
    return statistics.median(times) * 1e3
