"""The matrix products of a decode step, by every kernel a kept library offers, against the memory floor.

For each weight shape of a preset (an attention projection, the output projection, an expert's two matrices, the
LM head) at 1 and 8 rows (one request; eight), the same product through:

- ``F.linear``: float32, the weight stored transposed as the serving engine stores it (the reference);
- ``onednn``: oneDNN's packed float32 weight (:func:`hyla.ops.linear.packed_linear`, what the engine runs);
- ``inductor``: ``torch.compile(mode="max-autotune")`` of the float32 product with ``freezing`` (the weight a
  constant, so inductor's CPU GEMM templates may pick a packed micro-kernel);
- ``fbgemm int8``: int8 weights, one scale per row, activations quantized per call
  (:func:`hyla.ops.linear.int8_linear`, what ``--quantize int8`` runs from two rows);
- ``woq int8``: PyTorch's weight-only int8 kernel (``_weight_int8pack_mm``: int8 weights, float32 activations;
  the kernel inductor's weight-only int8 pattern lowers to);
- ``woq int4``: PyTorch's weight-only int4 kernel (``_weight_int4pack_mm_for_cpu``, groups of 32);
- ``torchao int8``: torchao's ``Int8WeightOnlyConfig``, compiled (when torchao is installed: it is not a hyla
  dependency; ``pip install torchao==0.18.0``);
- ``hyla gemv`` (one row only): hyla's hand-written kernel (:mod:`hyla.ops.gemv`, built on first use with the
  machine's C++ compiler) on the transposed weight, what a decode step of one request runs;
- ``hyla q8``: hyla's int8 kernel (:func:`hyla.ops.gemv.gemv_q8`: fbgemm's int8 values in tiles, one scale per
  row; each row quantized in blocks of 32 as llama.cpp's q8_0 does, AVX512-VNNI where the CPU has it, every row
  through a tile while it is in cache), what ``--quantize int8`` runs for a decode step's rows.

The floor is the weight's bytes over the machine's read bandwidth (a sum over 512 MB), per storage: a product
cannot read its weight faster. A decode step streams the whole model through the caches, so before every timed
call the caches are flushed (128 MB written): the weight comes from memory, as in a step (timed warm, a 4 MB
weight comes from the L3 cache and runs "faster than the floor"). Times are medians of ``--repeats`` calls, the
kernels alternating round by round.

Usage: python benchmarks/decode_products.py [--preset medium] [--rows 1 8] [--repeats 200] [--no-append]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import hyla
from hyla.bench import append_result, machine_description
from hyla.ops import gemv as gemv_kernel
from hyla.ops.linear import pack, packed_linear, quantize_int8

RESULTS = Path(__file__).with_name("RESULTS.md")
INT4_GROUP = 32


def shapes(config: hyla.HylaConfig) -> dict[str, tuple[int, int]]:
    """``name -> (out, in)`` of the matrices a decode step reads."""
    h, q, i = config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size
    return {"lightning qkv": (3 * q, h), "out_proj": (h, q), "expert gate_up": (2 * i, h), "expert down": (h, i),
            "LM head": (config.vocab_size, h)}  # fmt: skip


def int4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` ``[N, K]`` as PyTorch's CPU int4 layout: asymmetric, one scale and zero per group of 32."""
    n, k = w.shape
    groups = w.view(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / 15
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.stack([scale.view(n, -1), zero.view(n, -1)], -1).transpose(0, 1).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


def kernels(w: torch.Tensor, x: torch.Tensor) -> dict[str, tuple[Callable[[], torch.Tensor], int]]:
    """Each kernel as ``(call, bytes of weight it reads)`` for the product ``x @ w.T``."""
    n, k = w.shape
    stored = w.t().contiguous().t()
    packed = pack(w)
    fbgemm = quantize_int8(w)
    scales = w.abs().amax(1) / 127
    int8 = (w / scales[:, None]).round().to(torch.int8)
    int4, scales_zeros = int4_pack(w)
    torch._dynamo.reset()  # a fresh compile per product (each is a new module: no recompile limit reached)
    torch._inductor.config.freezing = True
    linear = torch.nn.Linear(k, n, bias=False).eval()
    linear.weight.data = stored
    inductor = torch.compile(linear, mode="max-autotune", dynamic=False)
    out = {
        "F.linear": (lambda: F.linear(x, stored), 4 * n * k),
        "onednn": (lambda: packed_linear(x, packed), 4 * n * k),
        "inductor": (lambda: inductor(x), 4 * n * k),
        "fbgemm int8": (lambda: torch.ops.quantized.linear_dynamic(x, fbgemm.packed, True), n * k),
        "woq int8": (lambda: torch._weight_int8pack_mm(x, int8, scales), n * k),
        "woq int4": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, INT4_GROUP, scales_zeros), n * k // 2),
    }
    if gemv_kernel.available():
        if x.shape[0] == 1:
            out["hyla gemv"] = (lambda: gemv_kernel.gemv(x, stored), 4 * n * k)
        out["hyla q8"] = (lambda: gemv_kernel.gemv_q8(x, fbgemm.layout, fbgemm.scale), n * k)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return out
    ao = torch.nn.Linear(k, n, bias=False).eval()
    ao.weight.data = w.clone()
    quantize_(ao, Int8WeightOnlyConfig())
    compiled = torch.compile(ao, dynamic=False)
    out["torchao int8"] = (lambda: compiled(x), n * k)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = hyla.preset(args.preset, vocab_size=args.vocab)
    big = torch.randn(128 * 2**20)  # 512 MB
    big.sum()
    start = time.perf_counter()
    for _ in range(5):
        big.sum()
    bandwidth = big.numel() * 4 * 5 / (time.perf_counter() - start)  # bytes/s
    del big

    flush = torch.empty(32 << 20)  # 128 MB
    rows, names = [], []
    with torch.inference_mode():
        for shape_name, (n, k) in shapes(config).items():
            w = torch.randn(n, k) * k**-0.5
            for m in args.rows:
                x = torch.randn(m, k)
                ks = kernels(w, x)
                reference = F.linear(x, w)
                errors = {name: float((call() - reference).norm() / reference.norm()) for name, (call, _) in ks.items()}
                times: dict[str, list[float]] = {name: [] for name in ks}
                for _ in range(args.repeats):
                    for name, (call, _) in ks.items():
                        flush.fill_(1.0)
                        t = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - t)
                us = {name: statistics.median(v) * 1e6 for name, v in times.items()}
                floors = {name: nbytes / bandwidth * 1e6 for name, (_, nbytes) in ks.items()}
                names += [name for name in ks if name not in names]
                rows.append((f"{shape_name} [{n}x{k}]", m, us, floors, errors))
                print(shape_name, m, {k: f"{v:.0f}us ({v / floors[k]:.1f}x floor)" for k, v in us.items()}, flush=True)

    lines = ["| product | rows | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for label, m, us, floors, _ in rows:
        cells = [f"{us[n]:.0f} ({us[n] / floors[n]:.1f}x)" if n in us else "" for n in names]
        lines.append(f"| {label} | {m} | " + " | ".join(cells) + " |")
    worst = {n: max(e[n] for *_, e in rows if n in e) for n in names}
    lines.append("| largest relative error vs F.linear | | " + " | ".join(f"{worst[n]:.1e}" for n in names) + " |")
    table = "\n".join(lines)
    header = (f"Machine: {machine_description()}; read bandwidth {bandwidth / 1e9:.1f} GB/s (sum over 512 MB). "
              f"Preset `{args.preset}` with vocab {args.vocab}: each product's median µs over {args.repeats} calls, "
              "the kernels alternating, the caches flushed before each call, and in brackets its multiple of the "
              "memory floor (its weight's bytes in its storage over the bandwidth: 4 bytes a weight in float32, 1 "
              "in int8, 0.5 in int4).")  # fmt: skip
    print(header)
    print(table)
    if not args.no_append:
        command = (f"python benchmarks/decode_products.py --preset {args.preset} --vocab {args.vocab} "
                   f"--rows {' '.join(map(str, args.rows))} --repeats {args.repeats}")  # fmt: skip
        append_result(RESULTS, "Decode-step products by kernel library, against the memory floor", header, command,
                      table)  # fmt: skip


if __name__ == "__main__":
    main()
