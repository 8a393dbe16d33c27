"""Optional C++ kernel for few-token weight-only GEMMs on CPUs without AVX512 (AVX2 + FMA), on
lowbit's own nibble layout rather than torch's int4pack (whose layout torch changes with the CPU):

- ``nib_gemm(x float32 [M, K], packed uint8 [N, K / 2], scales float32 [N, K / g], offsets float32
  [N, K / g], g) -> float32 [M, N]``: ``y = x @ W^T`` with ``W[n, k] = q[n, k] * scale + offset``
  of k's group, ``q`` the low nibble of ``packed[n, k / 2]`` for even k and the high one for odd k.

Per group it sums ``x * q`` (codes unpacked to float in registers, 32 a step, reused across up to 4
tokens) and adds ``scale * that + offset * sum(x)``, so the weight is read once at half a byte a
value: decode (one token) is what this is for, where float32 weights would be read at four bytes.
Activations stay float32 (no bf16 rounding). Groups must be multiples of 32 for the vector loop;
others run a scalar loop.

Registered as ``torch.ops.lowbit_nib.*`` and built by ``_cpp_ext``; ``LOWBIT_NIB_EXT=0`` turns it
off, and a failed build or self-test warns once and the dispatcher uses the other backends.
"""

from __future__ import annotations

import torch

from lowbit.kernels import _cpp_ext

EXT_ENV = "LOWBIT_NIB_EXT"

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_NIB_AVX2 1
#endif

// rows n of W against MT tokens of x; y[m * N + n] written
template <int MT>
static void nib_rows(const float* x, int64_t K, const uint8_t* packed, const float* sc, const float* off,
                     int64_t G, int64_t g, const float* xs, int64_t N, int64_t n0, int64_t n1, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* pr = packed + n * (K / 2);
    float out[MT];
    for (int m = 0; m < MT; ++m) out[m] = 0.f;
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t k0 = gi * g;
      float dot[MT];
#ifdef LOWBIT_NIB_AVX2
      if (g % 32 == 0) {
        __m256 acc[MT];
        for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
        const __m128i m0f = _mm_set1_epi8(0x0F);
        for (int64_t k = k0; k < k0 + g; k += 32) {
          __m128i b = _mm_loadu_si128((const __m128i*)(pr + k / 2));  // codes k .. k+31
          __m128i lo = _mm_and_si128(b, m0f);                        // even k
          __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m0f);     // odd k
          __m128i c0 = _mm_unpacklo_epi8(lo, hi);                    // k .. k+15
          __m128i c1 = _mm_unpackhi_epi8(lo, hi);                    // k+16 .. k+31
          __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c0));
          __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8)));
          __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c1));
          __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8)));
          for (int m = 0; m < MT; ++m) {
            const float* xm = x + m * K + k;
            acc[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m]);
            acc[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m]);
            acc[m] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), acc[m]);
            acc[m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), acc[m]);
          }
        }
        for (int m = 0; m < MT; ++m) {
          __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
          s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
          s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
          dot[m] = _mm_cvtss_f32(s4);
        }
      } else
#endif
      {
        for (int m = 0; m < MT; ++m) dot[m] = 0.f;
        for (int64_t k = k0; k < k0 + g; ++k) {
          const uint8_t byte = pr[k / 2];
          const float q = (float)((k & 1) ? (byte >> 4) : (byte & 15));
          for (int m = 0; m < MT; ++m) dot[m] += x[m * K + k] * q;
        }
      }
      const float s = sc[n * G + gi], o = off[n * G + gi];
      for (int m = 0; m < MT; ++m) out[m] += s * dot[m] + o * xs[m * G + gi];
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = out[m];
  }
}

at::Tensor nib_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sc, const at::Tensor& off,
                    int64_t g) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [M, K]");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: uint8 [N, K/2]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(K % 2 == 0 && packed.size(1) * 2 == K && g > 0 && K % g == 0, "nib_gemm: shape mismatch");
  const int64_t G = K / g;
  for (const at::Tensor* t : {&sc, &off})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                t->size(1) == G, "scales/offsets: float32 [N, K/g]");
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  std::vector<float> xs(M * G, 0.f);  // per-group sums of x, times each group's offset
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < G; ++gi) {
      float s = 0.f;
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k) s += xp[m * K + k];
      xs[m * G + gi] = s;
    }
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* op = off.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = std::min<int64_t>(4, M - m0);
      const float* xm = xp + m0 * K;
      const float* xsm = xs.data() + m0 * G;
      float* ym = yp + m0 * N;
      switch (mt) {
        case 1: nib_rows<1>(xm, K, pp, sp, op, G, g, xsm, N, n0, n1, ym); break;
        case 2: nib_rows<2>(xm, K, pp, sp, op, G, g, xsm, N, n0, n1, ym); break;
        case 3: nib_rows<3>(xm, K, pp, sp, op, G, g, xsm, N, n0, n1, ym); break;
        default: nib_rows<4>(xm, K, pp, sp, op, G, g, xsm, N, n0, n1, ym); break;
      }
    }
  });
  return y;
}

bool has_avx2() {
#ifdef LOWBIT_NIB_AVX2
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(lowbit_nib, m) {
  m.def("nib_gemm(Tensor x, Tensor packed, Tensor scales, Tensor offsets, int group) -> Tensor", &nib_gemm);
  m.def("has_avx2() -> bool", &has_avx2);
}
"""


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] from codes [N, K] in 0..15: even k in the low nibble, odd k in the high one."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] from ``pack_nibbles``' output."""
    return torch.stack([packed & 15, packed >> 4], dim=2).reshape(packed.shape[0], -1)


def _selftest(ext) -> None:
    """Against a float32 dequantize + matmul, on a vector-loop group (64) and a scalar one (24)."""
    g = torch.Generator().manual_seed(0)
    for group, m in ((64, 5), (24, 2)):
        n, k = 40, 192
        q = torch.randint(0, 16, (n, k), generator=g)
        sc = torch.rand(n, k // group, generator=g) + 0.1
        off = torch.randn(n, k // group, generator=g)
        x = torch.randn(m, k, generator=g)
        w = q.float() * sc.repeat_interleave(group, 1) + off.repeat_interleave(group, 1)
        want = x @ w.t()
        got = ext.nib_gemm(x, pack_nibbles(q), sc, off, group)
        err = float((got - want).norm() / want.norm())
        if not err < 1e-5:
            raise RuntimeError(f"self-test against float32 failed (group {group}: rel. err {err:.3g})")


EXT = _cpp_ext.Extension("nib", _SOURCE, "lowbit_nib", EXT_ENV, _selftest)
load = EXT.load  # the compiled ops, or None (turned off, or the build failed: warned once)
