"""Optional C++ kernels for ``wint_gemm`` on CPU, built on first use with ``cpp_extension.load``.

They read torch's own int4pack layout (the ``int4pack_weight`` / ``int4pack_scales_zeros``
tensors ``prepare_wint`` already builds), so they need no extra memory:

- ``int4pack_gemm(x_bf16 [M, K], packed, scales_zeros, group) -> fp32 [M, N]``: few-token GEMM.
  Nibbles become bf16 with one OR (``0x4300 | q`` is the bf16 of ``128 + q``) and go through
  ``vdpbf16ps`` (AVX512-BF16), each unpacked weight reused for up to 4 activation rows; the
  ``+128`` is taken out per group with the group sums of x.
- ``int4pack_dequant_t(packed, scales_zeros, group, block0, block1, out)``: ``W^T`` of rows
  ``64*block0 .. 64*block1`` in bf16 ``[K, rows]`` for the dequantize + bf16 GEMM path.
- ``int4pack_gemm_panels(x_bf16 [M, K], packed, scales_zeros, group, kc, ncb) -> fp32 [M, N // 64 * 64]``:
  many-token GEMM (AVX512-BF16 only) over the full 64-row blocks. It dequantizes each block's
  ``kc``-slice once into the bf16 k-pair panel ``vdpbf16ps`` reads and runs every 6-row tile of x
  over it: the dequantization is the packing pass a bf16 GEMM makes of its weight anyway, so it
  costs no extra pass over a bf16 copy of the weight (the dequant path's two).

Registered as ``torch.ops.lowbit_wint.*``; built by ``_cpp_ext`` (once per machine, cached under
``${LOWBIT_CACHE:-~/.cache/lowbit}/ext``). Without AVX512-BF16 the same source compiles to plain C++ loops. ``LOWBIT_WINT_EXT=0`` turns it off. If the build fails, ``load()`` returns None
and warns once; callers fall back to the torch ops.
"""

from __future__ import annotations


import torch

from lowbit.kernels import _cpp_ext

EXT_ENV = "LOWBIT_WINT_EXT"

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOWBIT_AVX512BF16 1
#endif

// torch 2.13 int4pack CPU layout, packed uint8 [N, K/2]: the first N/64*64 rows in blocks of
// 64 rows stored [K][32] bytes (low nibble row j, high nibble row 32+j); a tail of t rows
// stored [K][t/2] bytes (low nibble even row, high nibble odd row).
// scales_zeros bf16 [K/g, N, 2]: w = (q - 8) * scale + zero.

static inline float bf16f(uint16_t v) {
  uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f;
}
static inline uint16_t f2bf16(float f) {  // round to nearest even
  uint32_t u; std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

#ifdef LOWBIT_AVX512BF16
// rows n0..n0+63 (block at pb), activation rows m0..m0+MT-1
template <int MT>
static void gemm_block(const uint16_t* x, int64_t K, const uint8_t* pb, const uint16_t* sz,
                       int64_t N, int64_t n0, int64_t g, const float* xs, float* y) {
  const int64_t G = K / g;
  const __m512i m0f = _mm512_set1_epi16(0x000F);
  const __m512i b43 = _mm512_set1_epi16(0x4300);
  const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int64_t gi = 0; gi < G; ++gi) {
    __m512 acc[MT][4];
    for (int m = 0; m < MT; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
    const int64_t k1 = (gi + 1) * g;
    for (int64_t k = gi * g; k < k1; k += 2) {
      __m256i A = _mm256_loadu_si256((const __m256i*)(pb + k * 32));
      __m256i B = _mm256_loadu_si256((const __m256i*)(pb + (k + 1) * 32));
      __m256i lo = _mm256_unpacklo_epi8(A, B), hi = _mm256_unpackhi_epi8(A, B);
      __m512i w0 = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(lo, hi, 0x20));  // rows 0..15
      __m512i w1 = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(lo, hi, 0x31));  // rows 16..31
      __m512bh r0 = (__m512bh)_mm512_ternarylogic_epi32(w0, m0f, b43, 0xEA);  // (a & b) | c
      __m512bh r1 = (__m512bh)_mm512_ternarylogic_epi32(w1, m0f, b43, 0xEA);
      __m512bh r2 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w0, 4), b43);   // rows 32..47
      __m512bh r3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w1, 4), b43);   // rows 48..63
      for (int m = 0; m < MT; ++m) {
        int32_t pair; std::memcpy(&pair, x + m * K + k, 4);
        __m512bh xp = (__m512bh)_mm512_set1_epi32(pair);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], r0, xp);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], r1, xp);
        acc[m][2] = _mm512_dpbf16_ps(acc[m][2], r2, xp);
        acc[m][3] = _mm512_dpbf16_ps(acc[m][3], r3, xp);
      }
    }
    // acc = sum x * (128 + q); sum x * w = s * acc + (z - 136 s) * sum x
    for (int j = 0; j < 4; ++j) {
      __m512i v = _mm512_loadu_si512((const void*)(sz + (gi * N + n0 + 16 * j) * 2));
      __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      __m512 z = _mm512_castsi512_ps(_mm512_and_si512(v, hi16));
      __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), s, z);
      for (int m = 0; m < MT; ++m) {
        float* yp = y + m * N + n0 + 16 * j;
        __m512 o = _mm512_loadu_ps(yp);
        o = _mm512_fmadd_ps(s, acc[m][j], o);
        o = _mm512_fmadd_ps(c, _mm512_set1_ps(xs[m * G + gi]), o);
        _mm512_storeu_ps(yp, o);
      }
    }
  }
}
#endif

static void gemm_rows_scalar(const uint16_t* x, int64_t M, int64_t K, const uint8_t* packed,
                             const uint16_t* sz, int64_t N, int64_t g, int64_t r0, int64_t r1,
                             float* y) {
  const int64_t nfull = N / 64 * 64, tail = N - nfull;
  std::vector<float> xf(K);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) xf[k] = bf16f(x[m * K + k]);
    for (int64_t n = r0; n < r1; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        int q;
        if (n < nfull) {
          int64_t b = n / 64, j = n % 64;
          uint8_t byte = packed[b * K * 32 + k * 32 + (j % 32)];
          q = j < 32 ? (byte & 15) : (byte >> 4);
        } else {
          int64_t j = n - nfull;
          uint8_t byte = packed[nfull * K / 2 + k * (tail / 2) + j / 2];
          q = (j % 2 == 0) ? (byte & 15) : (byte >> 4);
        }
        const uint16_t* p = sz + ((k / g) * N + n) * 2;
        acc += xf[k] * ((q - 8) * bf16f(p[0]) + bf16f(p[1]));
      }
      y[m * N + n] = acc;
    }
  }
}

at::Tensor int4pack_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t g) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: bf16 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: uint8");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3, "sz: bf16 [K/g, N, 2]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), G = K / g;
  TORCH_CHECK(packed.size(1) * 2 == K && K % g == 0 && g % 2 == 0 && sz.size(0) == G && sz.size(1) == N,
              "int4pack_gemm: shape mismatch");
  auto y = at::zeros({M, N}, x.options().dtype(at::kFloat));
  const uint16_t* xp = (const uint16_t*)x.data_ptr<at::BFloat16>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = (const uint16_t*)sz.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t nfull = N / 64 * 64;
#ifdef LOWBIT_AVX512BF16
  std::vector<float> xs(M * G, 0.f);  // group sums of the bf16 activations
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < G; ++gi) {
      float s = 0.f;
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k) s += bf16f(xp[m * K + k]);
      xs[m * G + gi] = s;
    }
  at::parallel_for(0, nfull / 64, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* pb = pp + b * K * 32;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mt = std::min<int64_t>(4, M - m0);
        const uint16_t* xm = xp + m0 * K;
        const float* xsm = xs.data() + m0 * G;
        float* ym = yp + m0 * N;
        switch (mt) {
          case 1: gemm_block<1>(xm, K, pb, sp, N, b * 64, g, xsm, ym); break;
          case 2: gemm_block<2>(xm, K, pb, sp, N, b * 64, g, xsm, ym); break;
          case 3: gemm_block<3>(xm, K, pb, sp, N, b * 64, g, xsm, ym); break;
          default: gemm_block<4>(xm, K, pb, sp, N, b * 64, g, xsm, ym); break;
        }
      }
    }
  });
  if (nfull < N) gemm_rows_scalar(xp, M, K, pp, sp, N, g, nfull, N, yp);
#else
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    gemm_rows_scalar(xp, M, K, pp, sp, N, g, r0, r1, yp);
  });
#endif
  return y;
}

// out bf16 [K, 64 * (b1 - b0)] = W^T of rows 64*b0 .. 64*b1 (full blocks only)
void int4pack_dequant_t(const at::Tensor& packed, const at::Tensor& sz, int64_t g, int64_t b0, int64_t b1,
                        const at::Tensor& out) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: uint8");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous(), "sz: bf16");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous(), "out: bf16 contiguous");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / g, nc = 64 * (b1 - b0);
  TORCH_CHECK(b0 >= 0 && b1 <= N / 64 && b0 < b1 && out.size(0) == K && out.size(1) == nc,
              "int4pack_dequant_t: bad block range or out shape");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = (const uint16_t*)sz.data_ptr<at::BFloat16>();
  uint16_t* op = (uint16_t*)out.data_ptr<at::BFloat16>();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t gi = g0; gi < g1; ++gi)
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* pb = pp + b * K * 32;
#ifdef LOWBIT_AVX512BF16
        __m512 s[4], c[4];
        const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
        for (int j = 0; j < 4; ++j) {
          __m512i v = _mm512_loadu_si512((const void*)(sp + (gi * N + b * 64 + 16 * j) * 2));
          s[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
          c[j] = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s[j],
                                  _mm512_castsi512_ps(_mm512_and_si512(v, hi16)));
        }
        const __m256i m0f = _mm256_set1_epi8(0x0F);
        for (int64_t k = gi * g; k < (gi + 1) * g; ++k) {
          __m256i A = _mm256_loadu_si256((const __m256i*)(pb + k * 32));
          __m256i lo = _mm256_and_si256(A, m0f);
          __m256i hi = _mm256_and_si256(_mm256_srli_epi16(A, 4), m0f);
          __m128i parts[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                              _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
          uint16_t* row = op + k * nc + (b - b0) * 64;
          for (int j = 0; j < 4; ++j) {
            __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[j]));
            __m256bh w = _mm512_cvtneps_pbh(_mm512_fmadd_ps(q, s[j], c[j]));
            _mm256_storeu_si256((__m256i*)(row + 16 * j), (__m256i)w);
          }
        }
#else
        for (int64_t k = gi * g; k < (gi + 1) * g; ++k)
          for (int j = 0; j < 64; ++j) {
            uint8_t byte = pb[k * 32 + (j % 32)];
            int q = j < 32 ? (byte & 15) : (byte >> 4);
            const uint16_t* p = sp + (gi * N + b * 64 + j) * 2;
            float s = bf16f(p[0]);
            op[k * nc + (b - b0) * 64 + j] = f2bf16(q * s + (bf16f(p[1]) - 8.f * s));
          }
#endif
      }
  });
}

#ifdef LOWBIT_AVX512BF16
// ---- prefill: a blocked GEMM whose pack step is the dequantization ----
// y fp32 [M, 64 * nblk] = x @ W^T over the full 64-row blocks. Per chunk of `ncb` blocks (a thread's
// unit) and slice of `kc` input features, each block is dequantized once into a bf16 panel
// [kc/2][64][2] (the k-pairs vdpbf16ps reads) that every 6-row tile of x then runs over, 24 fp32
// accumulators held in registers across the slice. A bf16 GEMM has to repack its weight into such
// panels too, so the dequantization replaces that pass instead of adding one.
template <int MR>
static inline void panel_tile(const uint16_t* x, int64_t K, const uint16_t* panel, int64_t kp,
                              float* y, int64_t ldy, bool first) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + m * ldy + 16 * j);
  for (int64_t p = 0; p < kp; ++p) {
    const uint16_t* b = panel + p * 128;
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 32);
    __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 64), b3 = (__m512bh)_mm512_loadu_si512(b + 96);
    for (int m = 0; m < MR; ++m) {
      int32_t pair; std::memcpy(&pair, x + m * K + 2 * p, 4);
      __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, b0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, b1);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], a, b2);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], a, b3);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + m * ldy + 16 * j, acc[m][j]);
}

// panel [kc/2][64][2] bf16 = W[n0 .. n0+63, k0 .. k0+kc) of the block at pb (kc even, g even, so a
// k-pair never straddles two groups); values rounded to bf16 as the dequant path's are
static void dequant_panel(const uint8_t* pb, const uint16_t* sz, int64_t N, int64_t n0, int64_t g,
                          int64_t k0, int64_t kc, uint16_t* panel) {
  const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  alignas(64) uint16_t order[32];  // k-pairs: out[2i] = row k's element i, out[2i+1] = row k+1's
  for (int i = 0; i < 16; ++i) { order[2 * i] = i; order[2 * i + 1] = 16 + i; }
  const __m512i idx = _mm512_load_si512(order);
  __m512 s[4], c[4];
  int64_t gcur = -1;
  for (int64_t k = k0; k < k0 + kc; k += 2) {
    if (k / g != gcur) {
      gcur = k / g;
      for (int j = 0; j < 4; ++j) {
        __m512i v = _mm512_loadu_si512((const void*)(sz + (gcur * N + n0 + 16 * j) * 2));
        s[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        c[j] = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s[j], _mm512_castsi512_ps(_mm512_and_si512(v, hi16)));
      }
    }
    __m256i A = _mm256_loadu_si256((const __m256i*)(pb + k * 32));
    __m256i B = _mm256_loadu_si256((const __m256i*)(pb + (k + 1) * 32));
    __m256i alo = _mm256_and_si256(A, m0f), ahi = _mm256_and_si256(_mm256_srli_epi16(A, 4), m0f);
    __m256i blo = _mm256_and_si256(B, m0f), bhi = _mm256_and_si256(_mm256_srli_epi16(B, 4), m0f);
    __m128i qa[4] = {_mm256_castsi256_si128(alo), _mm256_extracti128_si256(alo, 1),
                     _mm256_castsi256_si128(ahi), _mm256_extracti128_si256(ahi, 1)};
    __m128i qb[4] = {_mm256_castsi256_si128(blo), _mm256_extracti128_si256(blo, 1),
                     _mm256_castsi256_si128(bhi), _mm256_extracti128_si256(bhi, 1)};
    uint16_t* out = panel + ((k - k0) / 2) * 128;
    for (int j = 0; j < 4; ++j) {
      __m512 fa = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(qa[j])), s[j], c[j]);
      __m512 fb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(qb[j])), s[j], c[j]);
      __m512i both = (__m512i)_mm512_cvtne2ps_pbh(fb, fa);  // [fa as bf16 | fb as bf16]
      _mm512_storeu_si512(out + 32 * j, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

at::Tensor int4pack_gemm_panels(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sz, int64_t g,
                                int64_t kc, int64_t ncb) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: bf16 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: uint8");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3, "sz: bf16 [K/g, N, 2]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), nblk = N / 64, ldy = nblk * 64;
  TORCH_CHECK(packed.size(1) * 2 == K && K % g == 0 && g % 2 == 0 && sz.size(0) == K / g && sz.size(1) == N,
              "int4pack_gemm_panels: shape mismatch");
  TORCH_CHECK(kc > 0 && kc % 2 == 0 && ncb > 0, "int4pack_gemm_panels: kc must be even and positive, ncb positive");
  auto y = at::empty({M, ldy}, x.options().dtype(at::kFloat));
  const uint16_t* xp = (const uint16_t*)x.data_ptr<at::BFloat16>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = (const uint16_t*)sz.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t KC = std::min(K, kc), nchunks = (nblk + ncb - 1) / ncb;
  constexpr int MR = 6;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<uint16_t> panel(KC * 64);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kk = std::min(KC, K - k0);
        const bool first = k0 == 0;
        for (int64_t b = c * ncb; b < std::min(nblk, (c + 1) * ncb); ++b) {
          dequant_panel(pp + b * K * 32, sp, N, b * 64, g, k0, kk, panel.data());
          int64_t m = 0;
          for (; m + MR <= M; m += MR)
            panel_tile<MR>(xp + m * K + k0, K, panel.data(), kk / 2, yp + m * ldy + b * 64, ldy, first);
          const uint16_t* xr = xp + m * K + k0;
          float* yr = yp + m * ldy + b * 64;
          switch (M - m) {
            case 1: panel_tile<1>(xr, K, panel.data(), kk / 2, yr, ldy, first); break;
            case 2: panel_tile<2>(xr, K, panel.data(), kk / 2, yr, ldy, first); break;
            case 3: panel_tile<3>(xr, K, panel.data(), kk / 2, yr, ldy, first); break;
            case 4: panel_tile<4>(xr, K, panel.data(), kk / 2, yr, ldy, first); break;
            case 5: panel_tile<5>(xr, K, panel.data(), kk / 2, yr, ldy, first); break;
            default: break;
          }
        }
      }
  });
  return y;
}
#else
at::Tensor int4pack_gemm_panels(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "int4pack_gemm_panels needs AVX512-BF16");
  return at::Tensor();
}
#endif

bool has_avx512bf16() {
#ifdef LOWBIT_AVX512BF16
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(lowbit_wint, m) {
  m.def("int4pack_gemm(Tensor x, Tensor packed, Tensor scales_zeros, int group) -> Tensor", &int4pack_gemm);
  m.def("int4pack_dequant_t(Tensor packed, Tensor scales_zeros, int group, int block0, int block1, "
        "Tensor(a!) out) -> ()", &int4pack_dequant_t);
  m.def("int4pack_gemm_panels(Tensor x, Tensor packed, Tensor scales_zeros, int group, int kc, int ncb) -> Tensor",
        &int4pack_gemm_panels);
  m.def("has_avx512bf16() -> bool", &has_avx512bf16);
}
"""


def _selftest(ext) -> None:
    """The kernels assume torch's int4pack layout: check them against the aten op once."""
    from lowbit.kernels.wint import int4pack_layout_known

    if not int4pack_layout_known():
        raise RuntimeError("torch packs int4 weights in another layout on this CPU (AVX2 alone)")
    g = torch.Generator().manual_seed(0)
    n, k, group = 80, 128, 32  # one 64-row block and a 16-row tail
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = (torch.rand(k // group, n, 2, generator=g) - 0.5).to(torch.bfloat16)
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz).float()
    got = ext.int4pack_gemm(x, packed, sz, group)
    wt = torch.empty(k, 64, dtype=torch.bfloat16)
    ext.int4pack_dequant_t(packed, sz, group, 0, 1, wt)
    err = (got - want).norm() / want.norm()
    err_dq = (x.float() @ wt.float() - want[:, :64]).norm() / want[:, :64].norm()
    err_p = 0.0
    if ext.has_avx512bf16():
        yp = ext.int4pack_gemm_panels(x, packed, sz, group, 64, 1)  # two k-slices of the one block
        err_p = (yp - want[:, :64]).norm() / want[:, :64].norm()
    if not (err < 2e-2 and err_dq < 2e-2 and err_p < 2e-2):
        raise RuntimeError(f"self-test against aten int4pack failed (rel. err {err:.3g}, {err_dq:.3g}, {err_p:.3g})")


EXT = _cpp_ext.Extension("wint", _SOURCE, "lowbit_wint", EXT_ENV, _selftest)
load = EXT.load  # the compiled ops, or None (turned off, or the build failed: warned once)
enabled = EXT.enabled
build_dir = EXT.build_dir
