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
import platform
from pathlib import Path

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


# CPU features that make bfloat16 matrix products native (whether a model then runs faster: hyla.bench.dtype).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
