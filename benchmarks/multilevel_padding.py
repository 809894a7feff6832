"""Multi-level padding on the GPU: short sequences with the chunk length picked per call vs the longest, 128.

Workloads like a batch of continuations (many sequences of a few tokens) waste most of a 128-token chunk;
the Triton path picks 16, 32 or 64 instead. Forward of ``lightning_attention_triton`` (B=1 packed, H=32, D=128,
bf16), best of 20 after warm-up.

Usage (on a CUDA machine, repository root): PYTHONPATH=src python benchmarks/multilevel_padding.py
"""

from __future__ import annotations

import torch

from hyla.bench import run_times
from hyla.ops.lightning.triton import chunk_size_for, lightning_attention_triton


def best_ms(fn, repeats: int = 20) -> float:
    return min(run_times(fn, repeats, "cuda")) * 1e3


def main() -> None:
    h, d = 32, 128
    slope = 2.0 ** (-8 * (torch.arange(h, device="cuda") + 1) / h)
    print(f"device: {torch.cuda.get_device_name()}; H={h}, D={d}, bf16, forward")
    print("| sequences x tokens | picked chunk | picked ms | chunk 128 ms | gain |")
    print("|---|---|---|---|---|")
    for num, length in ((512, 4), (256, 12), (128, 30), (64, 64), (2048, 4), (1024, 30)):
        q, k, v = (torch.randn(1, num * length, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cu = torch.arange(num + 1) * length
        picked = best_ms(lambda q=q, k=k, v=v, cu=cu: lightning_attention_triton(q, k, v, slope, cu_seqlens=cu))
        fixed = best_ms(
            lambda q=q, k=k, v=v, cu=cu: lightning_attention_triton(q, k, v, slope, cu_seqlens=cu, chunk=128)
        )
        chunk = chunk_size_for(length, d * 2)
        print(f"| {num} x {length} | {chunk} | {picked:.3f} | {fixed:.3f} | {fixed / picked:.2f}x |")


if __name__ == "__main__":
    main()
