"""Matrix-vector products near the memory floor: the one-row products of a decode step of one request, float32
weights and int8 ones.

A decode step of one request multiplies one row by every weight, reading each weight once from memory: the step
is bound by that read. PyTorch's float32 kernels for one row (``F.linear``, oneDNN's packed weights, inductor's
max-autotune templates) run at 1.4-5.7x the memory floor on a 2-core EPYC with the caches cold, as in a decode
step; this plain loop over the transposed weight the engine stores (its rows split over PyTorch's threads, each
streaming one contiguous run four rows at a time, vectorized by the compiler with ``-O3 -march=native``)
runs them faster (``benchmarks/decode_products.py``; the numbers in RESULTS.md). ``F.linear`` is its reference.
int8 weights (``--quantize int8``'s, one scale per output row) take another loop, :func:`gemv_q8`: the row
quantized in blocks of 32 as llama.cpp's q8_0 quantizes activations, int8 x int8 products summed exactly in int32 —
on CPUs with AVX512-VNNI one instruction multiplies 64 byte pairs, so the loop streams the weights near the memory
bandwidth (2x fbgemm's one-row products, ``benchmarks/decode_products.py``); with AVX2 only, byte products into
int16 pairs (``benchmarks/int8_one_row.py``: both faster than fbgemm in whole decode steps); elsewhere the same sums
in a plain loop the compiler vectorizes. Its reference is ``F.linear`` of :func:`q8_row` (the quantized row) on the
dequantized weight; one token's k int8 experts take one call, :func:`experts_q8`. (Widening each int8 weight to
float instead, as an earlier version did, is compute-bound: ~1.3-1.5 weights a cycle a core.) The lightning layers'
decode step, :func:`lightning_decode`, is here too: one pass over each head's d x d state (reference
:func:`hyla.ops.lightning.lightning_step_slots`).

Compiled graphs call these kernels as operators registered in C++ (``torch.ops.hyla.*``): no Python between the
graph and the kernel (a Python custom operator cost ~25 us a call on a Xeon: RESULTS.md, "Where a compiled
one-request step goes, by py-spy").

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
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

Q8_BLOCK = 32  # inputs per scale of the row in gemv_q8 (llama.cpp's q8_0 block)
Q8_TILE = 64  # outputs per tile of q8_layout
Q8_LOOPS = ("plain", "avx2", "vnni")  # gemv_q8's loops, by the C++ level (q8_level) that picks each

_SOURCE = r"""
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <memory>
#include <omp.h>
#include <string>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

// acc_r[0:out] += x_r[lo:hi] W[lo:hi] for each of m rows x_r (xs[r], into accs[r]) and rows lo..hi of a row-major
// [in, out] weight w (a transposed W): in chunks of outputs whose sums stay in L1 (8192 for one row, 1024 for
// several, whose four weight rows of a chunk then stay in L1 for all of them), four weight rows at a time, each
// weight row read from memory once for all m rows. Each output's sum is taken in the same order for any m.
static void add_rows(const float* const* xs, int64_t m, const float* w, int64_t lo, int64_t hi, int64_t out,
                     float* const* accs) {
  const int64_t chunk = m == 1 ? 8192 : 1024;
  for (int64_t c = 0; c < out; c += chunk) {
    const int64_t n = std::min(out - c, chunk);
    int64_t i = lo;
    for (; i + 4 <= hi; i += 4) {
      const float* r0 = w + i * out + c;
      const float *r1 = r0 + out, *r2 = r1 + out, *r3 = r2 + out;
      for (int64_t r = 0; r < m; ++r) {
        const float* xp = xs[r];
        const float x0 = xp[i], x1 = xp[i + 1], x2 = xp[i + 2], x3 = xp[i + 3];
        float* acc = accs[r] + c;
        #pragma omp simd
        for (int64_t o = 0; o < n; ++o) acc[o] += x0 * r0[o] + x1 * r1[o] + x2 * r2[o] + x3 * r3[o];
      }
    }
    for (; i < hi; ++i) {
      const float* row = w + i * out + c;
      for (int64_t r = 0; r < m; ++r) {
        const float xi = xs[r][i];
        float* acc = accs[r] + c;
        #pragma omp simd
        for (int64_t o = 0; o < n; ++o) acc[o] += xi * row[o];
      }
    }
  }
}

// The rows lo..hi (a multiple of 4 apart) of this thread's even share of `rows` rows.
static std::pair<int64_t, int64_t> share(int64_t rows, int team, int thread) {
  const int64_t per = ((rows + team - 1) / team + 3) / 4 * 4, lo = std::min(rows, thread * per);
  return {lo, std::min(rows, lo + per)};
}

// y = x W^T (+ bias) for one row x [in] (float32), the weight given as wt = W^T [in, out] row-major (the serving
// engine's transposed storage), float32. The rows of wt are split over the threads: each thread streams one
// contiguous run of the weight; the threads' partial sums are added at the end. (Splitting the outputs instead,
// each thread reading 1 KB of every row, made whole decode steps 7-15% slower.)
static void sweep(const float* xp, const float* w, int64_t in, int64_t out, const float* bp, float* yp) {
  const int most = at::get_num_threads();  // PyTorch's pool (torch.set_num_threads); torch's own libgomp
  std::vector<float> partial(size_t(most) * out, 0.f);
  int team = 1;
  #pragma omp parallel num_threads(most)
  {
    #pragma omp single
    team = omp_get_num_threads();  // (fewer than asked inside another parallel region; the barrier publishes it)
    int64_t lo, hi;
    std::tie(lo, hi) = share(in, team, omp_get_thread_num());
    float* acc = partial.data() + omp_get_thread_num() * out;
    add_rows(&xp, 1, w, lo, hi, out, &acc);
  }
  for (int64_t o = 0; o < out; ++o) {
    float sum = bp ? bp[o] : 0.f;
    for (int t = 0; t < team; ++t) sum += partial[size_t(t) * out + o];
    yp[o] = sum;
  }
}

// A few tokens' SwiGLU experts in one parallel region, grouped by expert: y_n = sum_j r_nj down_e(silu(gate_e x_n)
// * up_e x_n) over token n's k experts e = ids[n, j], each expert's gate/up weight a row-major [H, 2I] (gate columns
// first, at gate_up + e * gu_stride) and its down weight [I, H] (at down + e * dn_stride): the transposed storage.
// The touched experts (in order of first use) have their rows (H each, then I each) split evenly over the threads,
// as in sweep, and each weight row is read once for all the tokens that chose its expert: one fork for all the
// products, none of the Python between them. The router weight scales the activation before the down product
// (the reference scales the product: the same up to rounding).
static void experts_sweep(const float* x, int64_t tokens, int64_t hidden, int64_t inter, int64_t k, const int64_t* ids,
                          const float* router, const float* gate_up, int64_t gu_stride, const float* down,
                          int64_t dn_stride, float* y) {
  // The (token, j) pairs grouped by expert: pairs begin[u] .. begin[u + 1] of order chose expert used[u].
  std::vector<int64_t> used, slot_of(tokens * k, -1);
  for (int64_t p = 0; p < tokens * k; ++p) {
    const auto at = std::find(used.begin(), used.end(), ids[p]);
    slot_of[p] = at - used.begin();
    if (at == used.end()) used.push_back(ids[p]);
  }
  const int64_t experts = used.size(), pairs = tokens * k;
  std::vector<int64_t> begin(experts + 1, 0), order(pairs);
  for (int64_t p = 0; p < pairs; ++p) ++begin[slot_of[p] + 1];
  for (int64_t u = 0; u < experts; ++u) begin[u + 1] += begin[u];
  std::vector<int64_t> fill(begin.begin(), begin.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) order[fill[slot_of[p]]++] = p;
  const int most = at::get_num_threads();
  std::vector<float> first(size_t(most) * pairs * 2 * inter, 0.f), act(pairs * inter),
      second(size_t(most) * tokens * hidden, 0.f);
  int team = 1;
  #pragma omp parallel num_threads(most)
  {
    #pragma omp single
    team = omp_get_num_threads();
    const int t = omp_get_thread_num();
    std::vector<const float*> xs(pairs);
    std::vector<float*> accs(pairs);
    // gate/up: the rows (u, i) of the touched experts' [H, 2I] weights, in order; each run within one expert is
    // one add_rows for all its tokens.
    int64_t lo, hi;
    std::tie(lo, hi) = share(experts * hidden, team, t);
    for (int64_t u = lo / hidden; u < experts && u * hidden < hi; ++u) {
      const int64_t m = begin[u + 1] - begin[u];
      for (int64_t q = 0; q < m; ++q) {
        const int64_t p = order[begin[u] + q];
        xs[q] = x + p / k * hidden;
        accs[q] = first.data() + (size_t(t) * pairs + p) * 2 * inter;
      }
      add_rows(xs.data(), m, gate_up + used[u] * gu_stride, std::max(lo - u * hidden, int64_t(0)),
               std::min(hi - u * hidden, hidden), 2 * inter, accs.data());
    }
    #pragma omp barrier
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < pairs * inter; ++n) {
      const int64_t p = n / inter, o = n % inter;
      float g = 0.f, v = 0.f;
      for (int s = 0; s < team; ++s) {
        const float* f = first.data() + (size_t(s) * pairs + p) * 2 * inter;
        g += f[o];
        v += f[inter + o];
      }
      act[n] = router[p] * (g / (1.f + std::exp(-g))) * v;
    }
    // down: the rows (u, i) of the touched experts' [I, H] weights, each token's pairs into this thread's [H] sum
    // of that token (a token's k experts are distinct: one add_rows never names a sum twice).
    std::tie(lo, hi) = share(experts * inter, team, t);
    for (int64_t u = lo / inter; u < experts && u * inter < hi; ++u) {
      const int64_t m = begin[u + 1] - begin[u];
      for (int64_t q = 0; q < m; ++q) {
        const int64_t p = order[begin[u] + q];
        xs[q] = act.data() + p * inter;
        accs[q] = second.data() + (size_t(t) * tokens + p / k) * hidden;
      }
      add_rows(xs.data(), m, down + used[u] * dn_stride, std::max(lo - u * inter, int64_t(0)),
               std::min(hi - u * inter, inter), hidden, accs.data());
    }
  }
  for (int64_t n = 0; n < tokens * hidden; ++n) {
    float sum = 0.f;
    for (int t = 0; t < team; ++t) sum += second[size_t(t) * tokens * hidden + n];
    y[n] = sum;
  }
}

// The int8 product as q8_0 computes it, for one row or a few (a decode step's): each row quantized in blocks of 32
// (one float scale each, |x| max -> 127), int8 x int8 products summed exactly in int32 per block, each block's sum
// scaled back. The weight is stored as q8_layout() in Python leaves it: int8 values + 128 (unsigned bytes), padded
// to a multiple of 64 outputs and 32 inputs, in tiles of 64 outputs [tiles, in/4, 64, 4]: each tile one contiguous
// run, and each 64 bytes the 4 consecutive inputs of 16 outputs that one VNNI instruction (vpdpbusd: unsigned x
// signed bytes, 4 products summed into each int32 lane) takes. The +128 comes back out of each block's int32 sum
// exactly (128 times the sum of the block's row values). A tile's 2 KB of one block of inputs is read from memory
// once and then, from L1, once for every row: several rows cost about what one does while the weights' read bounds
// the product.
constexpr int64_t TILE = 64, QBLOCK = 32;

// Rows quantized in q8 blocks, for the tile loops: q [rows, in_p] int8 values, s [rows, in_p / 32] the blocks'
// scales, o [rows, in_p / 32] 128 times the blocks' sums of values (the padding's values zero).
struct Q8Rows {
  int64_t rows, in_p, blocks;
  std::vector<int8_t> q;
  std::vector<float> s;
  std::vector<int32_t> o;
  Q8Rows(int64_t rows, int64_t in_p)
      : rows(rows), in_p(in_p), blocks(in_p / QBLOCK), q(rows * in_p, 0), s(rows * blocks, 0.f), o(rows * blocks, 0) {}

  // Row r = x [in]: scale = max |x| / 127, values round(x / scale) (half to even, as torch.round). Once per row.
  void set(int64_t r, const float* xp, int64_t in) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t lo = b * QBLOCK, hi = std::min(in, lo + QBLOCK);
      float amax = 0.f;
      for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(xp[i]));
      if (amax == 0.f) continue;
      const float scale = amax / 127.f;
      int32_t sum = 0;
      for (int64_t i = lo; i < hi; ++i) {
        const auto v = static_cast<int8_t>(std::nearbyint(xp[i] / scale));
        q[r * in_p + i] = v;
        sum += v;
      }
      s[r * blocks + b] = scale;
      o[r * blocks + b] = 128 * sum;
    }
  }

  // Row `to` = row `from` (a row quantized once, wanted in several places).
  void copy_row(int64_t from, int64_t to) {
    std::copy_n(q.begin() + from * in_p, in_p, q.begin() + to * in_p);
    std::copy_n(s.begin() + from * blocks, blocks, s.begin() + to * blocks);
    std::copy_n(o.begin() + from * blocks, blocks, o.begin() + to * blocks);
  }
};

// One tile p ([in_p / 4, 64, 4] bytes) times the rows r0 .. r0 + n of x: f[i * ld + j] (i < n, j < 64) = output j
// of the tile for row r0 + i. Each loop the same sums.
static void q8_tile_generic(const Q8Rows& x, int64_t r0, int64_t n, const uint8_t* p, float* f, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = r0 + i;
    float acc[TILE] = {0.f};
    for (int64_t b = 0; b < x.blocks; ++b) {
      int32_t a[TILE] = {0};
      for (int64_t g = 0; g < QBLOCK / 4; ++g) {
        const int8_t* x4 = x.q.data() + r * x.in_p + b * QBLOCK + g * 4;
        const uint8_t* pg = p + (b * QBLOCK / 4 + g) * TILE * 4;
        for (int64_t j = 0; j < TILE; ++j)
          a[j] += pg[4 * j] * x4[0] + pg[4 * j + 1] * x4[1] + pg[4 * j + 2] * x4[2] + pg[4 * j + 3] * x4[3];
      }
      for (int64_t j = 0; j < TILE; ++j) acc[j] += x.s[r * x.blocks + b] * float(a[j] - x.o[r * x.blocks + b]);
    }
    std::copy(acc, acc + TILE, f + i * ld);
  }
}

#if defined(__x86_64__)
// Block b of the tile (p at its 2 KB) for the R rows r .. r + R - 1, added into f[i * ld + j]: each 64 weight bytes
// loaded once for the R rows (up to 4: 16 accumulators, 4 weight and R row registers of AVX-512's 32).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void q8_block_vnni(const Q8Rows& x, int64_t r, int64_t b, const uint8_t* p, float* f, int64_t ld) {
  __m512i a[R][4];
  for (int i = 0; i < R; ++i)
    for (int k = 0; k < 4; ++k) a[i][k] = _mm512_setzero_si512();
  for (int64_t g = 0; g < QBLOCK / 4; ++g) {
    const uint8_t* pg = p + g * TILE * 4;
    const __m512i w[4] = {_mm512_loadu_si512(pg), _mm512_loadu_si512(pg + 64), _mm512_loadu_si512(pg + 128),
                          _mm512_loadu_si512(pg + 192)};
    for (int i = 0; i < R; ++i) {
      int32_t x4;
      std::memcpy(&x4, x.q.data() + (r + i) * x.in_p + b * QBLOCK + g * 4, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      for (int k = 0; k < 4; ++k) a[i][k] = _mm512_dpbusd_epi32(a[i][k], w[k], xb);
    }
  }
  for (int i = 0; i < R; ++i) {
    const __m512 s = _mm512_set1_ps(x.s[(r + i) * x.blocks + b]);
    const __m512i o = _mm512_set1_epi32(x.o[(r + i) * x.blocks + b]);
    float* fi = f + i * ld;
    for (int k = 0; k < 4; ++k) {
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(a[i][k], o));
      _mm512_storeu_ps(fi + 16 * k, _mm512_fmadd_ps(s, sum, _mm512_loadu_ps(fi + 16 * k)));
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void q8_tile_vnni(const Q8Rows& x, int64_t r0, int64_t n, const uint8_t* p, float* f, int64_t ld) {
  for (int64_t i = 0; i < n; ++i)
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(f + i * ld + 16 * k, _mm512_setzero_ps());
  for (int64_t b = 0; b < x.blocks; ++b, p += QBLOCK * TILE) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) q8_block_vnni<4>(x, r0 + i, b, p, f + i * ld, ld);
    switch (n - i) {
      case 3: q8_block_vnni<3>(x, r0 + i, b, p, f + i * ld, ld); break;
      case 2: q8_block_vnni<2>(x, r0 + i, b, p, f + i * ld, ld); break;
      case 1: q8_block_vnni<1>(x, r0 + i, b, p, f + i * ld, ld); break;
    }
  }
}

// The same sums with AVX2 (CPUs without AVX512-VNNI): vpmaddubsw multiplies unsigned by signed bytes and adds
// pairs into int16, which the +128 bytes would overflow (255 x 127 x 2), so each weight byte is turned back into
// its signed value (xor 0x80) and the row's sign moved onto it (vpsignb): |x| x (+-w) pairs stay within
// 2 x 127 x 127 < 2^15, as in llama.cpp's q8_0 dot products; vpmaddwd with ones sums each 4 into an int32 lane.
// The sums are the exact signed ones, so the +128 correction (o) is not needed.
__attribute__((target("avx2,fma")))
static void q8_tile_avx2(const Q8Rows& x, int64_t r0, int64_t n, const uint8_t* p, float* f, int64_t ld) {
  const __m256i flip = _mm256_set1_epi8(char(0x80)), ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < n; ++i)
    for (int k = 0; k < TILE / 8; ++k) _mm256_storeu_ps(f + i * ld + 8 * k, _mm256_setzero_ps());
  for (int64_t b = 0; b < x.blocks; ++b, p += QBLOCK * TILE) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = r0 + i;
      const int8_t* xr = x.q.data() + r * x.in_p + b * QBLOCK;
      __m256i sum[TILE / 8];
      for (auto& v : sum) v = _mm256_setzero_si256();
      for (int64_t g = 0; g < QBLOCK / 4; ++g) {
        int32_t x4;
        std::memcpy(&x4, xr + g * 4, 4);
        const __m256i xb = _mm256_set1_epi32(x4), xa = _mm256_sign_epi8(xb, xb);
        const uint8_t* pg = p + g * TILE * 4;
        for (int k = 0; k < TILE / 8; ++k) {
          const __m256i wk = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + 32 * k)), flip);
          const __m256i pairs = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wk, xb));
          sum[k] = _mm256_add_epi32(sum[k], _mm256_madd_epi16(pairs, ones));
        }
      }
      const __m256 s = _mm256_set1_ps(x.s[r * x.blocks + b]);
      float* fi = f + i * ld;
      for (int k = 0; k < TILE / 8; ++k)
        _mm256_storeu_ps(fi + 8 * k, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sum[k]), _mm256_loadu_ps(fi + 8 * k)));
    }
  }
}
#endif

// One tile by the loop `level` (q8_level()'s numbers): tile t of the q8_layout weight w times rows r0 .. r0 + n.
static void q8_tile(int64_t level, const Q8Rows& x, int64_t r0, int64_t n, const uint8_t* w, int64_t t, float* f,
                    int64_t ld) {
  const uint8_t* p = w + t * x.in_p * TILE;
#if defined(__x86_64__)
  if (level == 2) return q8_tile_vnni(x, r0, n, p, f, ld);
  if (level == 1) return q8_tile_avx2(x, r0, n, p, f, ld);
#endif
  q8_tile_generic(x, r0, n, p, f, ld);
}

// The fastest loop of gemv_q8 this CPU runs: 2 (AVX512-VNNI), 1 (AVX2), 0 (the plain loop).
static int64_t q8_level_here() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int64_t q8_level() {
  static const int64_t here = q8_level_here();
  return here;
}

// Every entry point lets go of Python's lock while it runs, where its caller holds it (a call from Python, or from
// a compiled graph's C++ wrapper): the server's event loop streams tokens meanwhile.
struct NoGil {
  PyThreadState* saved = PyGILState_Check() ? PyEval_SaveThread() : nullptr;
  ~NoGil() {
    if (saved) PyEval_RestoreThread(saved);
  }
};

torch::Tensor gemv_t(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias) {
  NoGil no_gil;
  TORCH_CHECK(x.dtype() == torch::kFloat32 && wt.dtype() == torch::kFloat32, "gemv takes float32");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && x.is_contiguous() && x.numel() == wt.size(0), "gemv shapes");
  const int64_t in = wt.size(0), out = wt.size(1);
  TORCH_CHECK(!bias.has_value() || (bias->dtype() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == out),
              "gemv: the bias is float32 [out]");
  auto y = torch::empty({out}, x.options());
  sweep(x.data_ptr<float>(), wt.data_ptr<float>(), in, out, bias.has_value() ? bias->data_ptr<float>() : nullptr,
        y.data_ptr<float>());
  return y;
}

// x [N, H] float32, ids [N, k] int64 (expert numbers, distinct per token), router [N, k] float32; gate_up [E, 2I, H]
// and down [E, H, I] float32 with each expert's transpose contiguous (gate_up[e].t(), down[e].t()) -> [N, H], all
// rows in one sweep over the experts they chose.
torch::Tensor experts_gemv_t(torch::Tensor x, torch::Tensor ids, torch::Tensor router, torch::Tensor gate_up,
                             torch::Tensor down) {
  NoGil no_gil;
  x = x.contiguous(), ids = ids.contiguous(), router = router.contiguous();
  TORCH_CHECK(x.dtype() == torch::kFloat32 && gate_up.dtype() == torch::kFloat32 &&
                  down.dtype() == torch::kFloat32 && router.dtype() == torch::kFloat32 && ids.dtype() == torch::kInt64,
              "experts_gemv: float32, int64 ids");
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3 && x.is_contiguous() && ids.is_contiguous() &&
                  router.is_contiguous() && ids.sizes() == router.sizes() && ids.dim() == 2 && ids.size(0) == x.size(0),
              "experts_gemv shapes");
  const int64_t experts = gate_up.size(0), inter = down.size(2), hidden = down.size(1), k = ids.size(1);
  TORCH_CHECK(gate_up.size(1) == 2 * inter && gate_up.size(2) == hidden && down.size(0) == experts &&
                  x.size(1) == hidden, "experts_gemv shapes");
  const auto strided = [](const torch::Tensor& w, int dim, int64_t stride) {  // (a dimension of one: any stride)
    return w.size(dim) == 1 || w.stride(dim) == stride;
  };
  TORCH_CHECK(strided(gate_up, 1, 1) && strided(gate_up, 2, 2 * inter) && strided(down, 1, 1) &&
                  strided(down, 2, hidden), "experts_gemv: each expert's weights stored transposed");
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t p = 0; p < ids.numel(); ++p)
    TORCH_CHECK(ip[p] >= 0 && ip[p] < experts, "experts_gemv: an expert id out of range");
  for (int64_t n = 0; n < ids.size(0); ++n)
    for (int64_t j = 1; j < k; ++j)
      TORCH_CHECK(std::find(ip + n * k, ip + n * k + j, ip[n * k + j]) == ip + n * k + j,
                  "experts_gemv: a token chose one expert twice");
  auto y = torch::empty_like(x);
  experts_sweep(x.data_ptr<float>(), x.size(0), hidden, inter, k, ip, router.data_ptr<float>(),
                gate_up.data_ptr<float>(), gate_up.stride(0), down.data_ptr<float>(), down.stride(0),
                y.data_ptr<float>());
  return y;
}

// The weight's tiles and padded inputs, checked against rows of `in` values and the scales: w in q8_layout.
static std::pair<int64_t, int64_t> q8_shape(int64_t in, const torch::Tensor& w, const torch::Tensor& scale) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 4 && w.is_contiguous() && w.size(2) == TILE && w.size(3) == 4,
              "gemv_q8: the weight in q8_layout");
  const int64_t tiles = w.size(0), in_p = w.size(1) * 4, out = scale.numel();
  TORCH_CHECK(in_p % QBLOCK == 0 && in <= in_p && in_p - in < QBLOCK && out <= tiles * TILE &&
                  tiles * TILE - out < TILE,
              "gemv_q8: the rows and the scales do not fit the weight");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous(), "gemv_q8: the scales are float32 [out]");
  return {tiles, in_p};
}

// The loop `level` asks for (q8_level()'s numbers, at most this CPU's; -1: this CPU's fastest).
static int64_t q8_loop(int64_t level, const char* who) {
  TORCH_CHECK(level >= -1 && level <= q8_level(), who, ": a loop this CPU cannot run");
  return level < 0 ? q8_level() : level;
}

// x [..., in] float32 (any number of rows) -> y [..., out]: all rows through each tile, the tiles split over the
// threads, each tile's outputs scaled (and biased) as it ends.
torch::Tensor gemv_q8_t(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                        int64_t level) {
  NoGil no_gil;
  x = x.contiguous();
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1, "gemv_q8 takes float32 rows [..., in]");
  level = q8_loop(level, "gemv_q8");
  const int64_t in = x.size(-1), rows = in ? x.numel() / in : 0, out = scale.numel();
  int64_t tiles, in_p;
  std::tie(tiles, in_p) = q8_shape(in, w, scale);
  TORCH_CHECK(!bias.has_value() || (bias->dtype() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == out),
              "gemv_q8: the bias is float32 [out]");
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  auto y = torch::empty(sizes, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scale.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  Q8Rows q(rows, in_p);
  #pragma omp parallel num_threads(at::get_num_threads())
  {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) q.set(r, xp + r * in, in);
    std::vector<float> f(rows * TILE);  // one tile's sums for every row
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      q8_tile(level, q, 0, rows, wp, t, f.data(), TILE);
      const int64_t lo = t * TILE, n = std::min(TILE, out - lo);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < n; ++j) yp[r * out + lo + j] = f[r * TILE + j] * sp[lo + j] + (bp ? bp[lo + j] : 0.f);
    }
  }
  return y;
}

// Each token's k int8 SwiGLU experts, their products as gemv_q8's: y_n = sum_j r_nj down_e(silu(gate_e x_n) *
// up_e x_n), e = ids[n, j]. x [N, H], ids [N, k] int64 and router [N, k] float32; every expert's gate/up weight
// [2I, H] (gate rows first) and down weight [H, I] in q8_layout with their scales [2I] and [H] -> y [N, H]. The
// (token, expert) pairs are grouped by expert, so each chosen expert's weights are read once for all its tokens;
// each token's row is quantized once for its k gate/up products, each activation once for its down product. One
// parallel region: the (expert, tile) items of the gate/up products, the activations, the items of the down
// products; then each token's k outputs summed in the order j = 0 .. k - 1.
torch::Tensor experts_q8_t(torch::Tensor x, torch::Tensor ids, torch::Tensor router, std::vector<torch::Tensor> gate_up,
                           std::vector<torch::Tensor> gate_up_scale, std::vector<torch::Tensor> down,
                           std::vector<torch::Tensor> down_scale, int64_t level) {
  NoGil no_gil;
  x = x.contiguous(), ids = ids.contiguous(), router = router.contiguous();
  const int64_t experts = int64_t(gate_up.size());
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && router.dtype() == torch::kFloat32 &&
                  ids.dtype() == torch::kInt64 && ids.dim() == 2 && ids.sizes() == router.sizes() &&
                  ids.size(0) == x.size(0) && experts > 0 && int64_t(gate_up_scale.size()) == experts &&
                  int64_t(down.size()) == experts && int64_t(down_scale.size()) == experts,
              "experts_q8: float32 rows [N, H], int64 ids and float32 router weights [N, k], every expert's weights "
              "and scales");
  level = q8_loop(level, "experts_q8");
  const int64_t rows = x.size(0), hidden = x.size(1), k = ids.size(1), inter = gate_up_scale[0].numel() / 2;
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK(gate_up_scale[e].numel() == 2 * inter && down_scale[e].numel() == hidden,
                "experts_q8: every expert [2I, H] and [H, I]");
    q8_shape(hidden, gate_up[e], gate_up_scale[e]);
    q8_shape(inter, down[e], down_scale[e]);
  }
  const int64_t gu_tiles = gate_up[0].size(0), gu_in = gate_up[0].size(1) * 4;
  const int64_t d_tiles = down[0].size(0), d_in = down[0].size(1) * 4;
  const int64_t pairs = rows * k, gu_ld = gu_tiles * TILE, d_ld = d_tiles * TILE;
  const int64_t* ip = ids.data_ptr<int64_t>();
  // The pairs grouped by expert (stable): pair m = n * k + j is row slot[m] of the grouping; expert e's rows start
  // at start[e].
  std::vector<int64_t> start(experts + 1, 0), slot(pairs), expert_of(pairs);
  for (int64_t m = 0; m < pairs; ++m) {
    TORCH_CHECK(ip[m] >= 0 && ip[m] < experts, "experts_q8: an expert id out of range");
    ++start[ip[m] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t m = 0; m < pairs; ++m) {
    const int64_t p = next[ip[m]]++;
    slot[m] = p, expert_of[p] = ip[m];
  }
  // Work items: (expert, tile) for every expert with pairs.
  std::vector<std::pair<int64_t, int64_t>> gu_items, d_items;
  for (int64_t e = 0; e < experts; ++e) {
    if (start[e + 1] == start[e]) continue;
    for (int64_t t = 0; t < gu_tiles; ++t) gu_items.emplace_back(e, t);
    for (int64_t t = 0; t < d_tiles; ++t) d_items.emplace_back(e, t);
  }
  Q8Rows xin(pairs, gu_in), act(pairs, d_in);
  auto y = torch::empty({rows, hidden}, x.options());
  float* y_data = y.data_ptr<float>();
  std::vector<float> first(pairs * gu_ld), second(pairs * d_ld), hid(pairs * inter);
  const float *xp = x.data_ptr<float>(), *rp = router.data_ptr<float>();
  #pragma omp parallel num_threads(at::get_num_threads())
  {
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < rows; ++n) {  // each token's row quantized once, copied to its k pairs
      const int64_t p0 = slot[n * k];
      xin.set(p0, xp + n * hidden, hidden);
      for (int64_t j = 1; j < k; ++j) xin.copy_row(p0, slot[n * k + j]);
    }
    #pragma omp for schedule(static)
    for (size_t it = 0; it < gu_items.size(); ++it) {
      const int64_t e = gu_items[it].first, t = gu_items[it].second;
      q8_tile(level, xin, start[e], start[e + 1] - start[e], gate_up[e].data_ptr<uint8_t>(), t,
              first.data() + start[e] * gu_ld + t * TILE, gu_ld);
    }
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
      const float* s = gate_up_scale[expert_of[p]].data_ptr<float>();
      const float* f = first.data() + p * gu_ld;
      float* h = hid.data() + p * inter;
      for (int64_t o = 0; o < inter; ++o) {
        const float g = f[o] * s[o], u = f[inter + o] * s[inter + o];
        h[o] = g / (1.f + std::exp(-g)) * u;
      }
      act.set(p, h, inter);
    }
    #pragma omp for schedule(static)
    for (size_t it = 0; it < d_items.size(); ++it) {
      const int64_t e = d_items[it].first, t = d_items[it].second;
      q8_tile(level, act, start[e], start[e + 1] - start[e], down[e].data_ptr<uint8_t>(), t,
              second.data() + start[e] * d_ld + t * TILE, d_ld);
    }
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < rows; ++n) {
      float* yp = y_data + n * hidden;
      std::fill(yp, yp + hidden, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t p = slot[n * k + j];
        const float r = rp[n * k + j];
        const float* sd = down_scale[expert_of[p]].data_ptr<float>();
        const float* f = second.data() + p * d_ld;
        for (int64_t o = 0; o < hidden; ++o) yp[o] += r * (f[o] * sd[o]);
      }
    }
  }
  return y;
}

// One lightning decode token of one head, its state S [D, D] updated in place in one pass:
// S = decay S + k^T v, and with Out o = q S (without: the update alone, as a rewind replays it).
template <bool Out = true, typename T>
static void lightning_head(const T* q, const T* k, const T* v, T decay, T* S, T* o, int64_t d) {
  if constexpr (Out)
    for (int64_t j = 0; j < d; ++j) o[j] = 0;
  for (int64_t i = 0; i < d; ++i) {
    T* row = S + i * d;
    const T ki = k[i];
    for (int64_t j = 0; j < d; ++j) {
      const T s = decay * row[j] + ki * v[j];
      row[j] = s;
      if constexpr (Out) o[j] += q[i] * s;
    }
  }
}

// One decode token for each of B rows: q, k, v [B, H, D] and pool [S, H, D, D] of one float dtype (float32 or
// float64), slope [H], slots [B] (-1: a padding row, output zeros, no state touched) -> o [B, H, D]; each row's
// state pool[slots[b]] updated in place. Rows of one slot must be consecutive (a request's last token and its
// drafts): they are applied in order, each reading the state its predecessor left. Runs of rows times heads split
// over the threads once there is enough of them.
torch::Tensor lightning_decode_t(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slope,
                                 torch::Tensor pool, torch::Tensor slots) {
  NoGil no_gil;
  TORCH_CHECK(pool.dim() == 4 && pool.is_contiguous() && q.dim() == 3 && q.sizes() == k.sizes() &&
                  q.sizes() == v.sizes() && q.size(1) == pool.size(1) && q.size(2) == pool.size(2) &&
                  pool.size(2) == pool.size(3) && slots.dim() == 1 && slots.size(0) == q.size(0) &&
                  slope.numel() == q.size(1), "lightning_decode shapes");
  TORCH_CHECK((pool.scalar_type() == torch::kFloat32 || pool.scalar_type() == torch::kFloat64) &&
                  q.scalar_type() == pool.scalar_type() && k.scalar_type() == pool.scalar_type() &&
                  v.scalar_type() == pool.scalar_type(), "lightning_decode: q, k, v and the pool of one float dtype");
  for (auto* x : {&q, &k, &v})  // rows of D values, any strides between them (the views of one projection)
    if (x->stride(2) != 1) *x = x->contiguous();
  const auto ids = slots.to(torch::kInt64).contiguous();
  const auto rates = slope.to(pool.scalar_type()).contiguous();
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), num_slots = pool.size(0);
  const int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<int64_t> runs;  // the first row of each run of rows of one slot (a padding row: a run of its own)
  std::vector<char> seen(num_slots, 0);
  for (int64_t r = 0; r < b; ++r) {
    TORCH_CHECK(ip[r] >= -1 && ip[r] < num_slots, "lightning_decode: a slot outside");
    if (r > 0 && ip[r] >= 0 && ip[r] == ip[r - 1]) continue;
    TORCH_CHECK(ip[r] < 0 || !seen[ip[r]], "lightning_decode: the rows of a slot must be consecutive");
    if (ip[r] >= 0) seen[ip[r]] = 1;
    runs.push_back(r);
  }
  const int64_t num_runs = static_cast<int64_t>(runs.size());
  runs.push_back(b);
  auto o = torch::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES(pool.scalar_type(), "lightning_decode", [&] {
    const auto row = [](const torch::Tensor& x, int64_t r, int64_t head) {
      return x.data_ptr<scalar_t>() + r * x.stride(0) + head * x.stride(1);
    };
    const scalar_t* rp = rates.data_ptr<scalar_t>();
    scalar_t *sp = pool.data_ptr<scalar_t>(), *op = o.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * d));  // heads a thread takes at least
    at::parallel_for(0, num_runs * h, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t run = n / h, head = n % h;
        const scalar_t decay = std::exp(-rp[head]);
        for (int64_t r = runs[run]; r < runs[run + 1]; ++r) {
          scalar_t* out = op + (r * h + head) * d;
          if (ip[r] < 0) {
            std::fill(out, out + d, scalar_t(0));
            continue;
          }
          lightning_head(row(q, r, head), row(k, r, head), row(v, r, head), decay,
                         sp + (ip[r] * h + head) * d * d, out, d);
        }
      }
    });
  });
  return o;
}

// The lightning layers' states rewound after a verify step, all layers in one call: for each layer l and each of R
// sequences, its state from before the step (befores[l][rows[r]], [B, H, D, D]) stepped through its first
// counts[r] tokens (rows starts[r].. of ks[l], vs[l] [N, H, D]) into pools[l][slots[r]]: lightning_head's update
// per token, no output.
void lightning_replay_t(std::vector<torch::Tensor> pools, torch::Tensor slots, std::vector<torch::Tensor> befores,
                        torch::Tensor rows, std::vector<torch::Tensor> ks, std::vector<torch::Tensor> vs,
                        std::vector<torch::Tensor> slopes, torch::Tensor starts, torch::Tensor counts) {
  NoGil no_gil;
  const int64_t layers = pools.size();
  TORCH_CHECK(layers > 0 && befores.size() == pools.size() && ks.size() == pools.size() &&
                  vs.size() == pools.size() && slopes.size() == pools.size(),
              "lightning_replay: one of each per layer");
  const auto dtype = pools[0].scalar_type();
  const int64_t h = pools[0].size(1), d = pools[0].size(2);
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kFloat64, "lightning_replay: float32 or float64 states");
  std::vector<torch::Tensor> rates(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const auto &pool = pools[l], &before = befores[l];
    auto &k = ks[l], &v = vs[l];
    TORCH_CHECK(pool.dim() == 4 && pool.is_contiguous() && pool.size(1) == h && pool.size(2) == d &&
                    before.dim() == 4 && before.is_contiguous() && before.sizes().slice(1) == pool.sizes().slice(1) &&
                    before.size(0) == befores[0].size(0) && pool.size(0) == pools[0].size(0) && k.dim() == 3 &&
                    k.sizes() == v.sizes() &&
                    k.size(0) == ks[0].size(0) && k.size(1) == h && k.size(2) == d && slopes[l].numel() == h,
                "lightning_replay shapes");
    TORCH_CHECK(pool.scalar_type() == dtype && before.scalar_type() == dtype && k.scalar_type() == dtype &&
                    v.scalar_type() == dtype, "lightning_replay: states, k and v of one float dtype");
    for (auto* x : {&k, &v})
      if (x->stride(2) != 1) *x = x->contiguous();
    rates[l] = slopes[l].to(dtype).contiguous();
  }
  const auto ints = [](const torch::Tensor& x) { return x.to(torch::kInt64).contiguous(); };
  const auto slot = ints(slots), row = ints(rows), start = ints(starts), count = ints(counts);
  const int64_t r_n = slot.numel();
  TORCH_CHECK(row.numel() == r_n && start.numel() == r_n && count.numel() == r_n, "lightning_replay: R of each");
  const int64_t *sp = slot.data_ptr<int64_t>(), *rp = row.data_ptr<int64_t>(), *tp = start.data_ptr<int64_t>(),
                *cp = count.data_ptr<int64_t>();
  for (int64_t r = 0; r < r_n; ++r)
    TORCH_CHECK(sp[r] >= 0 && sp[r] < pools[0].size(0) && rp[r] >= 0 && rp[r] < befores[0].size(0) && tp[r] >= 0 &&
                    cp[r] >= 0 && tp[r] + cp[r] <= ks[0].size(0), "lightning_replay: an index outside");
  AT_DISPATCH_FLOATING_TYPES(dtype, "lightning_replay", [&] {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * d));
    at::parallel_for(0, layers * r_n * h, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t l = n / (r_n * h), r = n / h % r_n, head = n % h;
        const auto &k = ks[l], &v = vs[l];
        const scalar_t decay = std::exp(-rates[l].data_ptr<scalar_t>()[head]);
        scalar_t* S = pools[l].data_ptr<scalar_t>() + (sp[r] * h + head) * d * d;
        const scalar_t* src = befores[l].data_ptr<scalar_t>() + (rp[r] * h + head) * d * d;
        std::copy(src, src + d * d, S);
        for (int64_t t = tp[r]; t < tp[r] + cp[r]; ++t)
          lightning_head<false, scalar_t>(nullptr, k.data_ptr<scalar_t>() + t * k.stride(0) + head * k.stride(1),
                                          v.data_ptr<scalar_t>() + t * v.stride(0) + head * v.stride(1), decay, S,
                                          nullptr, d);
      }
    });
  });
}

// Registers the entry points the compiled decode step calls as operators of namespace ns (gemv, experts_gemv,
// lightning_decode, gemv_q8, experts_q8): a compiled graph's C++ wrapper then calls them through the dispatcher
// with no Python between.
static std::unique_ptr<torch::Library> registered;

void register_ops(const std::string& ns) {
  TORCH_CHECK(!registered, "register_ops: the operators are registered already");
  registered = std::make_unique<torch::Library>(torch::Library::FRAGMENT, ns, std::nullopt, __FILE__, __LINE__);
  registered->def("gemv(Tensor x, Tensor wt, Tensor? bias) -> Tensor");
  registered->def("experts_gemv(Tensor x, Tensor ids, Tensor router, Tensor gate_up, Tensor down) -> Tensor");
  registered->def("lightning_decode(Tensor q, Tensor k, Tensor v, Tensor slope, Tensor(a!) pool, Tensor slots) -> "
                  "Tensor");
  registered->def("gemv_q8(Tensor x, Tensor w, Tensor scale, Tensor? bias, int level) -> Tensor");
  registered->def("experts_q8(Tensor x, Tensor ids, Tensor router, Tensor[] gate_up, Tensor[] gate_up_scale, "
                  "Tensor[] down, Tensor[] down_scale, int level) -> Tensor");
  registered->impl("gemv", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(gemv_t)));
  registered->impl("experts_gemv", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(experts_gemv_t)));
  registered->impl("lightning_decode", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(lightning_decode_t)));
  registered->impl("gemv_q8", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(gemv_q8_t)));
  registered->impl("experts_q8", torch::dispatch(c10::DispatchKey::CPU, TORCH_FN(experts_q8_t)));
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
    """The built kernels (``gemv_t``, ``experts_gemv_t``, ``gemv_q8_t``, ``experts_q8_t``, ``lightning_decode_t``,
    ``lightning_replay_t``, ``q8_level``), or None where they cannot be built (not Linux, no compiler, a failed
    build). Building them registers ``torch.ops.hyla.gemv``, ``experts_gemv``, ``lightning_decode``, ``gemv_q8``
    and ``experts_q8``: the operators compiled graphs call (C++ from the graph's wrapper to the kernel; their
    shapes for tracing below)."""
    if platform.system() != "Linux":
        return None
    from torch.utils.cpp_extension import load_inline

    functions = ["gemv_t", "experts_gemv_t", "gemv_q8_t", "experts_q8_t", "lightning_decode_t", "lightning_replay_t",
                 "q8_level", "register_ops"]  # fmt: skip
    try:
        module = load_inline(f"hyla_gemv_{_machine_tag()}", _SOURCE, functions=functions,
                             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])  # fmt: skip
    except Exception:  # no compiler, or one that cannot build it: the library path stays
        return None
    module.register_ops("hyla")
    torch.library.register_fake("hyla::gemv", lambda x, wt, bias: x.new_empty(wt.shape[1]))
    torch.library.register_fake("hyla::experts_gemv", lambda x, ids, router, gate_up, down: x.new_empty(x.shape))
    torch.library.register_fake("hyla::lightning_decode", lambda q, k, v, slope, pool, slots: q.new_empty(q.shape))
    torch.library.register_fake("hyla::gemv_q8", lambda x, w, s, bias, level: x.new_empty(*x.shape[:-1], len(s)))
    torch.library.register_fake("hyla::experts_q8", lambda x, ids, router, *weights: x.new_empty(x.shape))
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
    out = torch.ops.hyla.gemv(row, wt, bias) if torch.compiler.is_compiling() else _kernel().gemv_t(row, wt, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def experts_gemv(x: Tensor, weights: Tensor, experts: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """:func:`hyla.ops.moe.swiglu_experts` for a few tokens (its ``"pairs"`` path is the reference): every row's
    ``k`` chosen SwiGLU experts in one call of the kernel (both products of every expert chosen, the rows of their
    weights split over the threads and each read once for all the tokens that chose it, no Python between them),
    summed by router weight. ``x`` ``[N, H]`` float32, ``weights``/``experts`` ``[N, k]`` (a token's experts
    distinct), ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` float32 with each expert's transpose
    contiguous (the serving engine's storage) -> ``[N, H]``. Inside ``torch.compile`` one opaque operation. Only
    where :func:`available`."""
    op = torch.ops.hyla.experts_gemv if torch.compiler.is_compiling() else _kernel().experts_gemv_t
    return op(x, experts, weights.float(), gate_up_proj, down_proj)


def lightning_decode(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, pool: Tensor, slots: Tensor) -> Tensor:
    """:func:`hyla.ops.lightning.lightning_step_slots` (its reference) in one pass over each state: one token for
    each of ``B`` rows, ``S = exp(-slope) S + k^T v`` and ``o = q S`` per head, each row's state ``pool[slots]``
    updated in place. Rows of one slot must be consecutive (a request's last token and its drafts in a verify
    step): they are applied in order, as that many decode steps would. ``q, k, v`` ``[B, H, D]`` and ``pool``
    ``[S, H, D, D]`` of one dtype, float32 or float64; ``slots`` ``[B]`` (``-1``: a padding row, zeros out) -> ``o``
    ``[B, H, D]``. Inside ``torch.compile`` one opaque operation. Only where :func:`available`."""
    op = torch.ops.hyla.lightning_decode if torch.compiler.is_compiling() else _kernel().lightning_decode_t
    return op(q, k, v, slope, pool, slots)


def lightning_replay(
    pools: list[Tensor],
    slots: Tensor,
    befores: list[Tensor],
    rows: Tensor,
    ks: list[Tensor],
    vs: list[Tensor],
    slopes: list[Tensor],
    starts: Tensor,
    counts: Tensor,
) -> None:
    """For each lightning layer ``l``: ``pools[l][slots] = lightning_state(ks[l], vs[l], slopes[l], befores[l][rows],
    segments)`` (:func:`hyla.ops.lightning.lightning_state`, its reference) by stepping each state through its tokens
    as :func:`lightning_decode` does, all layers in one call and one pass over each state: a verify step's rewind.
    Per layer (all of one shape): ``pools[l]`` ``[S, H, D, D]``; ``befores[l]`` ``[B, H, D, D]``; ``ks[l], vs[l]``
    ``[N, H, D]``; ``slopes[l]`` ``[H]``. ``slots``, ``rows`` ``[R]``; ``starts``, ``counts`` ``[R]``: each
    sequence's first row in ``k``/``v`` and tokens (``segments``). Only where :func:`available`."""
    befores = [x.contiguous() for x in befores]
    _kernel().lightning_replay_t(pools, slots, befores, rows, ks, vs, slopes, starts, counts)


def q8_layout(values: Tensor) -> Tensor:
    """An int8 weight ``values`` ``[out, in]`` (one scale per output row kept apart) as :func:`gemv_q8` reads it:
    each value + 128 as an unsigned byte, zero weights padding it to multiples of :data:`Q8_TILE` outputs and
    :data:`Q8_BLOCK` inputs, in tiles of 64 outputs ``[tiles, in / 4, 64, 4]`` (uint8, the same size as the int8
    values but for the padding)."""
    out, inp = values.shape
    tiles, in_p = -(-out // Q8_TILE), -(-inp // Q8_BLOCK) * Q8_BLOCK
    padded = torch.zeros(tiles * Q8_TILE, in_p, dtype=torch.int16)
    padded[:out, :inp] = values
    return (padded + 128).to(torch.uint8).view(tiles, Q8_TILE, in_p // 4, 4).transpose(1, 2).contiguous()


def q8_row(x: Tensor) -> Tensor:
    """The rows as :func:`gemv_q8` multiplies them (its reference): each row of ``x`` ``[..., in]`` float32
    quantized in blocks of :data:`Q8_BLOCK` (scale ``max |x| / 127``, values ``round(x / scale)``) and dequantized ->
    ``[..., in]``."""
    blocks = F.pad(x, (0, -x.shape[-1] % Q8_BLOCK)).unflatten(-1, (-1, Q8_BLOCK))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    values = torch.where(scale > 0, torch.round(blocks / scale), 0.0)
    return (values * scale).flatten(-2)[..., : x.shape[-1]]


def gemv_q8(x: Tensor, layout: Tensor, scale: Tensor, bias: Tensor | None = None, loop: str | None = None) -> Tensor:
    """``F.linear(q8_row(x), W, bias)`` for one row or a few (a decode step's), ``W = values * scale[:, None]`` given
    as ``layout = q8_layout(values)`` (int8 values ``[out, in]``) and ``scale`` ``[out]`` float32: each row quantized
    in blocks of 32 as llama.cpp's q8_0 quantizes activations, int8 x int8 products summed exactly in int32, every
    row through each tile of the weight while it is in cache. ``x`` ``[..., in]`` float32 -> ``[..., out]``.
    ``loop``: one of :func:`q8_loops` (the same sums by each; None:
    the fastest). Inside ``torch.compile`` one opaque operation. Only where :func:`available`."""
    op = torch.ops.hyla.gemv_q8 if torch.compiler.is_compiling() else _kernel().gemv_q8_t
    return op(x, layout, scale, bias, _q8_level(loop))


def experts_q8(
    x: Tensor,
    router: Tensor,
    experts: Tensor,
    gate_up: Sequence[tuple[Tensor, Tensor]],
    down: Sequence[tuple[Tensor, Tensor]],
    loop: str | None = None,
) -> Tensor:
    """Each token's k int8 SwiGLU experts in one call: ``sum_j router[n, j] * D_e(silu(G_e x_n) * U_e x_n)``, ``e =
    experts[n, j]``, with each product as :func:`gemv_q8` computes it (a row quantized once for its k gate/up
    products, each activation once for its down product). ``x`` ``[N, H]`` float32, ``router`` ``[N, k]`` float32,
    ``experts`` ``[N, k]`` int64; ``gate_up[e]`` the ``(layout, scale)`` of expert ``e``'s ``[2I, H]`` gate/up
    weight (gate rows first), ``down[e]`` of its ``[H, I]`` down weight, for every expert -> ``[N, H]``. The
    reference: :func:`gemv_q8` product by product, ``F.silu`` between. Inside ``torch.compile`` one opaque
    operation. Only where :func:`available`."""
    op = torch.ops.hyla.experts_q8 if torch.compiler.is_compiling() else _kernel().experts_q8_t
    (gu_layouts, gu_scales), (d_layouts, d_scales) = (map(list, zip(*pairs, strict=True)) for pairs in (gate_up, down))
    return op(x, experts, router, gu_layouts, gu_scales, d_layouts, d_scales, _q8_level(loop))


def _q8_level(loop: str | None) -> int:
    """The C++ level of ``loop`` (one of :func:`q8_loops`; None: -1, the fastest)."""
    return -1 if loop is None else Q8_LOOPS.index(loop)


@functools.cache
def q8_loops() -> tuple[str, ...]:
    """The loops of :func:`gemv_q8` this CPU runs, slowest first: ``"plain"`` (every CPU: the compiler's
    vectorization), ``"avx2"`` (byte products into int16 pairs, as llama.cpp's q8_0 on AVX2), ``"vnni"``
    (AVX512-VNNI's byte dot products). Empty where the kernel is not built."""
    return Q8_LOOPS[: _kernel().q8_level() + 1] if available() else ()
