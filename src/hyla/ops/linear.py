"""Linear layers with weights prepacked for oneDNN: the CPU's small-batch products of a serving step.

PyTorch's CPU ``F.linear`` (the reference) multiplies a few rows by a weight through a general matrix kernel
that reads the weight at 4-10 GB/s here once more than one row comes; oneDNN with the weight reordered once
into its blocked layout keeps 12-16 GB/s from 1 to 8 rows (measured on 40 matrices of 1536 x 512, float32,
2 EPYC cores: 2 rows 9.8 -> 16.5 GB/s, 4 rows 5.6 -> 12.0, 8 rows 5.7 -> 11.7, 32 rows 4.3 -> 6.5; one row
equal). The same products, same values up to summation order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from hyla.ops.gemv import gemv_q8, q8_layout, q8_loops


def can_pack(weight: Tensor) -> bool:
    """Whether :func:`pack` takes ``weight``: a float32 matrix on the CPU, in a build with oneDNN."""
    return (
        weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


def pack(weight: Tensor) -> Tensor:
    """``weight`` ``[out, in]`` reordered into oneDNN's layout for :func:`packed_linear` (a new tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` with ``packed = pack(weight)``: ``[..., in]`` -> ``[..., out]``. Inside
    ``torch.compile`` it is one opaque operation (inductor does not lower oneDNN's op on a packed weight)."""
    rows = x.reshape(-1, x.shape[-1])
    out = _packed_mm(rows, packed, bias) if torch.compiler.is_compiling() else _linear_pointwise(rows, packed, bias)
    return out.view(*x.shape[:-1], out.shape[-1])


def _linear_pointwise(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_packed_mm = torch.library.custom_op("hyla::packed_mm", _linear_pointwise, mutates_args=())


@_packed_mm.register_fake
def _(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


@dataclass(frozen=True)
class Int8Weight:
    """A weight ``[out, in]`` as int8 with one float scale per output row (``max |w| / 127``), in the two forms its
    products read: fbgemm's packed object (:func:`int8_linear` of many rows: prefill) and
    :func:`~hyla.ops.gemv.q8_layout`'s tiles with the scales ``[out]`` (a decode step's rows, through
    :func:`hyla.ops.gemv.gemv_q8`); the same int8 values. ``bias``: float32 ``[out]`` or None."""

    packed: object
    layout: Tensor
    scale: Tensor
    bias: Tensor | None

    def dequantized(self) -> Tensor:
        """The weight as its products see it: the int8 values times their scales, ``[out, in]`` float32."""
        values, _ = torch.ops.quantized.linear_unpack(self.packed)
        return values.dequantize()


def quantize_int8(weight: Tensor, bias: Tensor | None = None) -> Int8Weight:
    """``weight`` ``[out, in]`` as int8 with one float scale per output row (``max |w| / 127``), for
    :func:`int8_linear`. PyTorch marks its quantized-tensor API deprecated; it is what runs int8 products on an
    x86 CPU in the pinned release."""
    scales = weight.detach().abs().amax(dim=1).clamp_min(1e-12).double() / 127
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_channel(weight.detach().float(), scales, zeros, 0, torch.qint8)
    bias = None if bias is None else bias.detach().float().contiguous()
    packed = torch.ops.quantized.linear_prepack(quantized, bias)
    return Int8Weight(packed, q8_layout(quantized.int_repr()), scales.float(), bias)


INT8_GEMV_MAX_WEIGHTS = 2**20
# With only the q8 kernel's plain loop (CPUs without AVX2: no byte products the kernel spells out), one row takes it
# for weights below this size only (fbgemm's per-call cost loses on `small`'s matrices, its throughput wins on
# `medium`'s, RESULTS.md "A later agent turn in one step; packed experts ..."), and several rows never do. With the
# AVX2 or the AVX512-VNNI loop the kernel runs one row of every size faster than fbgemm (decode steps in RESULTS.md,
# "int8 one-row products by path").

Q8_MAX_ROWS = 32
# With the AVX2 or the AVX512-VNNI loop, up to this many rows (a decode step's, the compiled steps' most:
# hyla.serve.runner.COMPILED_MAX_BATCH) go to the q8 kernel, every row through each tile of the weight while it is
# in cache; more rows (prefill) go to fbgemm, whose GEMM blocking computes faster once the product is bound by
# arithmetic rather than by reading the weight (RESULTS.md, "int8 products of a few rows").


def q8_max_rows(num_weights: int) -> int:
    """The most rows :func:`int8_linear` sends against a weight of ``num_weights`` (its q8 layout's, padding
    included) to :func:`hyla.ops.gemv.gemv_q8`: 0 where the kernel is not built, :data:`Q8_MAX_ROWS` with its AVX2 or
    AVX512-VNNI loop, else 1 below :data:`INT8_GEMV_MAX_WEIGHTS` and 0 from there."""
    loops = q8_loops()
    if not loops:
        return 0
    return Q8_MAX_ROWS if loops[-1] != "plain" else int(num_weights < INT8_GEMV_MAX_WEIGHTS)


def int8_linear(x: Tensor, weight: Int8Weight) -> Tensor:
    """``F.linear(x, weight, bias)`` with ``weight = quantize_int8(weight, bias)``: ``[..., in]`` -> ``[..., out]``,
    float32. Up to :func:`q8_max_rows` rows (a decode step's): :func:`hyla.ops.gemv.gemv_q8`, each row quantized in
    blocks of 32 as llama.cpp's q8_0 does. More rows (prefill): fbgemm, the activations quantized per call (one
    scale per call, to 7 bits: ``reduce_range``, which fbgemm needs on CPUs without VNNI), so each output is within
    ~1-2% of the float product's scale (measured); q8_0's blocks stay closer to the float product."""
    if x.numel() <= q8_max_rows(weight.layout.numel()) * x.shape[-1]:
        return gemv_q8(x.float(), weight.layout, weight.scale, weight.bias)
    out = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), weight.packed, True)
    return out.view(*x.shape[:-1], out.shape[-1])
