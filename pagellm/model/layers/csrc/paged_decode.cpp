// Paged decode attention for CPU: one query token per sequence attends to its KV blocks where they lie
// in the cache (no gather into a padded tensor). Work items are (sequence, KV head, split): the query
// heads of one GQA group share each key/value row read, and a long context is cut into splits of a fixed
// length so that a small batch still has work for every thread (each split keeps its own softmax max and sum;
// the splits are merged at the end, as in flash-decoding).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kSplitTokens = 128;  // positions per split (shorter ones cost more to merge than they save)

template <typename T>
inline const float* row_as_float(const T* row, float* scratch, int64_t n) {
  for (int64_t d = 0; d < n; ++d) scratch[d] = static_cast<float>(row[d]);
  return scratch;
}

template <>
inline const float* row_as_float<float>(const float* row, float*, int64_t) { return row; }


#ifdef PAGELLM_AVX2
// One work item with AVX2: the `group` query heads of one KV head against tokens t0..t0+n of one
// sequence. Scores: each key row is widened once and dotted with every head; softmax with the
// vector exp; values: one head at a time, its output in registers. o: [group, HD] unnormalized.
template <typename T, int HD>
void attend_avx2(const float* qg, int64_t group, const T* k_cache, const T* v_cache, const int64_t* table,
                 int64_t block_size, int64_t row_stride, int64_t kv_head, int64_t t0, int64_t n, float scale,
                 float* scores, float* o, float* mx_out, float* sum_out) {
  constexpr int V = HD / 8;
  // the rows' offsets, walking the block table once (no division per token: a 64-bit divide is ~40
  // cycles, more than a row's arithmetic)
  std::vector<int64_t> rows(n);
  {
    int64_t b = t0 / block_size, j = t0 % block_size;
    for (int64_t t = 0; t < n; ++t) {
      rows[t] = (table[b] * block_size + j) * row_stride + kv_head * HD;
      if (++j == block_size) {
        j = 0;
        ++b;
      }
    }
  }
  auto row_of = [&](const T* cache, int64_t t) { return cache + rows[t]; };
  for (int64_t t = 0; t < n; ++t) {
    const T* key = row_of(k_cache, t);
    __m256 kv[V];
    for (int i = 0; i < V; ++i) kv[i] = pagellm::load8(key + 8 * i);
    for (int64_t g = 0; g < group; ++g) {
      const float* qh = qg + g * HD;
      __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(qh), kv[0]);
      __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(qh + 8), kv[1]);
      for (int i = 2; i < V; i += 2) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * i), kv[i], a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * i + 8), kv[i + 1], a1);
      }
      scores[g * n + t] = pagellm::hsum8(_mm256_add_ps(a0, a1)) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sc = scores + g * n;
    const float mx = *std::max_element(sc, sc + n);
    const __m256 mxv = _mm256_set1_ps(mx);
    __m256 sumv = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
      const __m256 e = pagellm::exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), mxv));
      _mm256_storeu_ps(sc + t, e);
      sumv = _mm256_add_ps(sumv, e);
    }
    float sum = pagellm::hsum8(sumv);
    for (; t < n; ++t) {
      sc[t] = std::exp(sc[t] - mx);
      sum += sc[t];
    }
    mx_out[g] = mx;
    sum_out[g] = sum;
    __m256 acc[V];
    for (int i = 0; i < V; ++i) acc[i] = _mm256_setzero_ps();
    for (t = 0; t < n; ++t) {
      const T* val = row_of(v_cache, t);
      const __m256 p = _mm256_set1_ps(sc[t]);
      for (int i = 0; i < V; ++i) acc[i] = _mm256_fmadd_ps(p, pagellm::load8(val + 8 * i), acc[i]);
    }
    for (int i = 0; i < V; ++i) _mm256_storeu_ps(o + g * HD + 8 * i, acc[i]);
  }
}
#endif

// HD: the head dim known at compile time (64 or 128: fully unrolled, vectorized loops), 0: any
template <typename T, int HD>
void decode_kernel(const float* q, const T* k_cache, const T* v_cache, const int64_t* block_table,
                   const int64_t* seq_lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                   int64_t head_dim_runtime, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t head_dim = HD > 0 ? HD : head_dim_runtime;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_stride = num_kv_heads * head_dim;  // between tokens of one block
  const int64_t max_len = *std::max_element(seq_lens, seq_lens + num_seqs);
  const int64_t pairs = num_seqs * num_kv_heads;
  // NOTE: splits of a fixed kSplitTokens positions: a sequence's split boundaries, and so the order its partial
  // softmaxes are merged in, depend on its own length only, never on the batch or the thread count, so a row's
  // output is the same alone or beside others (greedy outputs and speculative verification rely on it).
  // Splits past a sequence's end are empty and skipped.
  const int64_t splits = std::max<int64_t>(1, (max_len + kSplitTokens - 1) / kSplitTokens);
  // per (pair, split, group head): unnormalized output [head_dim], running max, sum of exponentials
  std::vector<float> part_out(pairs * splits * group * head_dim);
  std::vector<float> part_max(pairs * splits * group, -std::numeric_limits<float>::infinity());
  std::vector<float> part_sum(pairs * splits * group, 0.f);
  // NOTE: items are visited in (KV head, split, row) order, so the rows of one sequence (a prompt chunk or the
  // proposals of speculative decoding, one row per token) attend to the same keys and values one after another:
  // the first brings them into cache, the rest read them there instead of from memory (a long context is
  // megabytes a layer). Each item's arithmetic, and where its result goes, is the same in any order.
  at::parallel_for(0, pairs * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, scratch(head_dim);
    for (int64_t visit = begin; visit < end; ++visit) {
      const int64_t kv_head = visit / (splits * num_seqs), rest = visit % (splits * num_seqs);
      const int64_t split = rest / num_seqs, seq = rest % num_seqs;
      const int64_t item = (seq * num_kv_heads + kv_head) * splits + split;
      const int64_t len = seq_lens[seq];
      const int64_t t0 = std::min(len, split * kSplitTokens), t1 = std::min(len, t0 + kSplitTokens), n = t1 - t0;
      float* o = part_out.data() + item * group * head_dim;
      std::fill(o, o + group * head_dim, 0.f);
      if (n <= 0) continue;
      const int64_t* table = block_table + seq * max_blocks;
      const float* qg = q + (seq * num_heads + kv_head * group) * head_dim;  // [group, head_dim]
      scores.assign(group * n, 0.f);
#ifdef PAGELLM_AVX2
      if constexpr (HD > 0) {
        attend_avx2<T, HD>(qg, group, k_cache, v_cache, table, block_size, row_stride, kv_head, t0, n, scale,
                           scores.data(), o, part_max.data() + item * group, part_sum.data() + item * group);
        continue;
      }
#endif
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = t0 + t;
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        const float* key = row_as_float(k_cache + slot * row_stride + kv_head * head_dim, scratch.data(), head_dim);
        for (int64_t g = 0; g < group; ++g) {
          const float* qh = qg + g * head_dim;
          float dot = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * key[d];
          scores[g * n + t] = dot * scale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * n;
        const float mx = *std::max_element(sc, sc + n);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) { sc[t] = std::exp(sc[t] - mx); sum += sc[t]; }
        part_max[item * group + g] = mx;
        part_sum[item * group + g] = sum;
      }
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = t0 + t;
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        const float* val = row_as_float(v_cache + slot * row_stride + kv_head * head_dim, scratch.data(), head_dim);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * n + t];
          float* oh = o + g * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) oh[d] += p * val[d];
        }
      }
    }
  });
  // merge the splits: out = sum_s o_s * e^(m_s - m) / sum_s l_s * e^(m_s - m)
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t seq = pair / num_kv_heads, kv_head = pair % num_kv_heads;
    for (int64_t g = 0; g < group; ++g) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < splits; ++s) m = std::max(m, part_max[(pair * splits + s) * group + g]);
      float* dst = out + (seq * num_heads + kv_head * group + g) * head_dim;
      std::fill(dst, dst + head_dim, 0.f);
      float total = 0.f;
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t idx = (pair * splits + s) * group + g;
        if (part_sum[idx] == 0.f) continue;  // an empty split
        const float w = std::exp(part_max[idx] - m);
        total += part_sum[idx] * w;
        const float* src = part_out.data() + idx * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] += src[d] * w;
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < head_dim; ++d) dst[d] *= inv;
    }
  }
}

template <typename T>
void launch(const torch::Tensor& qf, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& table, const torch::Tensor& lens, torch::Tensor& out, int64_t num_heads,
            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, double scale) {
  auto run = [&](auto kernel) {
    kernel(qf.data_ptr<float>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), table.data_ptr<int64_t>(),
           lens.data_ptr<int64_t>(), out.data_ptr<float>(), qf.size(0), num_heads, num_kv_heads, head_dim,
           block_size, table.size(1), static_cast<float>(scale));
  };
  if (head_dim == 64) {
    run(decode_kernel<T, 64>);
  } else if (head_dim == 128) {
    run(decode_kernel<T, 128>);
  } else {
    run(decode_kernel<T, 0>);
  }
}

}  // namespace

// q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
// block_table: [num_seqs, max_blocks] int64; seq_lens: [num_seqs] int64. Returns q's shape, q's dtype.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_table.scalar_type() == torch::kLong && seq_lens.scalar_type() == torch::kLong, "int64 indices");
  auto qf = q.to(torch::kFloat).contiguous();
  auto table = block_table.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty_like(qf);
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head mismatch");
  if (k_cache.scalar_type() == torch::kFloat) {
    launch<float>(qf, k_cache, v_cache, table, lens, out, num_heads, num_kv_heads, head_dim, block_size, scale);
  } else if (k_cache.scalar_type() == torch::kBFloat16) {
    launch<at::BFloat16>(qf, k_cache, v_cache, table, lens, out, num_heads, num_kv_heads, head_dim, block_size,
                         scale);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 caches only");
  }
  return out.to(q.scalar_type());
}
