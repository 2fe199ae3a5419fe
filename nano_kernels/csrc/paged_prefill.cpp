// Flash attention for bf16 prompt chunks on a CPU that multiplies bf16 pairs itself (AVX512-BF16:
// AMD Zen 4, Intel Cooper Lake and later). The idea is the decode kernel's (scores, online softmax,
// p.v, one tile of keys at a time), now for a tile of queries as well, so every key and value
// loaded serves many rows:
//
//   for each KV head and each block of 32 query positions (x its g query heads):
//     for each block of 64 keys up to the block's last position:
//       S = Q K^T        (rows, 64) fp32, `vdpbf16ps`: 16 keys' scores per instruction
//       online softmax   running max m and sum l per row; keys after a row's position masked
//       O = O * rescale + P V      P rounded to bf16 (as torch's flash kernel does), O in fp32
//     out = O / l
//
// `vdpbf16ps` multiplies bf16 PAIRS and adds both products into one fp32 lane, so the operands
// are repacked once per call so that pairs lie side by side: K as (keys/16, d/2, 16 keys x a pair
// of dims) and V as (keys/2, d, a pair of keys). Scores stay fp32 until the softmax (a bmm in bf16
// would round them to bf16 first). Row i of q sits at position n - m + i, so a chunk after a cached
// prefix (m < n) is the same loop. On other CPUs this file compiles to nothing and prompts take
// SDPA (04_paged_attention.py), the path this kernel is tested against.

#if defined(__AVX512BF16__)
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <omp.h>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t KEYS = 64;      // keys per tile: 4 registers of 16 scores
constexpr int64_t QPOS = 32;      // query positions per work item (fewer for a shorter chunk)
constexpr int ROWS = 4;           // query rows per register tile: 4 x 4 fp32 sums in registers
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// K of one KV head, n keys padded with zeros to n_pad: for each 16 keys, d/2 registers, lane j of
// register p holding (k[j][2p], k[j][2p+1]) as one 32-bit word.
static void pack_keys(const at::BFloat16* k, int64_t stride, int64_t n, int64_t n_pad, int64_t d, uint32_t* out) {
  for (int64_t j = 0; j < n_pad; ++j) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(k + j * stride);
    uint32_t* to = out + j / 16 * (d / 2) * 16 + j % 16;
    for (int64_t p = 0; p < d / 2; ++p) to[p * 16] = j < n ? row[p] : 0u;
  }
}

// V of one KV head: for each pair of keys t, d words (v[2t][c], v[2t+1][c]); two rows interleaved
// 16 bf16 at a time.
static void pack_values(const at::BFloat16* v, int64_t stride, int64_t n, int64_t n_pad, int64_t d, at::BFloat16* out) {
  alignas(64) static const uint16_t low[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t high[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(low), hi = _mm512_load_si512(high), zero = _mm512_setzero_si512();
  for (int64_t t = 0; t < n_pad / 2; ++t)
    for (int64_t c = 0; c < d; c += 32) {
      const __m512i a = 2 * t < n ? _mm512_loadu_si512(v + 2 * t * stride + c) : zero;
      const __m512i b = 2 * t + 1 < n ? _mm512_loadu_si512(v + (2 * t + 1) * stride + c) : zero;
      _mm512_storeu_si512(out + (t * d + c) * 2, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(out + (t * d + c + 16) * 2, _mm512_permutex2var_epi16(a, hi, b));
    }
}

// S[r][0:64] = q_r . k_j for ROWS rows and one tile of keys: per pair of dims, 4 loads of keys, one
// broadcast of each row's pair, 16 vdpbf16ps.
static inline void score_tile(const uint32_t* q, const uint32_t* keys, int64_t d, float* S) {
  __m512 acc[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < d / 2; ++p) {
    __m512i k[4];
    for (int c = 0; c < 4; ++c) k[c] = _mm512_loadu_si512(keys + (c * d / 2 + p) * 16);
    for (int r = 0; r < ROWS; ++r) {
      const __m512i qp = _mm512_set1_epi32(q[r * d / 2 + p]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)qp, (__m512bh)k[c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(S + r * KEYS + c * 16, acc[r][c]);
}

// O[r][dims] += sum over the first `pairs` key pairs t of (p[r][2t] v[2t] + p[r][2t+1] v[2t+1]),
// 64 dims at a time (4 registers per row).
static inline void add_values_tile(const at::BFloat16* P, const at::BFloat16* values, int64_t pairs, int64_t d, float* O) {
  for (int64_t dc = 0; dc < d; dc += 64) {
    __m512 acc[ROWS][4];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(O + r * d + dc + c * 16);
    for (int64_t t = 0; t < pairs; ++t) {
      __m512i v[4];
      for (int c = 0; c < 4; ++c) v[c] = _mm512_loadu_si512(values + (t * d + dc + c * 16) * 2);
      for (int r = 0; r < ROWS; ++r) {
        const __m512i pp = _mm512_set1_epi32(reinterpret_cast<const uint32_t*>(P + r * KEYS)[t]);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)pp, (__m512bh)v[c]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(O + r * d + dc + c * 16, acc[r][c]);
  }
}

// The online softmax of one row over one tile of scores: the first `valid` count, the rest are
// masked. Writes p = exp(s - m_new) as bf16, rescales the row's O and l to the new max.
static inline void softmax_row(float* s, int64_t valid, float scale, float& m, float& l, float* O, int64_t d,
                               at::BFloat16* p) {
  if (valid <= 0) {                                     // every key of the tile is after this row
    std::memset(p, 0, KEYS * sizeof(at::BFloat16));
    return;
  }
  Vec top(NEG_INF);
  for (int64_t j = 0; j < KEYS; j += 16) {
    Vec x = Vec::loadu(s + j) * Vec(scale);
    if (j + 16 > valid) {                               // lanes past `valid` get -inf, exp(-inf) = 0
      const __mmask16 keep = valid > j ? __mmask16((1u << std::min<int64_t>(16, valid - j)) - 1) : 0;
      x = _mm512_mask_blend_ps(keep, _mm512_set1_ps(NEG_INF), x);
    }
    x.store(s + j);
    top = at::vec::maximum(top, x);
  }
  const float m_new = std::max(m, at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, top));
  const float rescale = std::exp(m - m_new);            // 0 for the first tile (m = -inf)
  Vec sum(0.f);
  for (int64_t j = 0; j < KEYS; j += 16) {
    const Vec e = (Vec::loadu(s + j) - Vec(m_new)).exp_u20();
    sum = sum + e;
    e.store(s + j);
  }
  at::vec::convert(s, p, KEYS);
  l = l * rescale + at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
  if (rescale != 1.f)
    for (int64_t c = 0; c < d; c += 16) (Vec::loadu(O + c) * Vec(rescale)).store(O + c);
  m = m_new;
}

}  // namespace

// q (m, H, d), k and v (n, n_kv, d), bf16, each row's d values contiguous; n >= m, query row i at
// position n - m + i sees keys 0 .. n - m + i. Returns (m, H, d).
at::Tensor causal_attention(at::Tensor q, at::Tensor k, at::Tensor v) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.scalar_type() == at::kBFloat16 &&
              k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 && q.is_cpu() && k.is_cpu() &&
              v.is_cpu(), "causal_attention: bf16 q (m, H, d), k/v (n, n_kv, d) on the CPU");
  const int64_t m = q.size(0), H = q.size(1), d = q.size(2), n = k.size(0), n_kv = k.size(1);
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && k.size(2) == d && d % 64 == 0 &&
              H % n_kv == 0 && 1 <= m && m <= n, "causal_attention: unsupported shapes or strides");
  // A work item's positions: QPOS, or a short chunk's m rounded up to whole register tiles.
  const int64_t span = std::min(QPOS, (m + ROWS - 1) / ROWS * ROWS);
  const int64_t g = H / n_kv, n_pad = (n + KEYS - 1) / KEYS * KEYS, first = n - m, rows = g * span;
  const float scale = 1.f / std::sqrt(float(d));
  at::Tensor out = at::empty({m, H, d}, q.options());
  std::vector<uint32_t> kp(n_kv * n_pad * d / 2);
  std::vector<at::BFloat16> vp(n_kv * n_pad * d);
  const at::BFloat16 *qd = q.const_data_ptr<at::BFloat16>(), *kd = k.const_data_ptr<at::BFloat16>(),
                     *vd = v.const_data_ptr<at::BFloat16>();
  at::BFloat16* od = out.data_ptr<at::BFloat16>();
  const int64_t blocks = (m + span - 1) / span, items = n_kv * blocks;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static, 1)
    for (int64_t h = 0; h < n_kv; ++h) {
      pack_keys(kd + h * k.stride(1), k.stride(0), n, n_pad, d, kp.data() + h * n_pad * d / 2);
      pack_values(vd + h * v.stride(1), v.stride(0), n, n_pad, d, vp.data() + h * n_pad * d);
    }
    std::vector<uint32_t> Q(rows * d / 2);             // this item's rows: head by head, position by position
    std::vector<float> S(rows * KEYS), O(rows * d), row_max(rows), row_sum(rows);
    std::vector<at::BFloat16> P(rows * KEYS);
    std::vector<int64_t> pos(rows);
    // Causal work grows with the position: the last blocks first, handed out one at a time.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t h = item % n_kv, i0 = (blocks - 1 - item / n_kv) * span, count = std::min(span, m - i0);
      for (int64_t a = 0; a < g; ++a)
        for (int64_t i = 0; i < span; ++i) {              // past `count`: the last row again, never written out
          const int64_t r = a * span + i, row = i0 + std::min(i, count - 1);
          pos[r] = first + row;
          std::memcpy(Q.data() + r * d / 2, qd + row * q.stride(0) + (h * g + a) * q.stride(1), d * sizeof(at::BFloat16));
        }
      std::fill(O.begin(), O.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), NEG_INF);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      const uint32_t* K = kp.data() + h * n_pad * d / 2;
      const at::BFloat16* V = vp.data() + h * n_pad * d;
      for (int64_t k0 = 0; k0 <= first + i0 + count - 1; k0 += KEYS) {
        // A tile's rows are consecutive positions of one head: its last row sees the most.
        for (int64_t r = 0; r < rows; r += ROWS)
          if (k0 <= pos[r + ROWS - 1]) score_tile(Q.data() + r * d / 2, K + k0 * d / 2, d, S.data() + r * KEYS);
        for (int64_t r = 0; r < rows; ++r)
          softmax_row(S.data() + r * KEYS, std::min(KEYS, pos[r] - k0 + 1), scale, row_max[r], row_sum[r],
                      O.data() + r * d, d, P.data() + r * KEYS);
        for (int64_t r = 0; r < rows; r += ROWS) {
          const int64_t seen = std::min(KEYS, pos[r + ROWS - 1] - k0 + 1);
          if (seen > 0) add_values_tile(P.data() + r * KEYS, V + k0 * d, (seen + 1) / 2, d, O.data() + r * d);
        }
      }
      for (int64_t a = 0; a < g; ++a)
        for (int64_t i = 0; i < count; ++i) {             // out = O / l
          float* o = O.data() + (a * span + i) * d;
          for (int64_t c = 0; c < d; c += 16) (Vec::loadu(o + c) / Vec(row_sum[a * span + i])).store(o + c);
          at::vec::convert(o, od + ((i0 + i) * H + h * g + a) * d, d);
        }
    }
  }
  return out;
}
#endif  // __AVX512BF16__
