// Raw-pointer entry points shared between the kernel files (the Python bindings wrap them in tensors).
#pragma once
#include <torch/extension.h>

#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PAGELLM_AVX2 1
#endif

namespace pagellm {

#ifdef PAGELLM_AVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 floats from float32 or bfloat16 memory (bf16 is the top half of a float32: widen and shift)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Software prefetch of `bytes` from `p` into L1, a cache line at a time
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// e^x, 8 at a time, x clamped to [-87, 88] (so no overflow, and ~1e-38 rather than 0 far below):
// x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (relative error ~1e-7), 2^n built
// in the exponent bits. For the softmax of attention and SiLU, which libm computes one at a time.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: n * hi is exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  // n is in -126..127 here: 2^n is a normal float, its exponent field n + 127
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// out[M, N] = x[M, K] @ w[N, K]^T for few rows (decode), with w in one of these layouts:
void f32_matmul(const float* x, int64_t M, const float* w, float* out, int64_t N, int64_t K);
void bf16_matmul(const float* x, int64_t M, const at::BFloat16* w, float* out, int64_t N, int64_t K);
void int8_matmul(const float* x, int64_t M, const int8_t* q, const float* scales, float* out, int64_t N, int64_t K);
// int4: with q8_activations the activations are quantized to int8 per 32-input block first (as llama.cpp
// does for its Q4 formats), so the inner products are integer work; else the codes are widened to float
// (exact); see quant_gemv.cpp. int4 scales and mins are float16 (GGUF Q4_0/Q4_1 store them so): 20 bytes
// per 32 weights, not 24
void int4_matmul(const float* x, int64_t M, const uint8_t* q, const at::Half* scales, const at::Half* mins, float* out,
                 int64_t N, int64_t K, bool q8_activations);
void rms_norm_rows(const float* x, const float* weight, float* out, int64_t M, int64_t H, float eps);

}  // namespace pagellm

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, torch::Tensor seq_lens, double scale);
