"""Process-wide settings that make PyTorch fast on the CPU; hyla's entry points (CLI, benchmarks) apply them.

glibc's malloc hands large freed blocks (>= 128 KiB by default, adapting upward) back to the kernel, so every
activation of a long prefill is fresh memory whose pages fault in on first touch: measured here, a 2048-token
prefill of the ``small`` preset ran 17% faster once large blocks stay in the heap. ``tune_malloc`` raises the
mmap and trim thresholds so freed activations are reused; memory is not returned to the OS until exit, which
is what an inference or training process wants.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); returns False where the C library is not glibc.

    The defaults keep large freed blocks in the heap for reuse. Small values do the opposite (every large
    block is mapped and unmapped), which makes the resident set track live memory: ``hyla bench context``
    uses that to measure peak memory on the CPU.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def trim_malloc() -> None:
    """Return glibc's free heap memory to the OS (``malloc_trim(0)``); a no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags (Linux's /proc/cpuinfo; empty flags elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return model, flags


# CPU features that make bfloat16 matrix products native (and, on some CPUs, faster than float32).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Where the measured dtype choice is kept, per machine (CPU model and flags, torch version, threads).
DTYPE_CACHE = Path.home() / ".cache" / "hyla" / "dtype.json"


def auto_dtype(device: str | torch.device, cache: Path | None = None) -> tuple[torch.dtype, str]:
    """The dtype to run a model in on ``device``, and why. A GPU with bfloat16 gets it. A CPU without AMX-BF16 or
    AVX512-BF16 gets float32 (no native bfloat16 products: AMD EPYC with AVX2 ran them ~3x slower). A CPU with
    one of them gets whichever of float32 and bfloat16 :func:`measure_products` finds faster, measured once per
    machine and kept in ``cache`` (default :data:`DTYPE_CACHE`): the flag does not predict the speed (an AMD
    EPYC with avx512_bf16 decoded at 110-120 tok/s in bfloat16, 155-188 in float32; Intel's AMX runs bfloat16
    products ~7x faster)."""
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
    when = "measured before, kept in " + str(cache)
    if times is None:
        times, when = measure_products(), "measured now, once for this machine"
        _write_cache(cache, key, times)
    f32, bf16 = times["float32"], times["bfloat16"]
    dtype = torch.bfloat16 if bf16 < f32 else torch.float32
    return dtype, (f"{model} has {' and '.join(native)}, and its decode-sized bfloat16 products took "
                   f"{bf16 * 1e3:.2f} ms against float32's {f32 * 1e3:.2f} ({when})")  # fmt: skip


def measure_products(repeats: int = 7) -> dict[str, float]:
    """Seconds of one round of decode-sized matrix products (1 and 16 rows through a 2048 x 2048 weight) in
    float32 and in bfloat16, alternated, the median of ``repeats`` rounds each: ~0.1-0.5 s in all."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    weights = {d: torch.randn(2048, 2048, generator=g).to(d) for d in (torch.float32, torch.bfloat16)}
    inputs = {d: [torch.randn(m, 2048, generator=g).to(d) for m in (1, 16)] for d in weights}
    times: dict[torch.dtype, list[float]] = {d: [] for d in weights}
    for _ in range(repeats + 1):  # the first round warms up
        for d, w in weights.items():
            start = time.perf_counter()
            for _ in range(4):
                for x in inputs[d]:
                    F.linear(x, w)
            times[d].append(time.perf_counter() - start)
    return {str(d).removeprefix("torch."): statistics.median(t[1:]) for d, t in times.items()}


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
        data = {**_read_cache(path), key: times}
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
