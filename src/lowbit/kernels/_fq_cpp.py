"""Optional C++ kernels for the grid searches' fake quantization (AWQ's scale and clip searches):
round weights onto their per-group min-max grid exactly as ``WQLinear.from_weight`` stores them, in
one pass over each group instead of the ten-odd full-tensor passes of the torch expression.

- ``fq_scaled(w [O, I], s [k, I], group, qmin, qmax, symmetric, subtract, out [k, O, I])``:
  ``Q(w * s_j) / s_j`` (minus ``w`` where ``subtract``) for every candidate scale ``s_j``;
- ``fq_clamped(wg [ng, O, g], lo [ng, k, O], hi [ng, k, O], qmin, qmax, symmetric, out [ng, k, O, g])``:
  ``Q(clamp(wg, lo_j, hi_j)) - wg`` for every candidate range, group-major as the clip search
  reads it.

``Q`` is ``awq._pseudo_quantize_``'s arithmetic, operation for operation in float32 (divisions
where torch divides, the fp16 scale rounded up, round half to even, no fused multiply-adds), so the
results are bit for bit torch's: the self-test checks that. Where torch's large elementwise passes
stream from memory, each group here stays in L1 between its min/max, rounding and write.

Registered as ``torch.ops.lowbit_fq.*`` and built by ``_cpp_ext``; ``LOWBIT_FQ_EXT=0`` turns it off,
and a failed build or self-test warns once and the torch expression runs instead.
"""

from __future__ import annotations

import torch

from lowbit.kernels import _cpp_ext

EXT_ENV = "LOWBIT_FQ_EXT"

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#define LOWBIT_FQ_AVX2 1
#endif

// the scale as stored: fp16, rounded up where rounding to nearest went below (fp16_scale)
static inline float fp16_up(float scale) {
  c10::Half h(scale);
  if (static_cast<float>(h) < scale) h.x = static_cast<uint16_t>(h.x + 1);  // scale > 0: next fp16 up
  return static_cast<float>(h);
}

struct Grid {
  float scale, lo_q, hi_q;  // q = clamp(round(v / scale), lo_q, hi_q); v_hat = q * scale
};

// _range_qparams + fp16_scale of a group whose min and max are gmin, gmax
static inline Grid group_grid(float gmin, float gmax, int64_t qmin, int64_t qmax, bool symmetric) {
  const float lo = std::min(gmin, 0.f), hi = std::max(gmax, 0.f);
  Grid g;
  if (symmetric) {
    const float amax = std::max(std::fabs(lo), std::fabs(hi));
    const float raw = std::max(amax / (float)((double)(qmax - qmin) / 2.0), 1e-8f);
    g.scale = fp16_up(raw);
    g.lo_q = (float)qmin;
    g.hi_q = (float)qmax;
  } else {
    const float raw = std::max((hi - lo) / (float)(qmax - qmin), 1e-8f);
    const float zero = std::min(std::max(std::nearbyint(-lo / raw), (float)qmin), (float)qmax);
    g.scale = fp16_up(raw);
    g.lo_q = (float)qmin - zero;
    g.hi_q = (float)qmax - zero;
  }
  return g;
}

// v[i] = a[i] * b[i] (b null: a[i]; lo/hi non-null: clamped to [lo, hi]); returns v's min and max
static inline void load_group(float* v, const float* a, const float* b, const float* lo, const float* hi, int64_t n,
                              float& mn_out, float& mx_out) {
  float mn = INFINITY, mx = -INFINITY;
  int64_t i = 0;
#ifdef LOWBIT_FQ_AVX2
  if (n >= 8) {
    __m256 vmn = _mm256_set1_ps(INFINITY), vmx = _mm256_set1_ps(-INFINITY);
    const __m256 l8 = _mm256_set1_ps(lo ? *lo : 0.f), h8 = _mm256_set1_ps(hi ? *hi : 0.f);
    for (; i + 8 <= n; i += 8) {
      __m256 x = _mm256_loadu_ps(a + i);
      if (b) x = _mm256_mul_ps(x, _mm256_loadu_ps(b + i));
      if (lo) x = _mm256_min_ps(_mm256_max_ps(x, l8), h8);
      _mm256_storeu_ps(v + i, x);
      vmn = _mm256_min_ps(vmn, x);
      vmx = _mm256_max_ps(vmx, x);
    }
    float t[8];
    _mm256_storeu_ps(t, vmn);
    for (int j = 0; j < 8; ++j) mn = std::min(mn, t[j]);
    _mm256_storeu_ps(t, vmx);
    for (int j = 0; j < 8; ++j) mx = std::max(mx, t[j]);
  }
#endif
  for (; i < n; ++i) {
    float x = a[i];
    if (b) x = x * b[i];
    if (lo) x = std::min(std::max(x, *lo), *hi);
    v[i] = x;
    mn = std::min(mn, x);
    mx = std::max(mx, x);
  }
  mn_out = mn;
  mx_out = mx;
}

// v[0..n) <- clamp(round(v / scale)) * scale, then (optionally) / s, then (optionally) - w
static inline void round_group(float* v, int64_t n, const Grid& g, const float* s, const float* w) {
  int64_t i = 0;
#ifdef LOWBIT_FQ_AVX2
  const __m256 sc = _mm256_set1_ps(g.scale), lq = _mm256_set1_ps(g.lo_q), hq = _mm256_set1_ps(g.hi_q);
  for (; i + 8 <= n; i += 8) {
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v + i), sc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(q, lq), hq);
    __m256 r = _mm256_mul_ps(q, sc);
    if (s) r = _mm256_div_ps(r, _mm256_loadu_ps(s + i));
    if (w) r = _mm256_sub_ps(r, _mm256_loadu_ps(w + i));
    _mm256_storeu_ps(v + i, r);
  }
#endif
  for (; i < n; ++i) {
    float q = std::min(std::max(std::nearbyint(v[i] / g.scale), g.lo_q), g.hi_q);
    float r = q * g.scale;
    if (s) r = r / s[i];
    if (w) r = r - w[i];
    v[i] = r;
  }
}

void fq_scaled(const at::Tensor& w, const at::Tensor& s, int64_t gs, int64_t qmin, int64_t qmax,
               bool symmetric, bool subtract, const at::Tensor& out) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(), "w: float32 [O, I]");
  TORCH_CHECK(s.dim() == 2 && s.scalar_type() == at::kFloat && s.is_contiguous() && s.size(1) == w.size(1),
              "s: float32 [k, I]");
  const int64_t O = w.size(0), I = w.size(1), K = s.size(0);
  TORCH_CHECK(gs > 0 && I % gs == 0, "fq_scaled: the group size must divide the input features");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == K * O * I,
              "out: float32 [k, O, I], contiguous");
  const float* wp = w.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t G = I / gs;
  at::parallel_for(0, K * O, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t j = r / O;
      const float* wr = wp + (r % O) * I;
      const float* sj = sp + j * I;
      float* orow = op + r * I;
      for (int64_t gi = 0; gi < G; ++gi) {
        float* v = orow + gi * gs;
        const float* wg = wr + gi * gs;
        const float* sg = sj + gi * gs;
        float mn, mx;
        load_group(v, wg, sg, nullptr, nullptr, gs, mn, mx);
        round_group(v, gs, group_grid(mn, mx, qmin, qmax, symmetric), sg, subtract ? wg : nullptr);
      }
    }
  });
}

void fq_clamped(const at::Tensor& wg, const at::Tensor& lo, const at::Tensor& hi, int64_t qmin, int64_t qmax,
                bool symmetric, const at::Tensor& out) {
  TORCH_CHECK(wg.dim() == 3 && wg.scalar_type() == at::kFloat && wg.is_contiguous(), "wg: float32 [ng, O, g]");
  const int64_t NG = wg.size(0), O = wg.size(1), gs = wg.size(2);
  TORCH_CHECK(lo.dim() == 3 && lo.sizes() == hi.sizes() && lo.size(0) == NG && lo.size(2) == O, "lo, hi: [ng, k, O]");
  for (const at::Tensor* t : {&lo, &hi})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "lo, hi: float32, contiguous");
  const int64_t K = lo.size(1);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == NG * K * O * gs,
              "out: float32 [ng, k, O, g], contiguous");
  const float* wp = wg.data_ptr<float>();
  const float* lp = lo.data_ptr<float>();
  const float* hp = hi.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, NG * K * O, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = (gi * K + j) * O + o
      const int64_t o = r % O, gi = r / (K * O);
      const float* w = wp + (gi * O + o) * gs;
      float* v = op + r * gs;
      const float l = lp[r], h = hp[r];
      float mn, mx;
      load_group(v, w, nullptr, &l, &h, gs, mn, mx);
      round_group(v, gs, group_grid(mn, mx, qmin, qmax, symmetric), nullptr, w);
    }
  });
}

TORCH_LIBRARY(lowbit_fq, m) {
  m.def("fq_scaled(Tensor w, Tensor s, int group, int qmin, int qmax, bool symmetric, bool subtract, Tensor(a!) out) -> ()",
        &fq_scaled);
  m.def("fq_clamped(Tensor wg, Tensor lo, Tensor hi, int qmin, int qmax, bool symmetric, Tensor(a!) out) -> ()",
        &fq_clamped);
}
"""


def _selftest(ext) -> None:
    """Bit for bit against the torch expressions, asymmetric and symmetric, on a vector-loop group
    (64) and one with a scalar tail (20)."""
    from lowbit.kernels.fake_quant import fake_quant_clamped_ref, fake_quant_scaled_ref
    from lowbit.quant import QuantSpec

    g = torch.Generator().manual_seed(0)
    for sym in (False, True):
        for gs in (64, 20):
            w = torch.randn(12, gs * 3, generator=g)
            w[0, :gs] = 0.0  # an all-zero group: the scale's floor
            s = torch.rand(3, gs * 3, generator=g) + 0.5
            spec = QuantSpec(bits=4, symmetric=sym)
            qmin, qmax = spec.qmin, spec.qmax
            for sub in (False, True):
                want = fake_quant_scaled_ref(w, s, gs, spec, sub)
                got = torch.empty(3, 12, gs * 3)
                ext.fq_scaled(w, s, gs, qmin, qmax, sym, sub, got)
                if not torch.equal(got, want):
                    raise RuntimeError(f"fq_scaled differs from torch (group {gs}, symmetric {sym})")
            wg = w.reshape(12, 3, gs).transpose(0, 1).contiguous()
            m = wg.abs().amax(-1)
            lo = -m[:, None, :] * torch.tensor([1.0, 0.8, 0.55])[None, :, None]
            hi = -lo * 0.9
            want = fake_quant_clamped_ref(wg, lo.contiguous(), hi.contiguous(), spec)
            got = torch.empty(3, 3, 12, gs)
            ext.fq_clamped(wg, lo.contiguous(), hi.contiguous(), qmin, qmax, sym, got)
            if not torch.equal(got, want):
                raise RuntimeError(f"fq_clamped differs from torch (group {gs}, symmetric {sym})")


EXT = _cpp_ext.Extension("fq", _SOURCE, "lowbit_fq", EXT_ENV, _selftest, extra_cflags=("-ffp-contract=off",))
load = EXT.load  # the compiled ops, or None (turned off, or the build failed: warned once)
