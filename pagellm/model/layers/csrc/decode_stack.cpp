// The decoder layers of a Llama-family model for a decode-only step, as one C++ call.
//
// A decode step of a small model is mostly launch overhead: per layer, about 15 torch ops and Python
// calls cost more than the arithmetic of one or a few token rows. Here the whole layer loop runs in
// C++ over preallocated float32 rows: RMSNorm, fused QKV matmul, rotary (neox layout), the KV-cache
// write, paged attention, output projection, SwiGLU MLP and both residual adds. Weights are the
// model's own tensors (shared, not copied), in any of the layouts of kernels.h.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

enum Kind : int64_t { kF32 = 0, kBF16 = 1, kInt8 = 2, kInt4 = 3 };

struct Lin {
  int64_t kind = kF32;
  int64_t n = 0, k = 0;  // out, in features
  torch::Tensor w, scales, mins, bias;  // bias: empty when absent
  bool q8 = true;  // int4: activations quantized to int8 per block

  void run(const float* x, int64_t M, float* out) const {
    switch (kind) {
      case kF32: pagellm::f32_matmul(x, M, w.data_ptr<float>(), out, n, k); break;
      case kBF16: pagellm::bf16_matmul(x, M, w.data_ptr<at::BFloat16>(), out, n, k); break;
      case kInt8: pagellm::int8_matmul(x, M, w.data_ptr<int8_t>(), scales.data_ptr<float>(), out, n, k); break;
      default:
        pagellm::int4_matmul(x, M, w.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(), mins.data_ptr<at::Half>(), out,
                             n, k, q8);
    }
    if (bias.numel()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < n; ++j) out[m * n + j] += b[j];
    }
  }
};

Lin make_lin(int64_t kind, torch::Tensor w, torch::Tensor scales, torch::Tensor mins, torch::Tensor bias,
             int64_t n, int64_t k) {
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "weights must be contiguous CPU tensors");
  const std::vector<c10::ScalarType> dtypes = {torch::kFloat, torch::kBFloat16, torch::kChar, torch::kByte};
  TORCH_CHECK(kind >= 0 && kind < 4 && w.scalar_type() == dtypes[kind], "weight dtype does not match its kind");
  TORCH_CHECK(w.size(0) == n && w.size(1) == (kind == kInt4 ? k / 2 : k), "weight shape mismatch");
  if (kind == kInt8) TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous(), "int8 scales: float32");
  if (kind == kInt4)
    TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && mins.scalar_type() == torch::kHalf &&
                mins.is_contiguous(), "int4 scales and mins: float16");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat && bias.numel() == n), "bias");
  return Lin{kind, n, k, w, scales, mins, bias.contiguous()};
}

struct Layer {
  torch::Tensor ln1, ln2, k_cache, v_cache;
  Lin qkv, o, gate_up, down;
};

// SwiGLU: out[b, i] = silu(gate[b, i]) * up[b, i], with gu[b] = [gate | up] (2 * inter floats)
void silu_mul_rows(const float* gu, float* out, int64_t B, int64_t inter) {
  for (int64_t b = 0; b < B; ++b) {
    const float* g = gu + b * 2 * inter;
    const float* u = g + inter;
    float* o = out + b * inter;
    int64_t i = 0;
#ifdef PAGELLM_AVX2
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= inter; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      const __m256 e = pagellm::exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < inter; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
}

template <typename T>
void store_row(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // bf16: round to nearest even
}

}  // namespace

class DecodeStack {
 public:
  DecodeStack(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate,
              double eps, double scale, torch::Tensor cos, torch::Tensor sin, bool q8_activations)
      : hidden_(hidden), heads_(num_heads), kv_heads_(num_kv_heads), hd_(head_dim), inter_(intermediate),
        eps_(static_cast<float>(eps)), scale_(scale), q8_(q8_activations), cos_(cos.contiguous()),
        sin_(sin.contiguous()) {
    TORCH_CHECK(cos_.scalar_type() == torch::kFloat && cos_.dim() == 2 && cos_.size(1) == head_dim, "cos table");
    TORCH_CHECK(sin_.sizes() == cos_.sizes() && sin_.scalar_type() == torch::kFloat, "sin table");
    TORCH_CHECK(head_dim % 2 == 0 && num_heads % num_kv_heads == 0, "head layout");
  }

  // kinds: qkv, o, gate_up, down; weights: 4 tensors (w, scales, mins, bias) per projection, in that order
  void add_layer(torch::Tensor ln1, torch::Tensor ln2, std::vector<int64_t> kinds, std::vector<torch::Tensor> ts,
                 torch::Tensor k_cache, torch::Tensor v_cache) {
    TORCH_CHECK(kinds.size() == 4 && ts.size() == 16, "4 projections, 4 tensors each");
    TORCH_CHECK(ln1.scalar_type() == torch::kFloat && ln1.numel() == hidden_ && ln2.sizes() == ln1.sizes(), "norms");
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == kv_heads_ && k_cache.size(3) == hd_,
                "caches must be contiguous [num_blocks, block_size, num_kv_heads, head_dim]");
    TORCH_CHECK(k_cache.scalar_type() == torch::kFloat || k_cache.scalar_type() == torch::kBFloat16, "cache dtype");
    TORCH_CHECK(layers_.empty() || k_cache.sizes() == layers_[0].k_cache.sizes(), "every layer's cache has one shape");
    const int64_t qkv_n = (heads_ + 2 * kv_heads_) * hd_;
    const int64_t dims[4][2] = {{qkv_n, hidden_}, {hidden_, heads_ * hd_}, {2 * inter_, hidden_}, {hidden_, inter_}};
    Layer layer{ln1.contiguous(), ln2.contiguous(), k_cache, v_cache, {}, {}, {}, {}};
    Lin* lins[4] = {&layer.qkv, &layer.o, &layer.gate_up, &layer.down};
    for (int i = 0; i < 4; ++i) {
      *lins[i] = make_lin(kinds[i], ts[4 * i], ts[4 * i + 1], ts[4 * i + 2], ts[4 * i + 3], dims[i][0], dims[i][1]);
      lins[i]->q8 = q8_;
    }
    layers_.push_back(std::move(layer));
  }

  // x: [B, hidden] float32 embeddings of the step's tokens; positions, slot_mapping: [B] int64;
  // block_table: [B, max_blocks] int64; seq_lens: [B] int64 (including the new token). Returns the
  // hidden states after the last layer (before the final norm), [B, hidden] float32.
  torch::Tensor forward(torch::Tensor x_in, torch::Tensor positions, torch::Tensor slot_mapping,
                        torch::Tensor block_table, torch::Tensor seq_lens) {
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == hidden_ && x_in.scalar_type() == torch::kFloat, "x");
    const int64_t B = x_in.size(0);
    TORCH_CHECK(positions.numel() == B && slot_mapping.numel() == B && seq_lens.numel() == B &&
                block_table.size(0) == B, "one position, slot and length per row");
    TORCH_CHECK(positions.scalar_type() == torch::kLong && slot_mapping.scalar_type() == torch::kLong, "int64");
    auto pos_t = positions.contiguous();
    auto slot_t = slot_mapping.contiguous();
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    const int64_t* slots = slot_t.data_ptr<int64_t>();
    TORCH_CHECK(!layers_.empty(), "no layers");
    const int64_t cache_slots = layers_[0].k_cache.size(0) * layers_[0].k_cache.size(1);  // the same in every layer
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(pos[b] >= 0 && pos[b] < cos_.size(0), "position ", pos[b], " is past the rotary table");
      TORCH_CHECK(slots[b] >= 0 && slots[b] < cache_slots, "slot ", slots[b], " is outside the KV cache");
    }
    auto opts = x_in.options();
    auto x = x_in.contiguous().clone();
    auto h = torch::empty({B, hidden_}, opts);
    auto tmp = torch::empty({B, hidden_}, opts);
    const int64_t q_size = heads_ * hd_, kv_size = kv_heads_ * hd_, qkv_n = q_size + 2 * kv_size;
    auto qkv = torch::empty({B, qkv_n}, opts);
    auto q = torch::empty({B, heads_, hd_}, opts);
    auto gu = torch::empty({B, 2 * inter_}, opts);
    auto act = torch::empty({B, inter_}, opts);
    float* xp = x.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    float* tp = tmp.data_ptr<float>();
    float* qkvp = qkv.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    const float* cosp = cos_.data_ptr<float>();
    const float* sinp = sin_.data_ptr<float>();
    const int64_t half = hd_ / 2;
    for (const Layer& L : layers_) {
      pagellm::rms_norm_rows(xp, L.ln1.data_ptr<float>(), hp, B, hidden_, eps_);
      L.qkv.run(hp, B, qkvp);
      for (int64_t b = 0; b < B; ++b) {
        float* row = qkvp + b * qkv_n;
        const float* c = cosp + pos[b] * hd_;
        const float* s = sinp + pos[b] * hd_;
        for (int64_t head = 0; head < heads_ + kv_heads_; ++head) {  // q heads, then k heads: adjacent
          float* v = row + head * hd_;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = v[i], x2 = v[i + half];
            v[i] = x1 * c[i] - x2 * s[i];
            v[i + half] = x2 * c[i + half] + x1 * s[i + half];
          }
        }
        std::copy(row, row + q_size, qp + b * q_size);
        if (L.k_cache.scalar_type() == torch::kFloat) {
          store_row(L.k_cache.data_ptr<float>() + slots[b] * kv_size, row + q_size, kv_size);
          store_row(L.v_cache.data_ptr<float>() + slots[b] * kv_size, row + q_size + kv_size, kv_size);
        } else {
          store_row(L.k_cache.data_ptr<at::BFloat16>() + slots[b] * kv_size, row + q_size, kv_size);
          store_row(L.v_cache.data_ptr<at::BFloat16>() + slots[b] * kv_size, row + q_size + kv_size, kv_size);
        }
      }
      auto attn = paged_decode_attention(q, L.k_cache, L.v_cache, block_table, seq_lens, scale_);
      L.o.run(attn.data_ptr<float>(), B, tp);
      for (int64_t i = 0; i < B * hidden_; ++i) xp[i] += tp[i];
      pagellm::rms_norm_rows(xp, L.ln2.data_ptr<float>(), hp, B, hidden_, eps_);
      L.gate_up.run(hp, B, gu.data_ptr<float>());
      silu_mul_rows(gu.data_ptr<float>(), act.data_ptr<float>(), B, inter_);
      L.down.run(act.data_ptr<float>(), B, tp);
      for (int64_t i = 0; i < B * hidden_; ++i) xp[i] += tp[i];
    }
    return x;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  int64_t hidden_, heads_, kv_heads_, hd_, inter_;
  float eps_;
  double scale_;
  bool q8_;  // int4 projections quantize their activations to int8 (KernelPlan.int4_q8_activations)
  torch::Tensor cos_, sin_;
  std::vector<Layer> layers_;
};

void bind_decode_stack(pybind11::module& m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, torch::Tensor,
                          torch::Tensor, bool>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("forward", &DecodeStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("num_layers", &DecodeStack::num_layers);
}
