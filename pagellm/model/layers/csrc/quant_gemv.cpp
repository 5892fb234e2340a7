// Few-row matmuls (decode) against float32, bfloat16 and packed weight-only int8/int4 weights, float32
// activations.
//
// A decode step multiplies 1-4 activation rows by every weight once, so it is bound by weight bytes:
// reading int8 or 4-bit codes instead of floats is the whole gain. Each output channel's codes are read
// once for all rows. The inner loops are plain C++ written for gcc's auto-vectorizer (-O3 -march=native
// -ffast-math): int8/uint8 -> float conversion plus FMA over 32-wide blocks.
//
// int8: w[n, k] = scale[n] * q[n, k]
// int4: per group g of 32 inputs, w[n, k] = scale[n, g] * c + min[n, g], with c in 0..15 and the scale
//       and min float16 (GGUF's Q4_1 block: 20 bytes per 32 weights; decode reads every byte); byte j of a
//       group's 16 bytes holds c for input j (low nibble) and input j + 16 (high nibble), as in GGUF.
//       So out[m, n] = sum_g scale[n, g] * dot(x[m, g], c[n, g]) + min[n, g] * sum(x[m, g]).
//       The activations are first quantized per 32-input block to x ~ d * xq, xq in -127..127 (what
//       llama.cpp does for its Q4 formats): dot(x, c) ~ d * dot(xq, c) is then integer work (AVX2
//       maddubs: 32 u8 x s8 products per instruction), about 1.3x faster than widening the codes to
//       float; the min term keeps the exact float block sums. q8_activations=false (PAGELLM_INT4_ACT=float) keeps float
//       activations instead (exact weight-only int4; AVX2 builds).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#include <cstdlib>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kMaxRows = 8;
constexpr int64_t kTileN = 16;
constexpr int64_t kMaxGroups = 1024;  // int4: K up to 32768 (per-channel scales converted on the stack)
// Software prefetch of the weights this many output channels ahead (int4, int8, dense rows). Decode
// reads each weight matrix once from memory, a few hundred KB at a time between other work, and the
// hardware streams restart at every matrix: measured on W1 (int4 GGUF), about 1.25x more tokens/s.
constexpr int64_t kPrefetchRows = 4;

template <int M>
void int8_rows(const float* x, const int8_t* q, const float* scales, float* out, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = q + n * K;
      float acc[M];
      for (int m = 0; m < M; ++m) acc[m] = 0.f;
      for (int64_t k0 = 0; k0 < K; k0 += kGroup) {
        float w[kGroup];
        for (int64_t j = 0; j < kGroup; ++j) w[j] = static_cast<float>(row[k0 + j]);
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + k0;
          float s = 0.f;
          for (int64_t j = 0; j < kGroup; ++j) s += xm[j] * w[j];
          acc[m] += s;
        }
      }
      for (int m = 0; m < M; ++m) out[m * N + n] = acc[m] * scales[n];
    }
  });
}

template <int M>
void int4_rows_q8(const int8_t* xq, const float* xd, const float* xsum, const uint8_t* q, const at::Half* scales,
                  const at::Half* mins, float* out, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t groups = K / kGroup;
  {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = q + n * (K / 2);
      float acc[M];
      for (int m = 0; m < M; ++m) acc[m] = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* b = row + g * (kGroup / 2);
        const float sc = static_cast<float>(scales[n * groups + g]), mn = static_cast<float>(mins[n * groups + g]);
        for (int m = 0; m < M; ++m) {
          const int8_t* a = xq + m * K + g * kGroup;
          int32_t dot = 0;
          for (int64_t j = 0; j < kGroup / 2; ++j) dot += (b[j] & 0x0F) * a[j] + (b[j] >> 4) * a[j + kGroup / 2];
          acc[m] += static_cast<float>(dot) * (sc * xd[m * groups + g]) + mn * xsum[m * groups + g];
        }
      }
      for (int m = 0; m < M; ++m) out[m * N + n] = acc[m];
    }
  }
}

template <int M>
void int4_rows_f32(const float* x, const float* xsum, const uint8_t* q, const at::Half* scales, const at::Half* mins,
               float* out, int64_t N, int64_t K) {
  const int64_t groups = K / kGroup;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = q + n * (K / 2);
      const at::Half* sc = scales + n * groups;
      const at::Half* mn = mins + n * groups;
      float acc[M];
      for (int m = 0; m < M; ++m) acc[m] = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* b = row + g * (kGroup / 2);
        float w[kGroup];
        for (int64_t j = 0; j < kGroup / 2; ++j) {
          w[j] = static_cast<float>(b[j] & 0x0F);
          w[j + kGroup / 2] = static_cast<float>(b[j] >> 4);
        }
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + g * kGroup;
          float s = 0.f;
          for (int64_t j = 0; j < kGroup; ++j) s += xm[j] * w[j];
          acc[m] += static_cast<float>(sc[g]) * s + static_cast<float>(mn[g]) * xsum[m * groups + g];
        }
      }
      for (int m = 0; m < M; ++m) out[m * N + n] = acc[m];
    }
  });
}

template <int M, typename T>
void dense_rows(const float* x, const T* w, float* out, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* row = w + n * K;
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += xm[k] * static_cast<float>(row[k]);
        out[m * N + n] = s;
      }
    }
  });
}

#ifdef PAGELLM_AVX2
using pagellm::hsum8;
using pagellm::load8;
using pagellm::prefetch_bytes;

inline __m256 sum4(const __m256* v) { return _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])); }

// v's value as computed: -ffast-math may not reassociate additions across this point. Without it gcc summed
// the 4 chains of the 2-row block in another order than those of the 1- and 3-row blocks (measured: 1 ulp
// differences in ~40 of 96 outputs), so a row's result depended on the rows beside it.
inline __m256 fixed(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// (a0 + a1) + (a2 + a3), then the 8 lanes, in this order whatever the caller
inline float sum4_fixed(const __m256* a) {
  const __m256 s = fixed(_mm256_add_ps(fixed(_mm256_add_ps(a[0], a[1])), fixed(_mm256_add_ps(a[2], a[3]))));
  return hsum8(fixed(s));
}

// int8 weights (w = q * scale[n]), R <= 3 rows against one channel: the codes widened to float in registers
// (4 vectors), 4 FMA chains per row; 4R accumulators + 4 weight vectors fit the 16 ymm registers.
template <int R>
inline void int8_channel(const float* x, int64_t K, const int8_t* row, float scale, float* out, int64_t N) {
  __m256 acc[R][4];
  for (int m = 0; m < R; ++m)
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += kGroup) {
    __m128i c01 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0));
    __m128i c23 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 + 16));
    __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c01)),
                   _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c01, 8))),
                   _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c23)),
                   _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c23, 8)))};
    for (int m = 0; m < R; ++m) {
      const float* xm = x + m * K + k0;
      for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xm + 8 * i), acc[m][i]);
    }
  }
  for (int m = 0; m < R; ++m) out[m * N] = sum4_fixed(acc[m]) * scale;
}

// The rows against each channel in turn, 3 rows at a time (the channel's codes are in L1 after the first
// block): each row's arithmetic is int8_channel's whatever M, so a row's result does not depend on the batch.
// (More rows at once would spill the accumulators: measured 2-3x slower per row at 5-8 rows.)
void int8_rows_avx2(const float* x, int64_t M, const int8_t* q, const float* scales, float* out, int64_t N,
                    int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = q + n * K;
      if (n + kPrefetchRows < end) prefetch_bytes(row + kPrefetchRows * K, K);
      int64_t m = 0;
      for (; m + 3 <= M; m += 3) int8_channel<3>(x + m * K, K, row, scales[n], out + m * N + n, N);
      if (M - m == 2) int8_channel<2>(x + m * K, K, row, scales[n], out + m * N + n, N);
      if (M - m == 1) int8_channel<1>(x + m * K, K, row, scales[n], out + m * N + n, N);
    }
  });
}

// float16 -> float32, 8 at a time (F16C)
inline void half_to_float(const at::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
  float r = hsum8(s);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

template <int M>
void int4_rows_f32_avx2(const float* x, const float* /*xsum*/, const uint8_t* q, const at::Half* scales,
                        const at::Half* mins, float* out, int64_t N, int64_t K) {
  const int64_t groups = K / kGroup;
  const __m128i low = _mm_set1_epi8(0x0F);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float sc[kMaxGroups], mn[kMaxGroups];
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = q + n * (K / 2);
      half_to_float(scales + n * groups, sc, groups);
      half_to_float(mins + n * groups, mn, groups);
      __m256 acc[M][4];
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * (kGroup / 2)));
        __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        const __m256 s = _mm256_set1_ps(sc[g]), mv = _mm256_set1_ps(mn[g]);
        __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                       _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))};
        for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(w[i], s, mv);
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + g * kGroup;
          for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xm + 8 * i), acc[m][i]);
        }
      }
      for (int m = 0; m < M; ++m) out[m * N + n] = hsum8(sum4(acc[m]));
    }
  });
}

// float32 / bfloat16 weights; K need not be a multiple of 32 (a scalar tail)
template <int M, typename T>
void dense_rows_avx2(const float* x, const T* w, float* out, int64_t N, int64_t K) {
  const int64_t K32 = K - K % kGroup;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* row = w + n * K;
      if (n + kPrefetchRows < end) prefetch_bytes(row + kPrefetchRows * K, K * static_cast<int64_t>(sizeof(T)));
      __m256 acc[M][4];
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_setzero_ps();
      for (int64_t k0 = 0; k0 < K32; k0 += kGroup) {
        __m256 wv[4] = {load8(row + k0), load8(row + k0 + 8), load8(row + k0 + 16), load8(row + k0 + 24)};
        for (int m = 0; m < M; ++m) {
          const float* xm = x + m * K + k0;
          for (int i = 0; i < 4; ++i) acc[m][i] = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xm + 8 * i), acc[m][i]);
        }
      }
      for (int m = 0; m < M; ++m) {
        float s = hsum8(sum4(acc[m]));
        for (int64_t k = K32; k < K; ++k) s += x[m * K + k] * static_cast<float>(row[k]);
        out[m * N + n] = s;
      }
    }
  });
}
// int4 codes times int8-quantized activations (llama.cpp's Q4_1 x Q8 scheme): each 32-input block of
// an activation row is x ~ d * xq with xq in -127..127, so a block's dot product is integer work
// (maddubs: u8 codes x s8 activations) and one float multiply-add by scale * d. The min term uses
// the exact float block sums. xd: [M, groups] block scales, xsum: [M, groups].
// xq: [M, K] int8 in the paired layout (quantize_rows_q8): one 32-byte load holds the codes of two
// groups (low nibbles: inputs 0-15 of both, high nibbles: inputs 16-31), and the activations of the pair
// are stored to match, so the pair costs two maddubs, an int16 add (at most 4 * 15 * 127 a lane) and one
// madd, with no shuffles; the int32 lanes are 4 of group 2p then 4 of group 2p + 1.
//
// Register blocking: 4 weight rows (output channels) against 1-2 activation rows at a time, one FMA chain
// per (row, channel): the 4 channels keep 4-8 chains in flight, and the 4 sums of a row come out of one
// horizontal-add tree, with the min term added to the 4 at once. The pair's weight scale vector
// (scale of 2p x4 | scale of 2p + 1 x4) is built once per block of channels, the activations' (d of 2p x4
// | d of 2p + 1 x4) once per call, so the combined scale is one multiply. The earlier version (one channel,
// 8 rows, 2 chains each: more accumulators than the 16 ymm registers, scalar scale broadcasts, a scalar
// reduction and min term per output) ran at about a quarter of this loop's issue rate.
constexpr int kBlockN = 4;
constexpr int kBlockM = 2;

// (v[2p] x4 | v[2p + 1] x4) for each pair p of `groups` floats (an odd last group: (v[g] x4 | 0))
inline void pair_scales(const float* v, int64_t groups, __m256* out) {
  const __m256i lo_idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), hi_idx = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  const __m256i idx4 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), idx6 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 x = _mm256_loadu_ps(v + g);
    out[g / 2] = _mm256_permutevar8x32_ps(x, lo_idx);
    out[g / 2 + 1] = _mm256_permutevar8x32_ps(x, hi_idx);
    out[g / 2 + 2] = _mm256_permutevar8x32_ps(x, idx4);
    out[g / 2 + 3] = _mm256_permutevar8x32_ps(x, idx6);
  }
  for (; g < groups; g += 2) {
    const float b = g + 1 < groups ? v[g + 1] : 0.f;
    out[g / 2] = _mm256_set_m128(_mm_set1_ps(b), _mm_set1_ps(v[g]));
  }
}

// (sum of a's lanes, of b's, of c's, of d's)
inline __m128 hsum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// out[m * N + j] for activation rows m < R against the 4 weight rows `rows` (j < nvalid are stored).
// sv: the rows' pair scales, sv_stride apart; xdv: the activations' pair scales, xdv_stride apart;
// mn: the 4 rows' mins as float, gpad apart, and xsum the activation rows' block sums, gpad apart (both
// zero past `groups`). Each output's arithmetic is fixed (one FMA chain over the pairs,
// the same add tree, then the odd last group, then the min term) whatever R, nvalid or the rows beside
// it: a row's result never depends on the batch (greedy outputs do not, and speculative verification
// reproduces plain decoding).
template <int R>
inline void int4_q8_block(const int8_t* xq, int64_t K, const __m256* xdv, int64_t xdv_stride, const float* xsum,
                          int64_t gpad, const uint8_t* const* rows, const __m256* sv, int64_t sv_stride,
                          const float* mn, float* out, int64_t N, int nvalid) {
  const int64_t groups = K / kGroup, pairs = groups / 2;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[kBlockN][R];
  for (int j = 0; j < kBlockN; ++j)
    for (int m = 0; m < R; ++m) acc[j][m] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    for (int j = 0; j < kBlockN; ++j) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + p * kGroup));
      const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
      const __m256 s = sv[j * sv_stride + p];
      for (int m = 0; m < R; ++m) {
        const int8_t* a = xq + m * K + p * 2 * kGroup;
        const __m256i s16 = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + kGroup))));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
        acc[j][m] = _mm256_fmadd_ps(dot, _mm256_mul_ps(s, xdv[m * xdv_stride + p]), acc[j][m]);
      }
    }
  }
  for (int m = 0; m < R; ++m) {
    __m128 r = hsum4x8(acc[0][m], acc[1][m], acc[2][m], acc[3][m]);
    if (groups & 1) {  // an odd last group, stored as is: inputs 0..15 low nibbles, 16..31 high
      const int64_t g = groups - 1;
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + g * kGroup));
      const float d = _mm256_cvtss_f32(xdv[m * xdv_stride + pairs]);
      alignas(16) float tail[kBlockN];
      for (int j = 0; j < kBlockN; ++j) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + g * (kGroup / 2)));
        const __m256i c = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), low);
        tail[j] = hsum8(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(c, a), ones))) *
                  (_mm256_cvtss_f32(sv[j * sv_stride + pairs]) * d);
      }
      r = _mm_add_ps(r, _mm_load_ps(tail));
    }
    // the min term: mins . block sums, 8 groups at a time (both zero-padded to gpad), 4 channels at once
    __m256 t[kBlockN];
    for (int j = 0; j < kBlockN; ++j) t[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < gpad; g += 8) {
      const __m256 xs = _mm256_loadu_ps(xsum + m * gpad + g);
      for (int j = 0; j < kBlockN; ++j) t[j] = _mm256_fmadd_ps(_mm256_loadu_ps(mn + j * gpad + g), xs, t[j]);
    }
    alignas(16) float o[kBlockN];
    _mm_store_ps(o, _mm_add_ps(r, hsum4x8(t[0], t[1], t[2], t[3])));
    for (int j = 0; j < nvalid; ++j) out[m * N + j] = o[j];
  }
}

// Output channels n0..n1 for all M rows, in tiles of 16 channels; activation rows in tiles of about 64 KB
// (they stay in L2 while a tile's channels pass over them); per block of 4 channels the scales and mins
// are converted once per activation tile. xsum: [M, gpad], zero-padded.
void int4_q8_range_avx2(const int8_t* xq, const __m256* xdv, const float* xsum, int64_t M, const uint8_t* q,
                        const at::Half* scales, const at::Half* mins, float* out, int64_t N, int64_t K, int64_t n0,
                        int64_t n1) {
  const int64_t groups = K / kGroup, pairs = groups / 2, stride = pairs + 1, gpad = (groups + 7) / 8 * 8;
  const int64_t m_tile = std::max<int64_t>(kBlockM, (65536 / K) / kBlockM * kBlockM);
  std::vector<__m256> sv(kBlockN * stride);
  std::vector<float> f(kBlockN * gpad, 0.f), mn(kBlockN * gpad, 0.f);
  for (int64_t t0 = n0; t0 < n1; t0 += kTileN) {
    const int64_t t1 = std::min(n1, t0 + kTileN);
    for (int64_t mt = 0; mt < M; mt += m_tile) {
      const int64_t mt_end = std::min(M, mt + m_tile);
      for (int64_t nb = t0; nb < t1; nb += kBlockN) {
        const int nvalid = static_cast<int>(std::min<int64_t>(kBlockN, t1 - nb));
        const uint8_t* rows[kBlockN];
        for (int j = 0; j < kBlockN; ++j) {
          const int64_t n = nb + std::min(j, nvalid - 1);  // a short last block repeats its last channel
          rows[j] = q + n * (K / 2);
          if (mt == 0 && n + kBlockN < N) {
            prefetch_bytes(rows[j] + kBlockN * (K / 2), K / 2);
            prefetch_bytes(scales + (n + kBlockN) * groups, groups * 2);
            prefetch_bytes(mins + (n + kBlockN) * groups, groups * 2);
          }
          half_to_float(scales + n * groups, f.data() + j * gpad, groups);
          pair_scales(f.data() + j * gpad, groups, sv.data() + j * stride);
          half_to_float(mins + n * groups, mn.data() + j * gpad, groups);
        }
        for (int64_t m = mt; m < mt_end; m += kBlockM) {
          const int8_t* x = xq + m * K;
          const __m256* d = xdv + m * stride;
          const float* xs = xsum + m * gpad;
          float* o = out + m * N + nb;
          if (mt_end - m >= 2)
            int4_q8_block<2>(x, K, d, stride, xs, gpad, rows, sv.data(), stride, mn.data(), o, N, nvalid);
          else
            int4_q8_block<1>(x, K, d, stride, xs, gpad, rows, sv.data(), stride, mn.data(), o, N, nvalid);
        }
      }
    }
  }
}
#define INT4_PAIRED_ACTIVATIONS true
#define DENSE_ROWS dense_rows_avx2
#define INT4_F32_ROWS int4_rows_f32_avx2
#else
#define DENSE_ROWS dense_rows
#define INT4_ROWS int4_rows_q8
#define INT4_F32_ROWS int4_rows_f32
#define INT4_PAIRED_ACTIVATIONS false
#endif

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be [M, K] float32");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(x.size(0) >= 1, "x has no rows");
  TORCH_CHECK(K % kGroup == 0, "K must be a multiple of ", kGroup);
}

// int4 scales and mins: [N, K / 32] float16 each (`count` values)
void check_int4_scales(const torch::Tensor& scales, const torch::Tensor& mins, int64_t count) {
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.numel() == count,
              "scales must be [N, K / 32] float16");
  TORCH_CHECK(mins.scalar_type() == torch::kHalf && mins.is_contiguous() && mins.numel() == count,
              "mins must be [N, K / 32] float16");
}

#define DISPATCH_ROWS(M_RUNTIME, FN, ...)             \
  switch (M_RUNTIME) {                                \
    case 1: FN<1>(__VA_ARGS__); break;                \
    case 2: FN<2>(__VA_ARGS__); break;                \
    case 3: FN<3>(__VA_ARGS__); break;                \
    case 4: FN<4>(__VA_ARGS__); break;                \
    case 5: FN<5>(__VA_ARGS__); break;                \
    case 6: FN<6>(__VA_ARGS__); break;                \
    case 7: FN<7>(__VA_ARGS__); break;                \
    default: FN<8>(__VA_ARGS__); break;               \
  }

}  // namespace

namespace pagellm {

// Each chunk of up to 8 rows reads every weight once.
template <typename T>
void dense_matmul(const float* x, int64_t M, const T* w, float* out, int64_t N, int64_t K) {
  for (int64_t r = 0; r < M; r += kMaxRows) {
    DISPATCH_ROWS(std::min(kMaxRows, M - r), DENSE_ROWS, x + r * K, w, out + r * N, N, K);
  }
}

void f32_matmul(const float* x, int64_t M, const float* w, float* out, int64_t N, int64_t K) {
  dense_matmul(x, M, w, out, N, K);
}

void bf16_matmul(const float* x, int64_t M, const at::BFloat16* w, float* out, int64_t N, int64_t K) {
  dense_matmul(x, M, w, out, N, K);
}

void int8_matmul(const float* x, int64_t M, const int8_t* q, const float* scales, float* out, int64_t N,
                 int64_t K) {
#ifdef PAGELLM_AVX2
  // up to 24 rows a pass over the weights: their activations (24 x K floats) stay in L2 while the codes stream
  for (int64_t r = 0; r < M; r += 24) int8_rows_avx2(x + r * K, std::min<int64_t>(24, M - r), q, scales, out + r * N, N, K);
#else
  for (int64_t r = 0; r < M; r += kMaxRows) {
    DISPATCH_ROWS(std::min(kMaxRows, M - r), int8_rows, x + r * K, q, scales, out + r * N, N, K);
  }
#endif
}

// Each 32-input block of x becomes d * xq with xq in -127..127 (d = max |x| / 127); xsum: exact block sums.
// paired: the layout of int4_q8_block: per pair of blocks (2p, 2p + 1), 64 bytes holding inputs 0-15
// of 2p, 0-15 of 2p + 1, 16-31 of 2p, 16-31 of 2p + 1 (an odd last block stays as it is).
void quantize_rows_q8(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xsum, bool paired) {
  const int64_t groups = K / kGroup, half = kGroup / 2;
  for (int64_t i = 0; i < M * groups; ++i) {
    const float* v = x + i * kGroup;
    float amax = 0.f, sum = 0.f;
    for (int64_t j = 0; j < kGroup; ++j) {
      amax = std::max(amax, std::fabs(v[j]));
      sum += v[j];
    }
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    const int64_t row = i / groups, g = i % groups;
    int8_t* lo = xq + i * kGroup;  // inputs 0..15 of the block, then 16..31
    int8_t* hi = lo + half;
    if (paired && g < groups - groups % 2) {
      lo = xq + row * K + (g / 2) * 2 * kGroup + (g % 2) * half;
      hi = lo + kGroup;
    }
    for (int64_t j = 0; j < half; ++j) {
      lo[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
      hi[j] = static_cast<int8_t>(std::nearbyint(v[half + j] * inv));
    }
    xd[i] = d;
    xsum[i] = sum;
  }
}

void int4_matmul(const float* x, int64_t M, const uint8_t* q, const at::Half* scales, const at::Half* mins, float* out,
                 int64_t N, int64_t K, bool q8_activations) {
  const int64_t groups = K / kGroup;
  TORCH_CHECK(groups <= kMaxGroups, "int4 matmul: at most ", kMaxGroups * kGroup, " input features, got ", K);
  std::vector<float> xsum(M * groups, 0.f);
  if (!q8_activations) {  // exact: the codes widened to float instead
#ifndef PAGELLM_AVX2
    for (int64_t i = 0; i < M * groups; ++i)
      for (int64_t j = 0; j < kGroup; ++j) xsum[i] += x[i * kGroup + j];
#endif
    for (int64_t r = 0; r < M; r += kMaxRows) {
      DISPATCH_ROWS(std::min(kMaxRows, M - r), INT4_F32_ROWS, x + r * K, xsum.data() + r * groups, q, scales, mins,
                    out + r * N, N, K);
    }
    return;
  }
  std::vector<int8_t> xq(M * K);
  std::vector<float> xd(M * groups);
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    quantize_rows_q8(x + begin * K, end - begin, K, xq.data() + begin * K, xd.data() + begin * groups,
                     xsum.data() + begin * groups, INT4_PAIRED_ACTIVATIONS);
  });
#ifdef PAGELLM_AVX2
  // the activations' pair scales, (pairs + 1) per row (an odd last group in the last one), and their block
  // sums zero-padded to a multiple of 8 groups
  const int64_t pairs1 = groups / 2 + 1, gpad = (groups + 7) / 8 * 8;
  std::vector<__m256> xdv(M * pairs1);
  std::vector<float> xsum_pad(M * gpad, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    pair_scales(xd.data() + m * groups, groups, xdv.data() + m * pairs1);
    std::copy(xsum.data() + m * groups, xsum.data() + (m + 1) * groups, xsum_pad.data() + m * gpad);
  }
  // NOTE: each thread takes whole tiles of 16 output channels: a tile's codes stay in L1 while the
  // activation tiles pass over them, so many rows (prefill, large batches) read the weights from memory once
  at::parallel_for(0, N, kTileN, [&](int64_t begin, int64_t end) {
    int4_q8_range_avx2(xq.data(), xdv.data(), xsum_pad.data(), M, q, scales, mins, out, N, K, begin, end);
  });
#else
  at::parallel_for(0, N, kTileN, [&](int64_t begin, int64_t end) {
    for (int64_t n0 = begin; n0 < end; n0 += kTileN) {
      const int64_t n1 = std::min(end, n0 + kTileN);
      for (int64_t r = 0; r < M; r += kMaxRows) {
        DISPATCH_ROWS(std::min(kMaxRows, M - r), INT4_ROWS, xq.data() + r * K, xd.data() + r * groups,
                      xsum.data() + r * groups, q, scales, mins, out + r * N, N, K, n0, n1);
      }
    }
  });
#endif
}

void rms_norm_rows(const float* x, const float* weight, float* out, int64_t M, int64_t H, float eps) {
  for (int64_t m = 0; m < M; ++m) {  // NOTE: no threads: a row is a few hundred floats
    const float* row = x + m * H;
    float ss = 0.f;
    for (int64_t h = 0; h < H; ++h) ss += row[h] * row[h];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
    for (int64_t h = 0; h < H; ++h) out[m * H + h] = row[h] * r * weight[h];
  }
}

}  // namespace pagellm

// x [M, K] float32, w [N, K] float32 or bfloat16 -> [M, N] float32
torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be [M, K] float32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w must be contiguous [N, K]");
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  if (w.scalar_type() == torch::kFloat) {
    pagellm::f32_matmul(x.data_ptr<float>(), x.size(0), w.data_ptr<float>(), out.data_ptr<float>(), w.size(0),
                        w.size(1));
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "w must be float32 or bfloat16");
    pagellm::bf16_matmul(x.data_ptr<float>(), x.size(0), w.data_ptr<at::BFloat16>(), out.data_ptr<float>(),
                         w.size(0), w.size(1));
  }
  return out;
}

// x [M, K] float32, q [N, K] int8, scales [N] float32 -> [M, N] float32
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  const int64_t N = q.size(0), K = q.size(1);
  check_x(x, K);
  TORCH_CHECK(q.scalar_type() == torch::kChar && q.is_contiguous(), "q must be contiguous int8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.numel() == N, "scales must be [N] float32");
  auto out = torch::empty({x.size(0), N}, x.options());
  pagellm::int8_matmul(x.data_ptr<float>(), x.size(0), q.data_ptr<int8_t>(), scales.data_ptr<float>(),
                       out.data_ptr<float>(), N, K);
  return out;
}

// x [M, K] float32, q [N, K / 2] uint8 (layout above), scales and mins [N, K / 32] float16 -> [M, N]
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor mins,
                        bool q8_activations) {
  const int64_t N = q.size(0), K = q.size(1) * 2;
  check_x(x, K);
  TORCH_CHECK(q.scalar_type() == torch::kByte && q.is_contiguous(), "q must be contiguous uint8");
  check_int4_scales(scales, mins, N * K / kGroup);
  auto out = torch::empty({x.size(0), N}, x.options());
  pagellm::int4_matmul(x.data_ptr<float>(), x.size(0), q.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(),
                       mins.data_ptr<at::Half>(), out.data_ptr<float>(), N, K, q8_activations);
  return out;
}

// int4 codes (layout above) -> float32 weight [N, K], for calls with too many rows for int4_gemv
torch::Tensor int4_dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor mins) {
  const int64_t N = q.size(0), K = q.size(1) * 2, groups = K / kGroup;
  TORCH_CHECK(q.scalar_type() == torch::kByte && q.is_contiguous(), "q must be contiguous uint8");
  check_int4_scales(scales, mins, N * groups);
  auto out = torch::empty({N, K}, scales.options().dtype(torch::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const at::Half* sp = scales.data_ptr<at::Half>();
  const at::Half* mp = mins.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N * groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // i: (row, group)
      const uint8_t* b = qp + i * (kGroup / 2);
      float* w = op + i * kGroup;
      const float s = static_cast<float>(sp[i]), m = static_cast<float>(mp[i]);
      for (int64_t j = 0; j < kGroup / 2; ++j) {
        w[j] = static_cast<float>(b[j] & 0x0F) * s + m;
        w[j + kGroup / 2] = static_cast<float>(b[j] >> 4) * s + m;
      }
    }
  });
  return out;
}

// RMSNorm of float32 rows: out = x / sqrt(mean(x^2) + eps) * weight. torch's op costs ~25-60 us a call
// on a single decode row here, 60 calls a step.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "x must be [M, H] float32");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.numel() == x.size(1), "weight must be [H] float32");
  auto out = torch::empty_like(x);
  pagellm::rms_norm_rows(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1),
                         static_cast<float>(eps));
  return out;
}
