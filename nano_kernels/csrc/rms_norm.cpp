// The small ops between a decode step's matrix products, each in one call: 02's RMSNorm, and each
// layer's q/k norms followed by RoPE (02's Qwen3Attention.norm_and_rotate). In eager torch these
// are ~9 and ~20 small ops, each with its dispatch overhead; the results are bit for bit 02's
// (every product and sum rounded as torch's ops round them).

#include <ATen/Parallel.h>
#include <cmath>
#include <c10/util/BFloat16.h>
#include <vector>

#include "ops.h"

// Every product and sum below rounds on its own, as torch's separate ops do: no fused multiply-add,
// which rounds once and which GCC otherwise makes of a * b + c (RoPE's x * cos + r * sin).
#pragma GCC optimize("fp-contract=off")

namespace {

// 02's RMSNorm row by row: y = weight * T(x / sqrt(mean(x^2) + eps)), the mean in fp32 and the
// normalised row rounded to T before the weight multiplies it, as HF does. One call for the ~9 ops
// eager torch runs it as.
template <typename T>
static void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r, x += d, y += d) {
    float squares = 0.f;
    for (int64_t i = 0; i < d; ++i) squares += float(x[i]) * float(x[i]);
    const float inv_rms = 1.f / std::sqrt(squares / float(d) + eps);
    for (int64_t i = 0; i < d; ++i) y[i] = T(float(w[i]) * float(T(float(x[i]) * inv_rms)));
  }
}

}  // namespace

// x (..., d) contiguous, weight (d,) of x's dtype (fp32 or bf16) -> x's shape.
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  const int64_t d = weight.numel();
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.dim() >= 1 && x.size(-1) == d &&
              x.scalar_type() == weight.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), "rms_norm: x (..., d), weight (d,), fp32 or bf16");
  at::Tensor y = at::empty_like(x);
  const int64_t rows = d ? x.numel() / d : 0;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), y.data_ptr<float>(), rows, d, float(eps));
  else
    rms_norm_rows(x.const_data_ptr<at::BFloat16>(), weight.const_data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
                  rows, d, float(eps));
  return y;
}

namespace {

// 02's Qwen3Attention.norm_and_rotate for one of q (N, heads, d) / k: every head vector normalised as
// above, then rotated by its token's cos/sin (N, d) as 02's apply_rope computes it,
// y * cos + rotate_half(y) * sin, each product and the sum rounded to T as torch's three ops round them.
// A prompt's rows are shared among torch's threads; a decode step's few run on the calling thread.
template <typename T>
static void norm_rotate_rows(const T* x, const T* w, const T* cos, const T* sin, T* y, int64_t N, int64_t heads,
                             int64_t d, float eps) {
  const int64_t half = d / 2;
  at::parallel_for(0, N * heads, 512, [&](int64_t begin, int64_t end) {
    std::vector<T> normed(d);
    for (int64_t row = begin; row < end; ++row) {          // row = token n's head h
      const T *c = cos + row / heads * d, *s = sin + row / heads * d;
      rms_norm_rows(x + row * d, w, normed.data(), 1, d, eps);
      for (int64_t i = 0; i < d; ++i) {
        const float rotated = i < half ? -float(normed[i + half]) : float(normed[i - half]);
        y[row * d + i] = T(float(T(float(normed[i]) * float(c[i]))) + float(T(rotated * float(s[i]))));
      }
    }
  });
}

}  // namespace

// q (N, H, d), k (N, n_kv, d) contiguous; their norms' weights (d,); cos, sin (N, d); one dtype,
// fp32 or bf16 -> (q, k) normalised and rotated: one call for the ~20 ops of eager torch.
std::tuple<at::Tensor, at::Tensor> norm_and_rotate(at::Tensor q, at::Tensor k, at::Tensor q_weight, at::Tensor k_weight,
                                                   at::Tensor cos, at::Tensor sin, double eps) {
  const int64_t N = q.size(0), d = q.size(-1);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == N && k.size(2) == d && d % 2 == 0 &&
              q_weight.numel() == d && k_weight.numel() == d && cos.sizes() == at::IntArrayRef({N, d}) &&
              sin.sizes() == cos.sizes(), "norm_and_rotate: q (N, H, d), k (N, n_kv, d), weights (d,), cos/sin (N, d)");
  for (const at::Tensor& t : {q, k, q_weight, k_weight, cos, sin})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == q.scalar_type() &&
                (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16), "norm_and_rotate: contiguous, one dtype, fp32 or bf16");
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "norm_and_rotate", [&] {
    norm_rotate_rows(q.const_data_ptr<scalar_t>(), q_weight.const_data_ptr<scalar_t>(), cos.const_data_ptr<scalar_t>(),
                     sin.const_data_ptr<scalar_t>(), q_out.data_ptr<scalar_t>(), N, q.size(1), d, float(eps));
    norm_rotate_rows(k.const_data_ptr<scalar_t>(), k_weight.const_data_ptr<scalar_t>(), cos.const_data_ptr<scalar_t>(),
                     sin.const_data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), N, k.size(1), d, float(eps));
  });
  return {q_out, k_out};
}
