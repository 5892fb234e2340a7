// One extension module for every C++ kernel of pagellm (built by model/layers/kernels.py).
#include "kernels.h"

torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w);
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scales);
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor mins,
                        bool q8_activations);
torch::Tensor int4_dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor mins);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
void bind_decode_stack(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU)");
  m.def("dense_gemv", &dense_gemv, "few-row matmul with a float32 or bfloat16 weight (CPU)");
  m.def("int8_gemv", &int8_gemv, "few-row matmul with a per-channel int8 weight (CPU)");
  m.def("int4_gemv", &int4_gemv, "few-row matmul with a group-wise int4 weight (CPU)");
  m.def("int4_dequantize", &int4_dequantize, "group-wise int4 codes to a float32 weight (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm of float32 rows (CPU)");
  bind_decode_stack(m);
}
