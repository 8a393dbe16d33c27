"""Optional C++ kernels around the int8 GEMM on CPU: the activation quantizers and the epilogue, each
one pass over its tensor (the torch expressions they replace take four to six passes and float32
temporaries as large as the activation).

- ``quantize_per_token(x [M, K], offset) -> (codes [M, K], scales [M, 1] float32)``: each row's
  absmax / 127 (floored at 1e-12), codes ``clamp(round(x / scale), -127, 127) + offset``; int8 for
  offset 0, uint8 for offset 128 (what oneDNN's u8 x s8 GEMM takes).
- ``quantize_scaled(x [M, K], scale, offset) -> codes``: the same on one given scale (per-tensor or
  static activations).
- ``dequantize_acc(acc [M, N] int32 or float32, x_scale [1] or [M], w_scale [1] or [N], bias [N]?,
  out_dtype) -> [M, N]``: ``acc * x_scale * w_scale + bias`` in float32, rounded once to out_dtype.

x may be float32, bfloat16 or float16 (contiguous). Results are bit-identical to the torch
expressions in ``int8_gemm`` (``x.float() / scale`` is a true division, rounding is half-to-even
like ``torch.round``, the epilogue multiplies then adds in the same order; ``-ffp-contract=off``
keeps the compiler from fusing them into FMAs), which the tests check.

Registered as ``torch.ops.lowbit_int8.*`` and built by ``_cpp_ext``. ``LOWBIT_INT8_EXT=0`` turns it
off; a failed build warns once and the callers use the torch expressions.
"""

from __future__ import annotations


import torch

from lowbit.kernels import _cpp_ext

EXT_ENV = "LOWBIT_INT8_EXT"
CFLAGS = ("-ffp-contract=off",)

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LOWBIT_AVX512 1
#endif

template <typename T> static inline float to_f(T v) { return static_cast<float>(v); }

#ifdef LOWBIT_AVX512
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline void store16(c10::BFloat16* p, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
#else
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int i = 0; i < 16; ++i) p[i] = c10::BFloat16(t[i]);
#endif
}
#endif

// codes of one row on scale s: clamp(round(x / s), -127, 127) + offset (half-to-even rounding)
template <typename T, typename Q>
static void quantize_row(const T* x, int64_t K, float s, int offset, Q* q) {
  int64_t k = 0;
#ifdef LOWBIT_AVX512
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i off = _mm512_set1_epi32(offset);
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_div_ps(load16(x + k), vs);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    __m512i i = _mm512_add_epi32(_mm512_cvtps_epi32(v), off);
    __m128i b = offset ? _mm512_cvtusepi32_epi8(i) : _mm512_cvtsepi32_epi8(i);
    _mm_storeu_si128((__m128i*)(q + k), b);
  }
#endif
  for (; k < K; ++k) {
    float v = std::nearbyint(to_f(x[k]) / s);
    v = std::min(std::max(v, -127.f), 127.f);
    q[k] = static_cast<Q>(static_cast<int>(v) + offset);
  }
}

template <typename T>
static float row_absmax(const T* x, int64_t K) {
  float m = 0.f;
  int64_t k = 0;
#ifdef LOWBIT_AVX512
  __m512 vm = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) vm = _mm512_max_ps(vm, _mm512_abs_ps(load16(x + k)));
  m = _mm512_reduce_max_ps(vm);
#endif
  for (; k < K; ++k) m = std::max(m, std::fabs(to_f(x[k])));
  return m;
}

static void check_x(const at::Tensor& x, int64_t offset) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x: contiguous CPU [M, K]");
  TORCH_CHECK(offset == 0 || offset == 128, "offset must be 0 (int8 codes) or 128 (uint8 codes)");
}

static int64_t grain(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

template <typename T>
static void per_token_impl(const at::Tensor& x, int64_t offset, at::Tensor& q, at::Tensor& s) {
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = x.data_ptr<T>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, grain(K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float sc = row_absmax(xp + m * K, K) / 127.f;
      if (sc < 1e-12f) sc = 1e-12f;
      sp[m] = sc;
      if (offset) quantize_row(xp + m * K, K, sc, (int)offset, q.data_ptr<uint8_t>() + m * K);
      else quantize_row(xp + m * K, K, sc, 0, q.data_ptr<int8_t>() + m * K);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t offset) {
  check_x(x, offset);
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(offset ? at::kByte : at::kChar));
  auto s = at::empty({M, 1}, x.options().dtype(at::kFloat));
  switch (x.scalar_type()) {
    case at::kFloat: per_token_impl<float>(x, offset, q, s); break;
    case at::kBFloat16: per_token_impl<c10::BFloat16>(x, offset, q, s); break;
    case at::kHalf: per_token_impl<c10::Half>(x, offset, q, s); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  return {q, s};
}

template <typename T>
static void scaled_impl(const at::Tensor& x, float sc, int64_t offset, at::Tensor& q) {
  const int64_t M = x.size(0), K = x.size(1);
  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, M, grain(K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (offset) quantize_row(xp + m * K, K, sc, (int)offset, q.data_ptr<uint8_t>() + m * K);
      else quantize_row(xp + m * K, K, sc, 0, q.data_ptr<int8_t>() + m * K);
    }
  });
}

at::Tensor quantize_scaled(const at::Tensor& x, double scale, int64_t offset) {
  check_x(x, offset);
  const float sc = (float)scale;
  TORCH_CHECK(sc > 0.f && std::isfinite(sc), "scale must be finite and positive");
  auto q = at::empty({x.size(0), x.size(1)}, x.options().dtype(offset ? at::kByte : at::kChar));
  switch (x.scalar_type()) {
    case at::kFloat: scaled_impl<float>(x, sc, offset, q); break;
    case at::kBFloat16: scaled_impl<c10::BFloat16>(x, sc, offset, q); break;
    case at::kHalf: scaled_impl<c10::Half>(x, sc, offset, q); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  return q;
}

// y = acc * xs[m] * ws[n] (+ b[n]), float32 math in this order, one rounding to the output type
template <typename A, typename O>
static void dequant_impl(const A* acc, int64_t M, int64_t N, const float* xs, bool xs_row, const float* ws,
                         bool ws_col, const float* b, O* y) {
  at::parallel_for(0, M, grain(N), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float xm = xs[xs_row ? m : 0];
      const A* a = acc + m * N;
      O* o = y + m * N;
      int64_t n = 0;
#ifdef LOWBIT_AVX512
      const __m512 vx = _mm512_set1_ps(xm), w0 = _mm512_set1_ps(ws[0]);
      for (; n + 16 <= N; n += 16) {
        __m512 v;
        if constexpr (std::is_same_v<A, int32_t>) v = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void*)(a + n)));
        else v = _mm512_loadu_ps(a + n);
        v = _mm512_mul_ps(v, vx);
        v = _mm512_mul_ps(v, ws_col ? _mm512_loadu_ps(ws + n) : w0);
        if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + n));
        store16(o + n, v);
      }
#endif
      for (; n < N; ++n) {
        float v = static_cast<float>(a[n]) * xm;
        v = v * ws[ws_col ? n : 0];
        if (b) v = v + b[n];
        o[n] = static_cast<O>(v);
      }
    }
  });
}

template <typename A>
static void dequant_out(const at::Tensor& acc, const float* xs, bool xs_row, const float* ws, bool ws_col,
                        const float* b, at::Tensor& y) {
  const int64_t M = acc.size(0), N = acc.size(1);
  const A* a = acc.data_ptr<A>();
  switch (y.scalar_type()) {
    case at::kFloat: dequant_impl(a, M, N, xs, xs_row, ws, ws_col, b, y.data_ptr<float>()); break;
    case at::kBFloat16: dequant_impl(a, M, N, xs, xs_row, ws, ws_col, b, y.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: dequant_impl(a, M, N, xs, xs_row, ws, ws_col, b, y.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "out_dtype must be float32, bfloat16 or float16");
  }
}

at::Tensor dequantize_acc(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                          const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.device().is_cpu(), "acc: contiguous CPU [M, N]");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous() &&
              (x_scale.numel() == 1 || x_scale.numel() == M), "x_scale: float32, 1 or M elements");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() &&
              (w_scale.numel() == 1 || w_scale.numel() == N), "w_scale: float32, 1 or N elements");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias: float32 [N]");
    b = bias->data_ptr<float>();
  }
  auto y = at::empty({M, N}, acc.options().dtype(out_dtype));
  const bool xs_row = x_scale.numel() == M && M != 1, ws_col = w_scale.numel() == N && N != 1;
  const float* xs = x_scale.data_ptr<float>();
  const float* ws = w_scale.data_ptr<float>();
  if (acc.scalar_type() == at::kInt) dequant_out<int32_t>(acc, xs, xs_row, ws, ws_col, b, y);
  else if (acc.scalar_type() == at::kFloat) dequant_out<float>(acc, xs, xs_row, ws, ws_col, b, y);
  else TORCH_CHECK(false, "acc must be int32 or float32");
  return y;
}

TORCH_LIBRARY(lowbit_int8, m) {
  m.def("quantize_per_token(Tensor x, int offset) -> (Tensor, Tensor)", &quantize_per_token);
  m.def("quantize_scaled(Tensor x, float scale, int offset) -> Tensor", &quantize_scaled);
  m.def("dequantize_acc(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
        &dequantize_acc);
}
"""


def _selftest(ext) -> None:
    """One small case of each op against the torch expressions, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 37, generator=g) * 3).to(torch.bfloat16)
    q, s = ext.quantize_per_token(x, 0)
    want_s = x.abs().amax(dim=-1, keepdim=True).float().div_(127).clamp_(min=1e-12)
    want_q = torch.clamp(torch.round(x.float() / want_s), -127, 127).to(torch.int8)
    acc = torch.randint(-2**20, 2**20, (5, 19), generator=g, dtype=torch.int32)
    ws, b = torch.rand(19, generator=g), torch.randn(19, generator=g)
    y = ext.dequantize_acc(acc, s.reshape(-1), ws, b, torch.bfloat16)
    want_y = (acc.float() * s * ws + b).to(torch.bfloat16)
    if not (torch.equal(q, want_q) and torch.equal(s, want_s) and torch.equal(y, want_y)):
        raise RuntimeError("self-test against the torch expressions failed")


EXT = _cpp_ext.Extension("int8", _SOURCE, "lowbit_int8", EXT_ENV, _selftest, CFLAGS)
load = EXT.load  # the compiled ops, or None (turned off, or the build failed: warned once)
enabled = EXT.enabled
build_dir = EXT.build_dir
