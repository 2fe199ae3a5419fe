// A GEMV for decode-sized batches: x (M, K) @ weight (N, K)^T for M of 1 to a few rows.
// A batch-1 decode step is a matrix-vector product per weight, all memory reads, so tokens per
// second are set by how fast the weights stream in. Each thread takes a contiguous range of the
// weight's rows and reads them once, front to back; the M rows of x reuse each row while it is
// in L1. The GEMM libraries' kernels are tuned for many rows and read small batches slower.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <algorithm>
#include <cstdint>
#include <omp.h>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "ops.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();          // floats in one SIMD register: 16 with AVX-512, 8 with AVX2

static inline Vec load(const float* p) { return Vec::loadu(p); }
static inline Vec load(const at::BFloat16* p) { Vec v; at::vec::load_to_float(p, v); return v; }

// U independent sums (registers) per step: 512 bytes of weights, 8 cache lines, asked for at once,
// so enough reads are in flight to keep up with the memory; at most the registers there are.
template <typename T>
constexpr int U = std::min<int64_t>(512 / (W * sizeof(T)), W == 16 ? 16 : 8);

// x . w over K: x fp32 (a few KiB, in cache), w one weight row, read once from front to back.
// This form, K a multiple of U * W (every Qwen3 shape), has nothing after the loop: with tail
// loops after it the same loop reads slower (docs/performance.md).
template <typename T>
static inline float dot_blocks(const float* x, const T* w, int64_t K) {
  Vec acc[U<T>];
  for (int u = 0; u < U<T>; ++u) acc[u] = Vec(0.f);
  for (int64_t i = 0; i < K; i += U<T> * W)
    for (int u = 0; u < U<T>; ++u) acc[u] = at::vec::fmadd(load(w + i + u * W), Vec::loadu(x + i + u * W), acc[u]);
  for (int u = 1; u < U<T>; ++u) acc[0] = acc[0] + acc[u];
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[0]);
}

// Any K: whole blocks, then single registers, then single numbers.
template <typename T>
static inline float dot_any(const float* x, const T* w, int64_t K) {
  const int64_t blocks = K / (U<T> * W) * (U<T> * W);
  float sum = blocks ? dot_blocks(x, w, blocks) : 0.f;
  Vec acc(0.f);
  int64_t i = blocks;
  for (; i + W <= K; i += W) acc = at::vec::fmadd(load(w + i), Vec::loadu(x + i), acc);
  sum += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < K; ++i) sum += x[i] * float(w[i]);
  return sum;
}

#if defined(__AVX512BF16__)
// Where the CPU has them (AVX512-BF16: AMD Zen 4, Intel Cooper Lake and later), a bf16 row takes
// `vdpbf16ps`: 32 products of bf16 pairs summed into 16 fp32 sums in one instruction, x in bf16 as
// the model hands it, where the loop above converts every weight to fp32 first. K a multiple of
// 256 (512 bytes of the row a block).
constexpr int64_t PAIRS_STEP = 8 * 32;

// One block's 256 products in one register: 8 vdpbf16ps into fresh registers, then a tree of adds.
static inline __m512 bf16_pairs_block(const at::BFloat16* x, const at::BFloat16* w) {
  __m512 p[8];
  for (int u = 0; u < 8; ++u)
    p[u] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(w + u * 32),
                            (__m512bh)_mm512_loadu_si512(x + u * 32));
  for (int half = 4; half >= 1; half /= 2)
    for (int u = 0; u < half; ++u) p[u] = _mm512_add_ps(p[u], p[u + half]);
  return p[0];
}

// Not 8 running sums as in dot_blocks (each vdpbf16ps waiting for the one before it in its
// register): with those, rows longer than 1024 values (o_proj's, down_proj's) read less of the
// memory's speed than short rows; fresh registers each block and one running sum read long rows
// as fast as short ones (docs/performance.md). fp32 rows keep the running sums (there the extra
// adds cost more than the chains).
static inline float dot_bf16_pairs(const at::BFloat16* x, const at::BFloat16* w, int64_t K) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < K; i += PAIRS_STEP) sum = _mm512_add_ps(sum, bf16_pairs_block(x + i, w + i));
  return _mm512_reduce_add_ps(sum);
}
#endif

// Each thread takes a contiguous range of the weight's rows: one stream through memory, which the
// hardware prefetcher follows (rows taken 4 or 8 at a time, or prefetched by hand, read slower).
// The M rows of x reuse each weight row while it is in L1. A bare OpenMP region (torch's own
// thread pool) rather than at::parallel_for: a decode step makes ~200 calls of ~50-100 us, and
// at::parallel_for's bookkeeping plus a dispatched copy of x cost ~3% of the bytes read per step.
template <typename X, typename T>
static void gemv_rows(float (*dot)(const X*, const T*, int64_t), const X* x, int64_t M, const T* w,
                      int64_t N, int64_t K, T* out) {
  const int64_t threads = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), (N + 63) / 64);
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), per = (N + omp_get_num_threads() - 1) / omp_get_num_threads();
    for (int64_t n = t * per; n < std::min(N, (t + 1) * per); ++n)
      for (int64_t m = 0; m < M; ++m) out[m * N + n] = T(dot(x + m * K, w + n * K, K));
  }
}

// x's rows as X (fp32, or bf16 for the pairs above) on a 64-byte boundary (no SIMD load of x then
// straddles two cache lines): x itself where it already is, else a copy in a buffer this thread
// keeps from call to call.
template <typename X>
static const X* aligned_rows(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == c10::CppTypeToScalarType<X>::value && x.is_contiguous() &&
      reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 64 == 0)
    return x.const_data_ptr<X>();
  thread_local std::vector<X> buffer;
  buffer.resize(std::max<size_t>(buffer.size(), M * K + 64 / sizeof(X)));
  X* xa = reinterpret_cast<X*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
  const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
  for (int64_t m = 0; m < M; ++m) {
    if (x.scalar_type() == at::kFloat) at::vec::convert(rows.const_data_ptr<float>() + m * rows.stride(0), xa + m * K, K);
    else at::vec::convert(rows.const_data_ptr<at::BFloat16>() + m * rows.stride(0), xa + m * K, K);
  }
  return xa;
}

}  // namespace

// x (M, K) @ weight (N, K)^T -> (M, N), fp32 or bf16 (bf16: products summed in fp32, one rounding).
at::Tensor gemv(at::Tensor x, at::Tensor weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "gemv: x (M, K), weight (N, K)");
  TORCH_CHECK(weight.is_contiguous() && x.scalar_type() == weight.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), "gemv: fp32 or bf16, contiguous weight");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, weight.options());
  if (x.scalar_type() == at::kFloat) {
    gemv_rows(K % (U<float> * W) == 0 ? dot_blocks<float> : dot_any<float>, aligned_rows<float>(x), M,
              weight.const_data_ptr<float>(), N, K, out.data_ptr<float>());
    return out;
  }
  const at::BFloat16* w = weight.const_data_ptr<at::BFloat16>();
#if defined(__AVX512BF16__)
  if (K % PAIRS_STEP == 0) {
    gemv_rows(dot_bf16_pairs, aligned_rows<at::BFloat16>(x), M, w, N, K, out.data_ptr<at::BFloat16>());
    return out;
  }
#endif
  gemv_rows(K % (U<at::BFloat16> * W) == 0 ? dot_blocks<at::BFloat16> : dot_any<at::BFloat16>, aligned_rows<float>(x),
            M, w, N, K, out.data_ptr<at::BFloat16>());
  return out;
}
