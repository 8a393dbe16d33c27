"""Optional C++ kernel for few-token weight-only GEMMs on CPUs without AVX512 (AVX2 + FMA), on
lowbit's own nibble layout rather than torch's int4pack (whose layout torch changes with the CPU):

- ``nib_gemm(x float32 [M, K], packed uint8 [N, K / 2], scales float32 [N, K / g], offsets float32
  [N, K / g], g) -> float32 [M, N]``: ``y = x @ W^T`` with ``W[n, k] = q[n, k] * scale + offset``
  of k's group; ``pack_nibbles`` gives the layout (K a multiple of 32).
- ``nib_dequant(packed, scales, offsets, g, n0, n1, out)``: rows n0..n1 of W in float32 into ``out``
  (the prefill path's weights, one pass from the nibbles).
- ``lut_dequant(packed, scales, codebook, g, n0, n1, out)``: the same for 4-bit codebook weights (NF4),
  ``W[n, k] = codebook[q[n, k]] * scale`` of k's group: a 16-entry table per group, one lookup a weight.
- ``lut_gemm(x, packed, scales, codebook, g)``: few-token GEMM on such weights, the table lookups done in
  registers (two vpermps and a blend per eight codes) and the products in float32.

Each token is rounded to int16 codes on its own absmax / 32767 (2^-16 of its largest value: far
finer than the bf16 activations of the other fast paths), so the products are 16 int16 x int16
pairs a `vpmaddwd`, summed in int32 per group, then ``scale * x_scale * dot + offset * sum(x)``
in float32. The weight is read once at half a byte a value and each unpacked code serves up to 4
tokens. The codes are widened to int16 once a byte (both nibbles: one AND, one shift), and the
offsets' part is summed 8 groups a vector. Decode (one token) is what this is for. Groups must be
multiples of 32 (at most 4096) for the vector loop; others run a scalar loop.

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
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_NIB_AVX2 1
#endif

// code k of a row: chunk c = k / 32, i = k % 32; byte c * 16 + i % 16, low nibble for i < 16
static inline int nib_code(const uint8_t* row, int64_t k) {
  const uint8_t b = row[(k / 32) * 16 + (k % 16)];
  return (k % 32) < 16 ? (b & 15) : (b >> 4);
}

#ifdef LOWBIT_NIB_AVX2
static inline float hsum8(__m256 v) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}

// row n of W against MT tokens, g a multiple of 32. Per group: int32 lanes of x_codes * q, turned
// into float lanes times the group's scale; the offsets' part (offset * sum of x over the group) in
// float lanes 8 groups at a time; one horizontal sum per token at the end. (Two rows a pass, sharing
// the loads of x, measured slower: 5.2 against 3.8 ms at g64 on 11008 x 4096, one thread.)
template <int MT>
static inline void nib_row_avx2(const int16_t* xq, const float* xsc, int64_t K, const uint8_t* packed,
                                const float* sc, const float* off, int64_t G, int64_t g, const float* xs,
                                int64_t N, int64_t n, float* y) {
  const uint8_t* pr = packed + n * (K / 2);
  const float* scn = sc + n * G;
  const float* offn = off + n * G;
  __m256 accf[MT];
  for (int m = 0; m < MT; ++m) accf[m] = _mm256_setzero_ps();
  const __m256i lo4 = _mm256_set1_epi16(0x0F);
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256i acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_si256();
    for (int64_t k = gi * g; k < (gi + 1) * g; k += 32) {
      // bytes widened to int16: the low nibble is code k + i, the high one code k + 16 + i
      const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(pr + k / 2)));
      const __m256i w0 = _mm256_and_si256(b, lo4);
      const __m256i w1 = _mm256_srli_epi16(b, 4);
      for (int m = 0; m < MT; ++m) {
        const int16_t* xm = xq + m * K + k;
        // at most 2 * 15 * 32767 a pair: int32 lanes hold groups of up to 4096
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)xm)));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(xm + 16))));
      }
    }
    const __m256 s = _mm256_broadcast_ss(scn + gi);
    for (int m = 0; m < MT; ++m) accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), s, accf[m]);
  }
  for (int m = 0; m < MT; ++m) {
    __m256 o = _mm256_setzero_ps();
    int64_t gi = 0;
    for (; gi + 8 <= G; gi += 8) o = _mm256_fmadd_ps(_mm256_loadu_ps(offn + gi), _mm256_loadu_ps(xs + m * G + gi), o);
    float ot = 0.f;
    for (; gi < G; ++gi) ot += offn[gi] * xs[m * G + gi];
    y[m * N + n] = hsum8(accf[m]) * xsc[m] + hsum8(o) + ot;
  }
}
#endif

// rows n0..n1 of W against MT tokens; xq: int16 [MT, K] codes of x (scale xsc[m]); y[m * N + n]
template <int MT>
static void nib_rows(const int16_t* xq, const float* xsc, int64_t K, const uint8_t* packed, const float* sc,
                     const float* off, int64_t G, int64_t g, const float* xs, int64_t N, int64_t n0, int64_t n1,
                     float* y) {
#ifdef LOWBIT_NIB_AVX2
  if (g % 32 == 0) {
    for (int64_t n = n0; n < n1; ++n) nib_row_avx2<MT>(xq, xsc, K, packed, sc, off, G, g, xs, N, n, y);
    return;
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* pr = packed + n * (K / 2);
    const float* scn = sc + n * G;
    const float* offn = off + n * G;
    float out[MT];
    for (int m = 0; m < MT; ++m) {  // the offsets' part: sum over groups of offset * sum(x)
      float o = 0.f;
      for (int64_t gi = 0; gi < G; ++gi) o += offn[gi] * xs[m * G + gi];
      out[m] = o;
    }
    for (int64_t gi = 0; gi < G; ++gi) {
      int64_t dot[MT];
      for (int m = 0; m < MT; ++m) dot[m] = 0;
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k) {
        const int q = nib_code(pr, k);
        for (int m = 0; m < MT; ++m) dot[m] += (int64_t)xq[m * K + k] * q;
      }
      for (int m = 0; m < MT; ++m) out[m] += scn[gi] * ((float)dot[m] * xsc[m]);
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = out[m];
  }
}

at::Tensor nib_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sc, const at::Tensor& off,
                    int64_t g) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [M, K]");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: uint8 [N, K/2]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(K % 32 == 0 && packed.size(1) * 2 == K && g > 0 && K % g == 0 && g <= 4096,
              "nib_gemm: shape mismatch (K a multiple of 32, groups of at most 4096)");
  const int64_t G = K / g;
  for (const at::Tensor* t : {&sc, &off})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                t->size(1) == G, "scales/offsets: float32 [N, K/g]");
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  // x as int16 codes per token (absmax / 32767: 2^-16 of the row's largest value, finer than bf16),
  // and the float group sums that multiply each group's offset
  std::vector<int16_t> xq(M * K);
  std::vector<float> xsc(M), xs(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xp[m * K + k]));
    const float scale = amax > 0.f ? amax / 32767.f : 1.f;
    xsc[m] = scale;
    const float inv = 1.f / scale;
    for (int64_t k = 0; k < K; ++k) xq[m * K + k] = (int16_t)std::lrintf(xp[m * K + k] * inv);
    for (int64_t gi = 0; gi < G; ++gi) {
      float s = 0.f;
      for (int64_t k = gi * g; k < (gi + 1) * g; ++k) s += xp[m * K + k];
      xs[m * G + gi] = s;
    }
  }
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* op = off.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = std::min<int64_t>(4, M - m0);
      const int16_t* xm = xq.data() + m0 * K;
      const float* xscm = xsc.data() + m0;
      const float* xsm = xs.data() + m0 * G;
      float* ym = yp + m0 * N;
      switch (mt) {
        case 1: nib_rows<1>(xm, xscm, K, pp, sp, op, G, g, xsm, N, n0, n1, ym); break;
        case 2: nib_rows<2>(xm, xscm, K, pp, sp, op, G, g, xsm, N, n0, n1, ym); break;
        case 3: nib_rows<3>(xm, xscm, K, pp, sp, op, G, g, xsm, N, n0, n1, ym); break;
        default: nib_rows<4>(xm, xscm, K, pp, sp, op, G, g, xsm, N, n0, n1, ym); break;
      }
    }
  });
  return y;
}

#ifdef LOWBIT_NIB_AVX2
// eight 4-bit codes (the low bytes of idx as int32) -> eight table values: entries 0-7 from t0, 8-15 from
// t1, picked by the code's bit 3 (moved to the sign bit for blendv)
static inline __m256 lut8(__m256 t0, __m256 t1, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#endif

// the argument checks nib_dequant, lut_dequant and lut_gemm share: packed nibbles [N, K/2], one float32
// [N, K/g] table per group for each of `tables`; returns K
static int64_t check_packed(const char* fn, const at::Tensor& packed, int64_t g,
                            std::initializer_list<const at::Tensor*> tables) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: uint8 [N, K/2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % 32 == 0 && g > 0 && K % g == 0, fn, ": K a multiple of 32 and of the group");
  for (const at::Tensor* t : tables)
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                t->size(1) == K / g, fn, ": scales/offsets must be float32 [N, K/g]");
  return K;
}

static void check_rows_out(const char* fn, int64_t N, int64_t K, int64_t n0, int64_t n1, const at::Tensor& out) {
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, fn, ": rows out of range");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() >= (n1 - n0) * K,
              fn, ": out must be a contiguous float32 buffer of (n1 - n0) * K");
}

static void check_codebook(const at::Tensor& cb) {
  TORCH_CHECK(cb.scalar_type() == at::kFloat && cb.is_contiguous() && cb.numel() == 16, "codebook: float32 [16]");
}

// rows n0..n1 of W in float32 into out [n1 - n0, K]: W[n, k] = q[n, k] * scale + offset of k's group
// (the dequant path's prefill reads these: one pass from the nibbles, no int8 copy of the weight)
void nib_dequant(const at::Tensor& packed, const at::Tensor& sc, const at::Tensor& off, int64_t g, int64_t n0,
                 int64_t n1, at::Tensor out) {
  const int64_t N = packed.size(0), K = check_packed("nib_dequant", packed, g, {&sc, &off}), G = K / g;
  check_rows_out("nib_dequant", N, K, n0, n1, out);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* op = off.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      const uint8_t* pr = pp + n * (K / 2);
      float* orow = o + (n - n0) * K;
      for (int64_t c = 0; c < K / 32; ++c) {
        const uint8_t* pc = pr + c * 16;
        float* oc = orow + c * 32;
        if (g % 32 == 0) {  // the run of 32 codes lies in one group
          const float s = sp[n * G + c * 32 / g], f = op[n * G + c * 32 / g];
          for (int i = 0; i < 16; ++i) {
            oc[i] = (float)(pc[i] & 15) * s + f;
            oc[16 + i] = (float)(pc[i] >> 4) * s + f;
          }
        } else {
          for (int i = 0; i < 32; ++i) {
            const int64_t gi = (c * 32 + i) / g;
            const int q = i < 16 ? (pc[i] & 15) : (pc[i - 16] >> 4);
            oc[i] = (float)q * sp[n * G + gi] + op[n * G + gi];
          }
        }
      }
    }
  });
}

// rows n0..n1 of a codebook weight in float32 into out [n1 - n0, K]: W[n, k] = codebook[q] * scale of
// k's group (the product torch's codebook[q] * scale gives: one float32 multiply, no contraction)
void lut_dequant(const at::Tensor& packed, const at::Tensor& sc, const at::Tensor& cb, int64_t g, int64_t n0,
                 int64_t n1, at::Tensor out) {
  const int64_t N = packed.size(0), K = check_packed("lut_dequant", packed, g, {&sc}), G = K / g;
  check_codebook(cb);
  check_rows_out("lut_dequant", N, K, n0, n1, out);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* cp = cb.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) {
#ifdef LOWBIT_NIB_AVX2
    if (g % 32 == 0) {  // the run of 32 codes lies in one group: its table in two registers
      const __m256 cb0 = _mm256_loadu_ps(cp), cb1 = _mm256_loadu_ps(cp + 8);
      const __m128i lo4 = _mm_set1_epi8(0x0F);
      for (int64_t n = a; n < b; ++n) {
        const uint8_t* pr = pp + n * (K / 2);
        float* orow = o + (n - n0) * K;
        for (int64_t c = 0; c < K / 32; ++c) {
          const __m256 s = _mm256_broadcast_ss(sp + n * G + c * 32 / g);
          const __m256 t0 = _mm256_mul_ps(cb0, s), t1 = _mm256_mul_ps(cb1, s);
          const __m128i bb = _mm_loadu_si128((const __m128i*)(pr + c * 16));
          const __m128i halves[2] = {_mm_and_si128(bb, lo4), _mm_and_si128(_mm_srli_epi16(bb, 4), lo4)};
          for (int h = 0; h < 2; ++h)
            for (int j = 0; j < 2; ++j) {
              const __m256i idx = _mm256_cvtepu8_epi32(j ? _mm_srli_si128(halves[h], 8) : halves[h]);
              _mm256_storeu_ps(orow + c * 32 + h * 16 + j * 8, lut8(t0, t1, idx));
            }
        }
      }
      return;
    }
#endif
    float t[16];
    int64_t tg = -1;  // the group t holds
    for (int64_t n = a; n < b; ++n) {
      const uint8_t* pr = pp + n * (K / 2);
      float* orow = o + (n - n0) * K;
      tg = -1;
      for (int64_t c = 0; c < K / 32; ++c) {
        const uint8_t* pc = pr + c * 16;
        float* oc = orow + c * 32;
        for (int i = 0; i < 32; ++i) {
          const int64_t gi = (c * 32 + i) / g;
          if (gi != tg) {
            const float s = sp[n * G + gi];
            for (int j = 0; j < 16; ++j) t[j] = cp[j] * s;
            tg = gi;
          }
          oc[i] = t[i < 16 ? (pc[i] & 15) : (pc[i - 16] >> 4)];
        }
      }
    }
  });
}

// y [M, N] = x @ W^T for a 4-bit codebook weight, W[n, k] = codebook[q[n, k]] * scale of k's group: the
// few-token path (decode). AVX2 and groups of a multiple of 32: eight codes become eight table values with
// two vpermps (entries 0-7 and 8-15) and a blend on the code's bit 3, then FMAs against x in float32.
template <int MT>
static void lut_rows(const float* x, int64_t K, const uint8_t* packed, const float* sc, const float* cb, int64_t G,
                     int64_t g, int64_t N, int64_t n0, int64_t n1, float* y) {
#ifdef LOWBIT_NIB_AVX2
  if (g % 32 == 0) {
    const __m256 cb0 = _mm256_loadu_ps(cb), cb1 = _mm256_loadu_ps(cb + 8);
    const __m128i lo4 = _mm_set1_epi8(0x0F);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* pr = packed + n * (K / 2);
      __m256 accf[MT];
      for (int m = 0; m < MT; ++m) accf[m] = _mm256_setzero_ps();
      for (int64_t gi = 0; gi < G; ++gi) {
        __m256 acc[MT];
        for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
        for (int64_t k = gi * g; k < (gi + 1) * g; k += 32) {
          const __m128i b = _mm_loadu_si128((const __m128i*)(pr + k / 2));
          const __m128i halves[2] = {_mm_and_si128(b, lo4), _mm_and_si128(_mm_srli_epi16(b, 4), lo4)};
          for (int h = 0; h < 2; ++h) {
            for (int j = 0; j < 2; ++j) {
              const __m256i idx = _mm256_cvtepu8_epi32(j ? _mm_srli_si128(halves[h], 8) : halves[h]);
              const __m256 w = lut8(cb0, cb1, idx);
              const int64_t kk = k + h * 16 + j * 8;
              for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + kk), acc[m]);
            }
          }
        }
        const __m256 s = _mm256_broadcast_ss(sc + n * G + gi);
        for (int m = 0; m < MT; ++m) accf[m] = _mm256_fmadd_ps(acc[m], s, accf[m]);
      }
      for (int m = 0; m < MT; ++m) y[m * N + n] = hsum8(accf[m]);
    }
    return;
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* pr = packed + n * (K / 2);
    for (int m = 0; m < MT; ++m) {
      float out = 0.f;
      for (int64_t gi = 0; gi < G; ++gi) {
        float dot = 0.f;
        for (int64_t k = gi * g; k < (gi + 1) * g; ++k) dot += x[m * K + k] * cb[nib_code(pr, k)];
        out += sc[n * G + gi] * dot;
      }
      y[m * N + n] = out;
    }
  }
}

at::Tensor lut_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& sc, const at::Tensor& cb,
                    int64_t g) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: float32 [M, K]");
  const int64_t M = x.size(0), K = check_packed("lut_gemm", packed, g, {&sc}), N = packed.size(0), G = K / g;
  TORCH_CHECK(x.size(1) == K, "lut_gemm: x has ", x.size(1), " features, the weight ", K);
  check_codebook(cb);
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* cp = cb.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t mt = std::min<int64_t>(4, M - m0);
      const float* xm = xp + m0 * K;
      float* ym = yp + m0 * N;
      switch (mt) {
        case 1: lut_rows<1>(xm, K, pp, sp, cp, G, g, N, n0, n1, ym); break;
        case 2: lut_rows<2>(xm, K, pp, sp, cp, G, g, N, n0, n1, ym); break;
        case 3: lut_rows<3>(xm, K, pp, sp, cp, G, g, N, n0, n1, ym); break;
        default: lut_rows<4>(xm, K, pp, sp, cp, G, g, N, n0, n1, ym); break;
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
  m.def("nib_dequant(Tensor packed, Tensor scales, Tensor offsets, int group, int n0, int n1, Tensor(a!) out) -> ()",
        &nib_dequant);
  m.def("lut_gemm(Tensor x, Tensor packed, Tensor scales, Tensor codebook, int group) -> Tensor", &lut_gemm);
  m.def("lut_dequant(Tensor packed, Tensor scales, Tensor codebook, int group, int n0, int n1, Tensor(a!) out) -> ()",
        &lut_dequant);
  m.def("has_avx2() -> bool", &has_avx2);
}
"""


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] from codes [N, K] in 0..15 (K a multiple of 32): in each run of 32 codes, byte i
    holds code i in its low nibble and code i + 16 in its high one, so one AND and one shift give the
    kernel 16 codes in order each."""
    n, k = q.shape
    c = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] from ``pack_nibbles``' output."""
    n = packed.shape[0]
    b = packed.reshape(n, -1, 16)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(n, -1)


def _selftest(ext) -> None:
    """Against a float32 dequantize + matmul, on a vector-loop group (64) and a scalar one (48)."""
    g = torch.Generator().manual_seed(0)
    for group, m in ((64, 5), (64, 2), (48, 2)):
        n, k = 41, 576  # 9 groups of 64: the offsets' vector loop takes 8, its tail 1
        q = torch.randint(0, 16, (n, k), generator=g)
        sc = torch.rand(n, k // group, generator=g) + 0.1
        off = torch.randn(n, k // group, generator=g)
        x = torch.randn(m, k, generator=g)
        w = q.float() * sc.repeat_interleave(group, 1) + off.repeat_interleave(group, 1)
        want = x @ w.t()
        got = ext.nib_gemm(x, pack_nibbles(q), sc, off, group)
        err = float((got - want).norm() / want.norm())
        if not err < 1e-4:
            raise RuntimeError(f"self-test against float32 failed (group {group}: rel. err {err:.3g})")
        buf = torch.empty(n - 3, k)
        ext.nib_dequant(pack_nibbles(q), sc, off, group, 3, n, buf)
        if not torch.equal(buf, w[3:]):  # the same float32 product and sum
            raise RuntimeError(f"self-test: nib_dequant differs from q * scale + offset (group {group})")
        cb = torch.randn(16, generator=g)
        ext.lut_dequant(pack_nibbles(q), sc, cb, group, 3, n, buf)
        if not torch.equal(buf, cb[q[3:]] * sc[3:].repeat_interleave(group, 1)):
            raise RuntimeError(f"self-test: lut_dequant differs from codebook[q] * scale (group {group})")
        wl = cb[q] * sc.repeat_interleave(group, 1)
        err = float((ext.lut_gemm(x, pack_nibbles(q), sc, cb, group) - x @ wl.t()).norm() / (x @ wl.t()).norm())
        if not err < 1e-5:
            raise RuntimeError(f"self-test: lut_gemm against float32 failed (group {group}: rel. err {err:.3g})")


# no FMA contraction: nib_dequant must give exactly q * scale + offset as torch computes it (the
# vector kernel calls its FMAs by name)
EXT = _cpp_ext.Extension("nib", _SOURCE, "lowbit_nib", EXT_ENV, _selftest, extra_cflags=("-ffp-contract=off",))
load = EXT.load  # the compiled ops, or None (turned off, or the build failed: warned once)
