"""Matrix-vector products near the memory floor: the one-row products of a decode step of one request, float32
weights and int8 ones.

A decode step of one request multiplies one row by every weight, reading each weight once from memory: the step
is bound by that read. PyTorch's float32 kernels for one row (``F.linear``, oneDNN's packed weights, inductor's
max-autotune templates) run at 1.4-5.7x the memory floor on a 2-core EPYC with the caches cold, as in a decode
step; this plain loop over the transposed weight the engine stores (blocks of 256 outputs accumulated over four
rows at a time, vectorized by the compiler with ``-O3 -march=native``, the blocks split over PyTorch's threads)
runs them faster (``benchmarks/decode_products.py``; the numbers in RESULTS.md). ``F.linear`` is its reference.
The same loop reads int8 weights with one scale per output row (``--quantize int8``'s weights), widening each to
float as it is read: a quarter of the bytes, and the row is not quantized (fbgemm's int8 kernel quantizes it per
call); its reference is ``F.linear`` on the dequantized weight. Widening costs instructions: it reads ~1.3-1.5
weights a cycle a core (1M weights in 119 µs on 2 cores, caches flushed), so
:func:`hyla.ops.linear.int8_linear` takes it for small matrices only (fbgemm's int8 x int8 products stream large
ones faster).

It is built on first use with the machine's C++ compiler (``torch.utils.cpp_extension``, ~30 s once; then loaded
from PyTorch's extension cache, under a name that carries this CPU's model and flags, so a cache shared by
machines never hands one a binary for another's instructions). Where no compiler builds it, :func:`available` is
False and callers keep the library path.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import sys
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

// y = x W^T * scale (+ bias) for one row x [in] (float32), the weight given as wt = W^T [in, out] row-major (the
// serving engine's transposed storage): float32, or int8 with one float scale per output (each weight widened to
// float as it is read). Each thread takes blocks of 256 outputs and sweeps the rows of wt four at a time,
// accumulating the block in registers/L1: every weight is read once, in contiguous runs.
template <typename W>
static void sweep(const float* xp, const W* w, int64_t in, int64_t out, const float* sp, const float* bp,
                  float* yp) {
  constexpr int64_t BLOCK = 256;
  const int64_t blocks = (out + BLOCK - 1) / BLOCK;
  // OpenMP over the blocks, as many threads as PyTorch's pool (torch.set_num_threads); torch's own libgomp.
  #pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * BLOCK, n = std::min(out, lo + BLOCK) - lo;
    float acc[BLOCK];
    for (int64_t o = 0; o < n; ++o) acc[o] = 0.f;
    int64_t i = 0;
    for (; i + 4 <= in; i += 4) {
      const float x0 = xp[i], x1 = xp[i + 1], x2 = xp[i + 2], x3 = xp[i + 3];
      const W* r0 = w + i * out + lo;
      const W *r1 = r0 + out, *r2 = r1 + out, *r3 = r2 + out;
      #pragma omp simd
      for (int64_t o = 0; o < n; ++o)
        acc[o] += x0 * float(r0[o]) + x1 * float(r1[o]) + x2 * float(r2[o]) + x3 * float(r3[o]);
    }
    for (; i < in; ++i) {
      const float xi = xp[i];
      const W* r = w + i * out + lo;
      #pragma omp simd
      for (int64_t o = 0; o < n; ++o) acc[o] += xi * float(r[o]);
    }
    for (int64_t o = 0; o < n; ++o) yp[lo + o] = acc[o] * (sp ? sp[lo + o] : 1.f) + (bp ? bp[lo + o] : 0.f);
  }
}

static torch::Tensor run(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> scale,
                         c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat32, "gemv takes float32 rows");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && x.is_contiguous() && x.numel() == wt.size(0), "gemv shapes");
  const int64_t in = wt.size(0), out = wt.size(1);
  for (const auto& v : {scale, bias})
    TORCH_CHECK(!v.has_value() || (v->dtype() == torch::kFloat32 && v->is_contiguous() && v->numel() == out),
                "gemv: scale and bias are float32 [out]");
  auto y = torch::empty({out}, x.options());
  const float* sp = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (wt.dtype() == torch::kInt8) {
    TORCH_CHECK(sp != nullptr, "gemv: an int8 weight needs its scales");
    sweep(x.data_ptr<float>(), wt.data_ptr<int8_t>(), in, out, sp, bp, y.data_ptr<float>());
  } else {
    TORCH_CHECK(wt.dtype() == torch::kFloat32 && sp == nullptr, "gemv takes a float32 or an int8 weight");
    sweep(x.data_ptr<float>(), wt.data_ptr<float>(), in, out, sp, bp, y.data_ptr<float>());
  }
  return y;
}

torch::Tensor gemv_t(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias) {
  return run(x, wt, c10::nullopt, bias);
}

torch::Tensor gemv_int8_t(torch::Tensor x, torch::Tensor wt, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  return run(x, wt, scale, bias);
}
"""


def _machine_tag() -> str:
    """This CPU's model and instruction-set flags, and the torch build, as 10 hex digits."""
    cpu = ""
    info = Path("/proc/cpuinfo")
    if info.exists():
        lines = info.read_text().splitlines()
        cpu = "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    key = f"{platform.machine()}\n{cpu}\n{torch.__version__}\n{sys.version_info[:2]}\n{_SOURCE}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


@functools.cache
def _kernel():
    """The built kernels (``gemv_t``, ``gemv_int8_t``), or None where they cannot be built (not Linux, no
    compiler, a failed build)."""
    if platform.system() != "Linux":
        return None
    from torch.utils.cpp_extension import load_inline

    try:
        module = load_inline(f"hyla_gemv_{_machine_tag()}", _SOURCE, functions=["gemv_t", "gemv_int8_t"],
                             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])  # fmt: skip
    except Exception:  # no compiler, or one that cannot build it: the library path stays
        return None
    return module


def available() -> bool:
    """Whether :func:`gemv` runs here (builds the kernel on the first call)."""
    return _kernel() is not None


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for one row: ``x`` ``[..., in]`` with one row in all, ``weight`` ``[out, in]``
    stored transposed (``weight.t()`` contiguous, as :func:`hyla.model.linear.transpose_weights` leaves it),
    float32 -> ``[..., out]``. Inside ``torch.compile`` it is one opaque operation. Only where :func:`available`."""
    row = x.reshape(-1).contiguous()
    wt = weight.t()
    out = _gemv_op(row, wt, bias) if torch.compiler.is_compiling() else _kernel().gemv_t(row, wt, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def gemv_int8(x: Tensor, transposed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x W^T (+ bias)`` for one row with ``W = transposed.t() * scale[:, None]``: an int8 weight stored
    transposed (``transposed`` ``[in, out]`` int8, contiguous) with one float32 scale per output row; ``x``
    ``[..., in]`` with one row in all, float32 (not quantized) -> ``[..., out]``. Only where :func:`available`;
    called eagerly (inside the int8 layers' own opaque operations when compiled)."""
    out = _kernel().gemv_int8_t(x.reshape(-1).contiguous(), transposed, scale, bias)
    return out.view(*x.shape[:-1], transposed.shape[1])


@torch.library.custom_op("hyla::gemv", mutates_args=())
def _gemv_op(x: Tensor, wt: Tensor, bias: Tensor | None) -> Tensor:
    return _kernel().gemv_t(x, wt, bias)


@_gemv_op.register_fake
def _(x: Tensor, wt: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(wt.shape[1])
