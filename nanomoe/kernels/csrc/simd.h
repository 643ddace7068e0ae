// Scalar and AVX-512 helpers shared by the native kernels (decode_step.cpp, experts.cpp,
// fused_ops.cpp): bf16 conversions that round as torch does, a vectorized e^x, masked 16-lane loads
// and stores, the fused SwiGLU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace nanomoe_simd {

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// element i of an fp32 or bf16 (raw bits) array, as fp32
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NANOMOE_AVX512 1
// e^x, 16 lanes: 2^n e^r with |r| <= ln2/2 and a degree-6 Taylor polynomial (relative error
// ~1e-7); inputs clamped to where fp32 e^x is finite and normal.
inline __m512 exp_vec(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3f)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + e^-x), 16 lanes: a 14-bit reciprocal estimate refined by one Newton step (relative
// error ~1e-7) instead of a division, which costs ~3x the rest of the loop of the SwiGLU kernels.
inline __m512 sigmoid_vec(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 y = _mm512_add_ps(one, exp_vec(_mm512_sub_ps(_mm512_setzero_ps(), x)));
  const __m512 r = _mm512_rcp14_ps(y);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(y, r, _mm512_set1_ps(2.f)));
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {  // bf16 -> fp32 is a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(uint16_t* p, __m512 v, __mmask16 m) {  // rounded as float_to_bf16 does, NaN included
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
#endif

// sum_i a[i] b[i] over fp32 or bf16 arrays, accumulated in fp32
template <typename A, typename B>
float dot_product(const A* a, const B* b, int64_t n) {
  float total = 0.f;
  int64_t i = 0;
#if defined(NANOMOE_AVX512)
  __m512 acc = _mm512_setzero_ps();
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    acc = _mm512_fmadd_ps(load16(a + i, m), load16(b + i, m), acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) total += load(a, i) * load(b, i);
  return total;
}

// a = silu(g) * u = g / (1 + e^-g) * u over n elements, in fp32, rounded once.
template <typename T>
void swiglu_forward(const T* g, const T* u, T* a, int64_t n) {
  int64_t i = 0;
#if defined(NANOMOE_AVX512)
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 gv = load16(g + i, m);
    store16(a + i, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid_vec(gv)), load16(u + i, m)), m);
  }
#endif
  for (; i < n; ++i) {
    const float gv = load(g, i);
    store(a, i, gv / (1.f + std::exp(-gv)) * load(u, i));
  }
}

// From da = dL/da: du = silu(g) da, dg = da u sig(g) (1 + g (1 - sig(g))). dg may alias da.
template <typename T>
void swiglu_backward(const T* da, const T* g, const T* u, T* dg, T* du, int64_t n) {
  int64_t i = 0;
#if defined(NANOMOE_AVX512)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 gv = load16(g + i, m), dav = load16(da + i, m);
    const __m512 sig = sigmoid_vec(gv);
    store16(du + i, _mm512_mul_ps(dav, _mm512_mul_ps(gv, sig)), m);
    const __m512 slope = _mm512_mul_ps(sig, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sig), one));
    store16(dg + i, _mm512_mul_ps(_mm512_mul_ps(dav, load16(u + i, m)), slope), m);
  }
#endif
  for (; i < n; ++i) {
    const float gv = load(g, i), dav = load(da, i), sig = 1.f / (1.f + std::exp(-gv));
    store(du, i, dav * gv * sig);
    store(dg, i, dav * load(u, i) * sig * (1.f + gv * (1.f - sig)));
  }
}

}  // namespace nanomoe_simd
