// Raw-pointer entry points shared between the kernel files (the Python bindings wrap them in tensors).
#pragma once
#include <torch/extension.h>

#include <cstdint>

namespace pagellm {

// out[M, N] = x[M, K] @ w[N, K]^T for few rows (decode), with w in one of these layouts:
void f32_matmul(const float* x, int64_t M, const float* w, float* out, int64_t N, int64_t K);
void bf16_matmul(const float* x, int64_t M, const at::BFloat16* w, float* out, int64_t N, int64_t K);
void int8_matmul(const float* x, int64_t M, const int8_t* q, const float* scales, float* out, int64_t N, int64_t K);
// int4: the activations are quantized to int8 per 32-input block first (as llama.cpp does for its Q4
// formats), so the inner products are integer work; see quant_gemv.cpp
// int4 scales and mins are float16 (GGUF Q4_0/Q4_1 store them so): 20 bytes per 32 weights, not 24
void int4_matmul(const float* x, int64_t M, const uint8_t* q, const at::Half* scales, const at::Half* mins, float* out,
                 int64_t N, int64_t K);
void rms_norm_rows(const float* x, const float* weight, float* out, int64_t M, int64_t H, float eps);

}  // namespace pagellm

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_table, torch::Tensor seq_lens, double scale);
