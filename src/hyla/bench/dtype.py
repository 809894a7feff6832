"""``--dtype auto``: the dtype a model runs fastest in here, decided by measuring a decode where the CPU's flags
leave it open, once per machine."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hyla.atomic import replace_file
from hyla.runtime import BF16_FLAGS, cpu_info

# Where the measured choice is kept, per machine (CPU model and flags, torch version, threads).
DTYPE_CACHE = Path.home() / ".cache" / "hyla" / "dtype.json"
# bfloat16 is chosen only when its decode step is at least this much faster: float32 is the reference (and more
# precise), and a shared VM's speed moves between runs (benchmarks/dtype.py, RESULTS.md).
BF16_MIN_SPEEDUP = 1.15


def auto_dtype(
    device: str | torch.device, cache: Path | None = None, measure: Callable[[], dict[str, float]] | None = None
) -> tuple[torch.dtype, str]:
    """The dtype to run a model in on ``device``, and why. A GPU with bfloat16 gets it. A CPU without AMX-BF16 or
    AVX512-BF16 gets float32 (no native bfloat16 products: AMD EPYC with AVX2 ran them ~3x slower). A CPU with
    one of them gets bfloat16 if a decode step measured (``measure``, default :func:`measure_decode`) once per
    machine and kept in ``cache`` (default :data:`DTYPE_CACHE`) ran :data:`BF16_MIN_SPEEDUP` times faster in it,
    else float32: the flag does not predict the speed (on an AMD EPYC with avx512_bf16, bfloat16 matrix products
    ran faster and a decode step about as fast: ``benchmarks/dtype.py`` in RESULTS.md)."""
    if torch.device(device).type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name()} has bfloat16 tensor cores"
        return torch.float32, f"{torch.cuda.get_device_name()} has no bfloat16"
    model, flags = cpu_info()
    native = [f for f in BF16_FLAGS if f in flags]
    if not native:
        return torch.float32, f"{model} has no native bfloat16 ({' or '.join(BF16_FLAGS)}): float32 is faster there"
    cache = cache or DTYPE_CACHE
    key = f"{model}|{' '.join(sorted(flags))}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    times = _read_cache(cache).get(key)
    when = f"measured before, kept in {cache}"
    if times is None:
        times, when = (measure or measure_decode)(), "measured now, once for this machine"
        _write_cache(cache, key, times)
    f32, bf16 = times["float32"], times["bfloat16"]
    dtype = torch.bfloat16 if bf16 * BF16_MIN_SPEEDUP <= f32 else torch.float32
    rule = f"bfloat16 is chosen from {BF16_MIN_SPEEDUP:g}x faster"
    return dtype, (f"{model} has {' and '.join(native)}, and a decode step took {bf16 * 1e3:.1f} ms in bfloat16 "
                   f"against {f32 * 1e3:.1f} ms in float32 ({when}; {rule})")  # fmt: skip


def measure_decode(repeats: int = 5, tokens: int = 16) -> dict[str, float]:
    """Seconds of one decode step of a two-layer model of the `small` preset's width (a lightning and a softmax
    layer, its experts) through the serving engine, in float32 and in bfloat16: the median of ``repeats``
    alternated runs of ``tokens`` greedy tokens each (~2 s in all). A whole step, not only its matrix products:
    on an EPYC with avx512_bf16 the products ran faster in bfloat16 and the step slower."""
    from hyla.config import LIGHTNING, SOFTMAX, preset
    from hyla.data.tokenizer import byte_level_tokenizer
    from hyla.model import HylaForCausalLM
    from hyla.serve import LLM, EngineConfig, SamplingParams

    with torch.random.fork_rng():  # the process's random stream stays the caller's
        torch.manual_seed(0)
        model = HylaForCausalLM(preset("small", num_hidden_layers=2, layer_types=[LIGHTNING, SOFTMAX])).eval()
        engines = {}
        for dtype in (torch.float32, torch.bfloat16):
            copy = HylaForCausalLM(model.config).eval()
            copy.load_state_dict(model.state_dict())
            config = EngineConfig(max_num_seqs=1, max_model_len=128)
            engines[dtype] = LLM(copy.to(dtype), byte_level_tokenizer(), config)
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        seconds: dict[torch.dtype, list[float]] = {d: [] for d in engines}
        for i in range(repeats + 1):  # the first round warms up
            for dtype, llm in engines.items():
                start = time.perf_counter()
                llm.generate([[1 + i] * 8], params)
                if i:
                    seconds[dtype].append((time.perf_counter() - start) / tokens)
    return {str(d).removeprefix("torch."): statistics.median(s) for d, s in seconds.items()}


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, times: dict[str, float]) -> None:
    """Keep a measurement; a cache that cannot be written (a read-only home) only costs a measurement next time."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, json.dumps({**_read_cache(path), key: times}, indent=1) + "\n")
