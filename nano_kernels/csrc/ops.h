// The C++ functions of nano_kernels/: each .cpp file here defines some of them, bindings.cpp hands them
// to Python (nano_kernels/extension.py builds all the files as one torch extension).
#pragma once
#include <ATen/ATen.h>
#include <tuple>

// paged_decode.cpp: attention of one query row per sequence, reading K/V blocks in place.
at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                        at::Tensor context_lens);
// paged_decode.cpp: one layer's decode-step attention: store the step's k/v, then paged_decode.
at::Tensor paged_decode_step(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kv_cache, int64_t layer,
                             at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor context_lens);
#if defined(__AVX512BF16__)
// paged_prefill.cpp: flash attention for a bf16 prompt chunk (CPUs with AVX512-BF16 only).
at::Tensor causal_attention(at::Tensor q, at::Tensor k, at::Tensor v);
#endif
// gemv.cpp: x (M, K) @ weight (N, K)^T for a few rows, streaming the weight once.
at::Tensor gemv(at::Tensor x, at::Tensor weight);
// rms_norm.cpp: 02's RMSNorm, and q/k norms with RoPE in one call.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
std::tuple<at::Tensor, at::Tensor> norm_and_rotate(at::Tensor q, at::Tensor k, at::Tensor q_weight, at::Tensor k_weight,
                                                   at::Tensor cos, at::Tensor sin, double eps);
