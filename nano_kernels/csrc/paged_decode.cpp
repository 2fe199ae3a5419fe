// Paged attention for decode rows on a CPU: attention that follows the block table itself,
// reading each block where it lies in the pool, so no sequence's keys are ever copied together.
// vLLM's CUDA and CPU kernels, FlashAttention and FlashInfer all work this way; torch ships none
// for the CPU, so here is one, written against ATen (the C++ library under torch).
//
// Per (sequence, KV head), the g query heads that share that KV head: for each block in the
// table, scores s = q.k for its tokens in use, then the online softmax (the running max m and sum
// l rescale what came before), then acc += p.v; out = acc / l. One work item reads its blocks'
// keys and values once, in fp32 arithmetic whatever the cache's dtype, and nothing else.
// The reference it is tested against: 04_paged_attention.py's gather + SDPA, and
// decode_attention_reference (a plain softmax).

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <cfloat>
#include <cstring>
#include <numeric>

#include "ops.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();         // floats in one SIMD register: 16 with AVX-512, 8 with AVX2
constexpr int64_t MAX_D = 256, MAX_BLOCK = 64;

static inline Vec load(const float* p) { return Vec::loadu(p); }
static inline Vec load(const at::BFloat16* p) { Vec v; at::vec::load_to_float(p, v); return v; }

// One sequence, one KV head and its G query heads, over the blocks of one block table.
template <typename T, int G>
static void attend_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                       int64_t context_len, int64_t n_kv, int64_t bs, int64_t d, int64_t head, T* out) {
  alignas(64) float qs[G][MAX_D], acc[G][MAX_D], p[G][MAX_BLOCK];
  float m[G], l[G];
  const Vec scale(1.0f / std::sqrt(float(d)));
  for (int a = 0; a < G; ++a) {
    for (int64_t i = 0; i < d; i += W) (load(q + a * d + i) * scale).store(qs[a] + i);
    std::fill(acc[a], acc[a] + d, 0.f);
    m[a] = -FLT_MAX;
    l[a] = 0.f;
  }
  for (int64_t j = 0; j * bs < context_len; ++j) {
    const int64_t n = std::min(bs, context_len - j * bs);           // tokens of block j in use
    const T* kb = k_cache + (table[j] * n_kv + head) * bs * d;       // (bs, d): this head's run
    const T* vb = v_cache + (table[j] * n_kv + head) * bs * d;
    // Ask for the next block's runs while this one is computed, a row of each per token, so the
    // reads overlap the arithmetic (the blocks lie anywhere in the pool: no hardware prefetcher
    // guesses the next one).
    const bool ahead = (j + 1) * bs < context_len;
    const char* k_next = ahead ? reinterpret_cast<const char*>(k_cache + (table[j + 1] * n_kv + head) * bs * d) : nullptr;
    const char* v_next = ahead ? reinterpret_cast<const char*>(v_cache + (table[j + 1] * n_kv + head) * bs * d) : nullptr;
    const int64_t row_bytes = d * int64_t(sizeof(T));
    for (int64_t t = 0; t < n; ++t) {                                // p[a][t] = q_a . k_t (scaled)
      for (int64_t off = t * row_bytes; ahead && off < (t + 1) * row_bytes; off += 64) {
        __builtin_prefetch(k_next + off, 0, 2);                      // (read, keep in L2)
        __builtin_prefetch(v_next + off, 0, 2);
      }
      Vec s[G];
      for (int a = 0; a < G; ++a) s[a] = Vec(0.f);
      for (int64_t i = 0; i < d; i += W) {
        const Vec k = load(kb + t * d + i);
        for (int a = 0; a < G; ++a) s[a] = at::vec::fmadd(Vec::loadu(qs[a] + i), k, s[a]);
      }
      for (int a = 0; a < G; ++a)
        p[a][t] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s[a]);
    }
    for (int a = 0; a < G; ++a) {
      const float m_new = std::max(m[a], *std::max_element(p[a], p[a] + n));
      const float rescale = std::exp(m[a] - m_new);                  // what came before, re-based
      for (int64_t t = 0; t < n; t += W) {
        const int64_t c = std::min(W, n - t);
        (Vec::loadu(p[a] + t, c) - Vec(m_new)).exp_u20().store(p[a] + t, c);
      }
      l[a] = l[a] * rescale + std::accumulate(p[a], p[a] + n, 0.f);
      m[a] = m_new;
      for (int64_t i = 0; i < d; i += W) {                           // acc = acc * rescale + p . v
        Vec o = Vec::loadu(acc[a] + i) * Vec(rescale);
        for (int64_t t = 0; t < n; ++t) o = at::vec::fmadd(Vec(p[a][t]), load(vb + t * d + i), o);
        o.store(acc[a] + i);
      }
    }
  }
  for (int a = 0; a < G; ++a)
    for (int64_t i = 0; i < d; ++i) out[a * d + i] = T(acc[a][i] / l[a]);
}

template <typename T>
static void attend_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& context_lens, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), n_kv = k_cache.size(1), bs = k_cache.size(2);
  const int64_t g = H / n_kv, width = block_tables.size(1);
  const T *qp = q.const_data_ptr<T>(), *kp = k_cache.const_data_ptr<T>(), *vp = v_cache.const_data_ptr<T>();
  const int64_t *tables = block_tables.const_data_ptr<int64_t>(), *lens = context_lens.const_data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  auto one = g == 1 ? attend_one<T, 1> : g == 2 ? attend_one<T, 2> : g == 4 ? attend_one<T, 4> : attend_one<T, 8>;
  // Work items head-major (all sequences of head 0, then head 1, ...): each thread's share of
  // them covers every sequence, long and short alike.
  at::parallel_for(0, n_kv * B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t h = w / B, b = w % B, first = (b * H + h * g) * d;
      one(qp + first, kp, vp, tables + b * width, lens[b], n_kv, bs, d, h, op + first);
    }
  });
}

}  // namespace

// q (B, H, d); caches (num_blocks, n_kv, block_size, d); block_tables (B, width) and
// context_lens (B,) int64. Returns (B, H, d). Every index is checked before any is read.
at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                        at::Tensor context_lens) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && block_tables.dim() == 2, "paged_decode: bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              block_tables.is_contiguous() && context_lens.is_contiguous(), "paged_decode: tensors must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.sizes() == k_cache.sizes() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16), "paged_decode: fp32 or bf16 q/k/v");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "paged_decode: int64 tables");
  const int64_t B = q.size(0), H = q.size(1), d = q.size(2), n_kv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && d % W == 0 && d <= MAX_D && bs <= MAX_BLOCK && H % n_kv == 0 &&
              (H / n_kv == 1 || H / n_kv == 2 || H / n_kv == 4 || H / n_kv == 8), "paged_decode: unsupported shapes");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "paged_decode: one table and length per row");
  const int64_t *tables = block_tables.const_data_ptr<int64_t>(), *lens = context_lens.const_data_ptr<int64_t>();
  const int64_t width = block_tables.size(1), num_blocks = k_cache.size(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t used = (lens[b] + bs - 1) / bs;
    TORCH_CHECK(lens[b] >= 1 && used <= width, "paged_decode: context_len out of range");
    for (const int64_t* id = tables + b * width; id < tables + b * width + used; ++id)
      TORCH_CHECK(*id >= 0 && *id < num_blocks, "paged_decode: block id out of range");
  }
  at::Tensor out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) attend_all<float>(q, k_cache, v_cache, block_tables, context_lens, out);
  else attend_all<at::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, out);
  return out;
}

// One layer's attention in a CPU decode step (eager, or called by compiled code): the step's k/v
// copied into their slots (what 04's store_kvcache does), then paged_decode above over the real rows. Padding rows (context_len 0) come last and give zeros.
// kv_cache is written, a side effect the compiler is not told of and need not be: nothing else in
// the graph reads the pool. Every slot is checked before any is written.
at::Tensor paged_decode_step(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor kv_cache, int64_t layer,
                             at::Tensor slot_mapping, at::Tensor block_tables, at::Tensor context_lens) {
  TORCH_CHECK(kv_cache.dim() == 6 && q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && kv_cache.is_contiguous(),
              "paged_decode_step: q (B, H, d), k/v (B, n_kv, d), a contiguous kv_cache (layers, 2, blocks, n_kv, block_size, d)");
  TORCH_CHECK(k.scalar_type() == kv_cache.scalar_type() && v.scalar_type() == kv_cache.scalar_type() &&
              slot_mapping.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
              slot_mapping.is_contiguous() && context_lens.is_contiguous(), "paged_decode_step: dtypes");
  TORCH_CHECK(layer >= 0 && layer < kv_cache.size(0), "paged_decode_step: layer out of range");
  const at::Tensor k_cache = kv_cache.select(0, layer).select(0, 0), v_cache = kv_cache.select(0, layer).select(0, 1);
  const int64_t B = q.size(0), num_blocks = k_cache.size(0), n_kv = k_cache.size(1), bs = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == n_kv && k.size(2) == d && slot_mapping.size(0) == B &&
              context_lens.size(0) == B && block_tables.size(0) == B, "paged_decode_step: one slot, length, table per row");
  const int64_t *slots = slot_mapping.const_data_ptr<int64_t>(), *lens = context_lens.const_data_ptr<int64_t>();
  int64_t n = 0;                                                     // the real rows
  while (n < B && lens[n] > 0) ++n;
  const at::Tensor kc = k.contiguous(), vc = v.contiguous();
  const int64_t row = d * kv_cache.element_size();                    // bytes of one head's vector
  const char *ks = static_cast<const char*>(kc.const_data_ptr()), *vs = static_cast<const char*>(vc.const_data_ptr());
  char *kd = static_cast<char*>(k_cache.data_ptr()), *vd = static_cast<char*>(v_cache.data_ptr());
  for (int64_t b = 0; b < n; ++b)
    TORCH_CHECK(slots[b] >= 0 && slots[b] < num_blocks * bs, "paged_decode_step: slot out of range");
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t h = 0; h < n_kv; ++h) {                             // slot s of head h: block s / bs, offset s % bs
      const int64_t to = ((slots[b] / bs * n_kv + h) * bs + slots[b] % bs) * row, from = (b * n_kv + h) * row;
      std::memcpy(kd + to, ks + from, row);
      std::memcpy(vd + to, vs + from, row);
    }
  }
  if (n == B) return paged_decode(q.contiguous(), k_cache, v_cache, block_tables.contiguous(), context_lens);
  at::Tensor out = at::zeros_like(q, at::MemoryFormat::Contiguous);
  if (n > 0)
    out.narrow(0, 0, n).copy_(paged_decode(q.narrow(0, 0, n).contiguous(), k_cache, v_cache,
                                           block_tables.narrow(0, 0, n).contiguous(), context_lens.narrow(0, 0, n)));
  return out;
}
