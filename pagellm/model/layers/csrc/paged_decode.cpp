// Paged decode attention for CPU: one query token per sequence attends to its KV blocks where they lie
// in the cache (no gather into a padded tensor). Work items are (sequence, KV head) pairs; the query
// heads of one GQA group share each key/value row read.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

template <typename T>
void decode_kernel(const float* q, const T* k_cache, const T* v_cache, const int64_t* block_table,
                   const int64_t* seq_lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                   int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_stride = num_kv_heads * head_dim;  // between tokens of one block
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> key(head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t len = seq_lens[seq];
      const int64_t* table = block_table + seq * max_blocks;
      scores.assign(group * len, 0.f);
      const float* qg = q + (seq * num_heads + kv_head * group) * head_dim;  // [group, head_dim]
      for (int64_t t = 0; t < len; ++t) {
        const T* k = k_cache + (table[t / block_size] * block_size + t % block_size) * row_stride + kv_head * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) key[d] = to_float(k[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float* qh = qg + g * head_dim;
          float dot = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * key[d];
          scores[g * len + t] = dot * scale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        const float mx = *std::max_element(s, s + len);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      float* og = out + (seq * num_heads + kv_head * group) * head_dim;
      std::fill(og, og + group * head_dim, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v = v_cache + (table[t / block_size] * block_size + t % block_size) * row_stride + kv_head * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) key[d] = to_float(v[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* oh = og + g * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) oh[d] += p * key[d];
        }
      }
    }
  });
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
    decode_kernel<float>(qf.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                         table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), num_seqs,
                         num_heads, num_kv_heads, head_dim, block_size, table.size(1), static_cast<float>(scale));
  } else if (k_cache.scalar_type() == torch::kBFloat16) {
    decode_kernel<at::BFloat16>(qf.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(),
                                v_cache.data_ptr<at::BFloat16>(), table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                                out.data_ptr<float>(), num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                                table.size(1), static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 caches only");
  }
  return out.to(q.scalar_type());
}
