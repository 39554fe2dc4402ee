// One vector of float32 lanes for the instruction set this translation unit is compiled for.
//
// kernels_impl.h is written against this interface only. ELASTIC_SIMD_WIDTH selects the
// implementation: 16 (AVX-512F), 8 (AVX2 + FMA) or 4 (portable GCC/Clang vector extension: SSE2 on
// x86-64, NEON on ARM). Everything lives in the namespace ELASTIC_ISA so that each build of the
// kernels has its own copy.
#pragma once

#include <cstdint>
#include <cstring>

#if ELASTIC_SIMD_WIDTH == 16 || ELASTIC_SIMD_WIDTH == 8
#include <immintrin.h>
#endif

namespace elastic {
namespace ELASTIC_ISA {

constexpr int kLanes = ELASTIC_SIMD_WIDTH;

#if ELASTIC_SIMD_WIDTH == 16

using vfloat = __m512;
inline __mmask16 lane_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vbroadcast(float v) { return _mm512_set1_ps(v); }
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat vload_n(const float* p, int n) { return _mm512_maskz_loadu_ps(lane_mask(n), p); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline void vstore_n(float* p, vfloat v, int n) { _mm512_mask_storeu_ps(p, lane_mask(n), v); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline vfloat vmin(vfloat a, vfloat b) { return _mm512_min_ps(a, b); }
inline vfloat vabs(vfloat v) { return _mm512_abs_ps(v); }
inline vfloat vround(vfloat v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float vreduce_add(vfloat v) { return _mm512_reduce_add_ps(v); }
inline float vreduce_max(vfloat v) { return _mm512_reduce_max_ps(v); }
// 2^n for integral n in [-126, 127], built in the exponent field.
inline vfloat vpow2(vfloat n) {
  const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
}
// |magnitude| with the sign of `sign`.
inline vfloat vcopysign(vfloat magnitude, vfloat sign) {
  const __m512i bit = _mm512_set1_epi32(INT32_MIN);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(bit, _mm512_castps_si512(magnitude)),
                                             _mm512_and_si512(bit, _mm512_castps_si512(sign))));
}

#elif ELASTIC_SIMD_WIDTH == 8

using vfloat = __m256;
inline __m256i lane_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vbroadcast(float v) { return _mm256_set1_ps(v); }
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat vload_n(const float* p, int n) { return _mm256_maskload_ps(p, lane_mask(n)); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline void vstore_n(float* p, vfloat v, int n) { _mm256_maskstore_ps(p, lane_mask(n), v); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat vmin(vfloat a, vfloat b) { return _mm256_min_ps(a, b); }
inline vfloat vabs(vfloat v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline vfloat vround(vfloat v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float vreduce_add(vfloat v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vreduce_max(vfloat v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vfloat vpow2(vfloat n) {
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
}
inline vfloat vcopysign(vfloat magnitude, vfloat sign) {
  const vfloat bit = _mm256_set1_ps(-0.0f);
  return _mm256_or_ps(_mm256_andnot_ps(bit, magnitude), _mm256_and_ps(bit, sign));
}

#elif ELASTIC_SIMD_WIDTH == 4

typedef float vfloat __attribute__((vector_size(16)));
typedef int32_t vint __attribute__((vector_size(16)));
inline vfloat vzero() { return vfloat{0.f, 0.f, 0.f, 0.f}; }
inline vfloat vbroadcast(float v) { return vfloat{v, v, v, v}; }
inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vfloat vload_n(const float* p, int n) {
  vfloat v = vzero();
  std::memcpy(&v, p, sizeof(float) * n);
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline void vstore_n(float* p, vfloat v, int n) { std::memcpy(p, &v, sizeof(float) * n); }
inline vfloat vadd(vfloat a, vfloat b) { return a + b; }
inline vfloat vsub(vfloat a, vfloat b) { return a - b; }
inline vfloat vmul(vfloat a, vfloat b) { return a * b; }
inline vfloat vdiv(vfloat a, vfloat b) { return a / b; }
inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return a * b + c; }
inline vfloat vmax(vfloat a, vfloat b) {
  vfloat r;
  for (int i = 0; i < 4; ++i) r[i] = a[i] > b[i] ? a[i] : b[i];
  return r;
}
inline vfloat vmin(vfloat a, vfloat b) {
  vfloat r;
  for (int i = 0; i < 4; ++i) r[i] = a[i] < b[i] ? a[i] : b[i];
  return r;
}
inline vfloat vabs(vfloat v) {
  vint bits;
  std::memcpy(&bits, &v, sizeof v);
  bits &= INT32_MAX;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
inline vfloat vround(vfloat v) {
  for (int i = 0; i < 4; ++i) v[i] = __builtin_rintf(v[i]);
  return v;
}
inline float vreduce_add(vfloat v) { return (v[0] + v[1]) + (v[2] + v[3]); }
inline float vreduce_max(vfloat v) {
  const float a = v[0] > v[1] ? v[0] : v[1], b = v[2] > v[3] ? v[2] : v[3];
  return a > b ? a : b;
}
inline vfloat vpow2(vfloat n) {
  vint bits;
  for (int i = 0; i < 4; ++i) bits[i] = (static_cast<int32_t>(n[i]) + 127) << 23;
  vfloat r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}
inline vfloat vcopysign(vfloat magnitude, vfloat sign) {
  vint m, s;
  std::memcpy(&m, &magnitude, sizeof m);
  std::memcpy(&s, &sign, sizeof s);
  m = (m & INT32_MAX) | (s & INT32_MIN);
  std::memcpy(&magnitude, &m, sizeof m);
  return magnitude;
}

#else
#error "ELASTIC_SIMD_WIDTH must be 16, 8 or 4"
#endif

// e^x, relative error ~2e-7 (Cephes expf): x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial.
inline vfloat vexp(vfloat x) {
  x = vmax(vmin(x, vbroadcast(88.3762626647949f)), vbroadcast(-87.3365447505531f));
  const vfloat n = vround(vmul(x, vbroadcast(1.44269504088896341f)));
  vfloat r = vfma(n, vbroadcast(-0.693359375f), x);
  r = vfma(n, vbroadcast(2.12194440e-4f), r);
  vfloat p = vbroadcast(1.9875691500e-4f);
  p = vfma(p, r, vbroadcast(1.3981999507e-3f));
  p = vfma(p, r, vbroadcast(8.3334519073e-3f));
  p = vfma(p, r, vbroadcast(4.1665795894e-2f));
  p = vfma(p, r, vbroadcast(1.6666665459e-1f));
  p = vfma(p, r, vbroadcast(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vbroadcast(1.0f)));
  return vmul(p, vpow2(n));
}

// erf(x), absolute error < 1.5e-7 (Abramowitz & Stegun 7.1.26, as in ATen's vectorised erf).
inline vfloat verf(vfloat x) {
  const vfloat ax = vabs(x);
  const vfloat t = vdiv(vbroadcast(1.0f), vfma(ax, vbroadcast(0.3275911f), vbroadcast(1.0f)));
  vfloat p = vbroadcast(1.061405429f);
  p = vfma(p, t, vbroadcast(-1.453152027f));
  p = vfma(p, t, vbroadcast(1.421413741f));
  p = vfma(p, t, vbroadcast(-0.284496736f));
  p = vfma(p, t, vbroadcast(0.254829592f));
  p = vmul(p, t);
  const vfloat y = vsub(vbroadcast(1.0f), vmul(p, vexp(vmul(ax, vsub(vzero(), ax)))));
  return vcopysign(y, x);
}

// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)).
inline vfloat vgelu(vfloat x) {
  const vfloat half_x = vmul(x, vbroadcast(0.5f));
  return vfma(half_x, verf(vmul(x, vbroadcast(0.70710678118654752f))), half_x);
}

}  // namespace ELASTIC_ISA
}  // namespace elastic
