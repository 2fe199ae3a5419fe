// The one place that includes torch/extension.h (pybind11: slow to compile), so the kernels' own
// files build in parallel and fast. Two functions are also ops of torch's dispatcher, for compiled
// code: inductor's C++ wrapper calls them directly, no Python in between.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention through block tables (paged_decode.cpp)");
  m.def("paged_decode_step", &paged_decode_step, "store k/v, then paged_decode (paged_decode.cpp)");
#if defined(__AVX512BF16__)
  m.def("causal_attention", &causal_attention, "bf16 flash attention of a prompt chunk (paged_prefill.cpp)");
#endif
  m.def("gemv", &gemv, "x @ weight^T for a few rows of x (gemv.cpp)");
  m.def("rms_norm", &rms_norm, "RMSNorm (rms_norm.cpp)");
  m.def("norm_and_rotate", &norm_and_rotate, "q/k RMSNorm and RoPE in one call (rms_norm.cpp)");
}

TORCH_LIBRARY_FRAGMENT(nano_vllm_cpu, m) {
  m.def("paged_decode_step(Tensor q, Tensor k, Tensor v, Tensor kv_cache, int layer, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens) -> Tensor");
  m.def("gemv(Tensor x, Tensor weight) -> Tensor");
}
TORCH_LIBRARY_IMPL(nano_vllm_cpu, CPU, m) {
  m.impl("paged_decode_step", &paged_decode_step);
  m.impl("gemv", &gemv);
}
