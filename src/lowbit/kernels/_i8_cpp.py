"""Optional C++ kernel for few-token int8 x int8 GEMMs on CPUs with AVX2 but no u8 x s8 dot product
instruction (no VNNI), where torch's ``_int_mm`` is a scalar loop and oneDNN's AVX2 int8 kernel
saturates:

- ``i8_gemm(qx int8 [M, K], qw int8 [N, K]) -> int32 [M, N]``: ``qx @ qw^T``, exact.

AVX2's only 8-bit multiply, ``vpmaddubsw``, takes one unsigned and one signed operand and adds pairs
of products in saturating int16. With the sign moved from the weight to the activation
(``|w| * (sign(w) x)``, one ``vpabsb`` per weight vector, one ``vpsignb`` per product vector) and
activation codes in [-127, 127] (what lowbit's quantizers give), a pair is at most 2 * 128 * 127 =
32512: it never saturates, so the result is exact for any int8 weight (-128 included: the weights
of W8A8Linear are on compressed-tensors' absmax / 127.5 grid, which uses it). ``vpmaddwd`` against ones widens the pair sums to int32. That is about as many
instructions per product as a float32 FMA, so prefill runs at float32 GEMM speed (no slower); the
gain is the bytes: the weight is read at one byte a value instead of four, which is what decides a
GEMV (decode). Two weight rows a pass share the activation loads, each serving up to 4 tokens, and
the next pass's rows are prefetched (streamed from DRAM, 4096 x 4096 at one token went from 2.0 to
0.9-1.3 ms with it).

Registered as ``torch.ops.lowbit_i8.*`` and built by ``_cpp_ext``; ``LOWBIT_I8_EXT=0`` turns it
off, and a failed build or self-test warns once and ``int8_gemm`` keeps its other backends.
"""

from __future__ import annotations

import torch

from lowbit.kernels import _cpp_ext

EXT_ENV = "LOWBIT_I8_EXT"

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#define LOWBIT_I8_AVX2 1
#endif

#ifdef LOWBIT_I8_AVX2
static inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// rows n0..n1 of W against MT tokens: y[m * N + n] = sum_k x[m, k] * w[n, k], x in [-127, 127].
// Two rows a pass share the loads of x.
template <int MT>
static void i8_rows(const int8_t* x, int64_t K, const int8_t* w, int64_t N, int64_t n0, int64_t n1, int32_t* y) {
  int64_t K32 = 0;
#ifdef LOWBIT_I8_AVX2
  K32 = K / 32 * 32;
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  int64_t n = n0;
#ifdef LOWBIT_I8_AVX2
  for (; n + 2 <= n1; n += 2) {
    const int8_t* w0 = w + n * K;
    const int8_t* w1 = w0 + K;
    __m256i a0[MT], a1[MT];
    for (int m = 0; m < MT; ++m) a0[m] = a1[m] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K32; k += 32) {
      _mm_prefetch((const char*)(w0 + 2 * K + k), _MM_HINT_T0);  // the next pass's rows
      _mm_prefetch((const char*)(w1 + 2 * K + k), _MM_HINT_T0);
      const __m256i v0 = _mm256_loadu_si256((const __m256i*)(w0 + k));
      const __m256i v1 = _mm256_loadu_si256((const __m256i*)(w1 + k));
      const __m256i u0 = _mm256_abs_epi8(v0), u1 = _mm256_abs_epi8(v1);  // |-128| = 128 as uint8
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + m * K + k));
        // |w| * (sign(w) x): pairs of at most 2 * 128 * 127 < 2^15, so the int16 sums never saturate
        a0[m] = _mm256_add_epi32(a0[m], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(xv, v0)), ones));
        a1[m] = _mm256_add_epi32(a1[m], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(xv, v1)), ones));
      }
    }
    for (int m = 0; m < MT; ++m) {
      int32_t o0 = hsum8i(a0[m]), o1 = hsum8i(a1[m]);
      for (int64_t k = K32; k < K; ++k) {
        o0 += (int32_t)x[m * K + k] * (int32_t)w0[k];
        o1 += (int32_t)x[m * K + k] * (int32_t)w1[k];
      }
      y[m * N + n] = o0;
      y[m * N + n + 1] = o1;
    }
  }
#endif
  for (; n < n1; ++n) {  // the last odd row, and every row without AVX2
    const int8_t* wr = w + n * K;
    for (int m = 0; m < MT; ++m) {
      int32_t o = 0;
#ifdef LOWBIT_I8_AVX2
      __m256i acc = _mm256_setzero_si256();
      for (int64_t k = 0; k < K32; k += 32) {
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + k));
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + m * K + k));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), ones));
      }
      o = hsum8i(acc);
#endif
      for (int64_t k = K32; k < K; ++k) o += (int32_t)x[m * K + k] * (int32_t)wr[k];
      y[m * N + n] = o;
    }
  }
}

at::Tensor i8_gemm(const at::Tensor& qx, const at::Tensor& qw) {
  TORCH_CHECK(qx.dim() == 2 && qx.scalar_type() == at::kChar && qx.is_contiguous(), "qx: int8 [M, K], contiguous");
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == at::kChar && qw.is_contiguous(), "qw: int8 [N, K], contiguous");
  const int64_t M = qx.size(0), K = qx.size(1), N = qw.size(0);
  TORCH_CHECK(qw.size(1) == K, "i8_gemm: qx has ", K, " features, qw ", qw.size(1));
  const int8_t* xp = qx.data_ptr<int8_t>();
  for (int64_t i = 0; i < M * K; ++i)  // sign(w) * -128 has no int8 value
    TORCH_CHECK(xp[i] != -128, "i8_gemm: activation codes must lie in [-127, 127]");
  auto y = at::empty({M, N}, qx.options().dtype(at::kInt));
  if (M == 0 || N == 0) return y;
  const int8_t* wp = qw.data_ptr<int8_t>();
  int32_t* yp = y.data_ptr<int32_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = std::min<int64_t>(4, M - m0);
      const int8_t* xm = xp + m0 * K;
      int32_t* ym = yp + m0 * N;
      switch (mt) {
        case 1: i8_rows<1>(xm, K, wp, N, n0, n1, ym); break;
        case 2: i8_rows<2>(xm, K, wp, N, n0, n1, ym); break;
        case 3: i8_rows<3>(xm, K, wp, N, n0, n1, ym); break;
        default: i8_rows<4>(xm, K, wp, N, n0, n1, ym); break;
      }
    }
  });
  return y;
}

bool has_avx2() {
#ifdef LOWBIT_I8_AVX2
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(lowbit_i8, m) {
  m.def("i8_gemm(Tensor qx, Tensor qw) -> Tensor", &i8_gemm);
  m.def("has_avx2() -> bool", &has_avx2);
}
"""


def _selftest(ext) -> None:
    """Exact against an int64 matmul, the extreme codes included, on shapes with a K tail (K % 32)."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 37, 96), (5, 41, 576), (3, 9, 70)):
        qx = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        qw = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        qx[0, :8] = -127
        qx[-1, 8:16] = 127
        qw[0, :16] = -128
        qw[-1, :16] = 127
        want = qx.long() @ qw.long().t()
        got = ext.i8_gemm(qx.contiguous(), qw.contiguous())
        if not torch.equal(got.long(), want):
            raise RuntimeError(f"self-test against int64 matmul failed ({m}x{k} @ {n}x{k})")


EXT = _cpp_ext.Extension("i8", _SOURCE, "lowbit_i8", EXT_ENV, _selftest)
load = EXT.load  # the compiled ops, or None (turned off, or the build failed: warned once)
