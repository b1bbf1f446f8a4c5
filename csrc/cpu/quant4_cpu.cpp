// CPU kernels of the blockwise 4-bit format (declarations and contracts in quant4_cpu.h).
//
// Bit-exactness with fastlora.quant's PyTorch path rests on doing the same IEEE fp32 operations
// in the same order, each rounded on its own: this file is compiled with -ffp-contract=off (no
// FMA contraction) and without -ffast-math. Parallel loops split work by whole quantisation
// blocks or output rows, so results do not depend on the thread count.
#include "quant4_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// AVX2 code paths (x86-64 with GCC/Clang), chosen at run time: the package is built for the
// baseline ISA and runs anywhere. They produce bit-identical results to the portable loops.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLORA_AVX2 1
#include <immintrin.h>
#endif

namespace fastlora {
namespace cpu {
namespace {

// Below this many values a kernel runs on one thread: waking a team costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;
// Values per parallel work item of the dequantiser (rounded up to whole blocks).
constexpr int64_t kDequantChunk = 1 << 14;

template <DType D>
struct Elem;
template <>
struct Elem<DType::f32> {
  using raw = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
template <>
struct Elem<DType::f16> {
  using raw = uint16_t;
  static float load(uint16_t v) { return f16_to_f32(v); }
  static uint16_t store(float v) { return f32_to_f16(v); }
};
template <>
struct Elem<DType::bf16> {
  using raw = uint16_t;
  static float load(uint16_t v) { return bf16_to_f32(v); }
  static uint16_t store(float v) { return f32_to_bf16(v); }
};

// Calls f(Elem<D>{}) for the runtime dtype d.
template <typename F>
void dispatch(DType d, F&& f) {
  switch (d) {
    case DType::f32:
      f(Elem<DType::f32>{});
      break;
    case DType::f16:
      f(Elem<DType::f16>{});
      break;
    case DType::bf16:
      f(Elem<DType::bf16>{});
      break;
  }
}

int team(int threads, int64_t work) { return work >= kParallelMin ? std::max(threads, 1) : 1; }

// The AVX2 loops run when the CPU has AVX2 (FASTLORA_NO_AVX2=1 forces the portable ones).
bool use_avx2() {
#ifdef FASTLORA_AVX2
  static const bool yes = __builtin_cpu_supports("avx2") && !std::getenv("FASTLORA_NO_AVX2");
  return yes;
#else
  return false;
#endif
}

// rank[i] = number of midpoints strictly below s[i] (bucketize, ties to the lower code). Loop
// order j-outer so the compare-and-count vectorises; integer results, identical on every path.
#define FASTLORA_DEFINE_RANK(NAME, ATTRIBUTE)                                       \
  ATTRIBUTE void NAME(const float* s, int len, const float* mid, int32_t* rank) {  \
    for (int i = 0; i < len; ++i) rank[i] = 0;                                     \
    for (int j = 0; j < 15; ++j) {                                                 \
      const float m = mid[j];                                                      \
      for (int i = 0; i < len; ++i) rank[i] += s[i] > m ? 1 : 0;                   \
    }                                                                              \
  }
FASTLORA_DEFINE_RANK(rank_portable, )
#ifdef FASTLORA_AVX2
FASTLORA_DEFINE_RANK(rank_avx2, __attribute__((target("avx2"))))
#endif
#undef FASTLORA_DEFINE_RANK

void rank_codes(const float* s, int len, const float* mid, int32_t* rank) {
#ifdef FASTLORA_AVX2
  if (use_avx2()) return rank_avx2(s, len, mid, rank);
#endif
  rank_portable(s, len, mid, rank);
}

// ---------------------------------------------------------------------------------------------
// Quantisation

template <typename E>
void quantize_4bit_impl(const typename E::raw* w, int64_t n, int bs, const float* midpoints, const int32_t* order,
                        uint8_t* packed, float* absmax, int threads) {
  float mid[15];
  int32_t ord[16];
  std::copy(midpoints, midpoints + 15, mid);
  std::copy(order, order + 16, ord);
  int pad_rank = 0;  // an odd count is padded with the index of 0.0
  for (int j = 0; j < 15; ++j) pad_rank += mid[j] < 0.0f;
  const uint8_t pad = static_cast<uint8_t>(ord[pad_rank]);
  // torch clamps with the Python float 1e-38 converted to fp32.
  const float tiny = static_cast<float>(1e-38);
  const int64_t nblocks = (n + bs - 1) / bs;

#pragma omp parallel for schedule(static) num_threads(team(threads, n))
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * bs;
    const int len = static_cast<int>(std::min<int64_t>(bs, n - start));
    float v[4096];
    int32_t rank[4096];
    uint8_t idx[4096];
    float amax = 0.0f;
    for (int i = 0; i < len; ++i) {
      v[i] = E::load(w[start + i]);
      const float a = std::fabs(v[i]);
      amax = (a > amax || a != a) ? a : amax;  // max, but a NaN sticks (the caller checks absmax)
    }
    const float clamped = std::max(amax, tiny);
    if (len == bs) {  // a full block multiplies by the reciprocal, the partial last one divides
      const float recip = 1.0f / clamped;
      for (int i = 0; i < len; ++i) v[i] = v[i] * recip;
    } else {
      for (int i = 0; i < len; ++i) v[i] = v[i] / clamped;
    }
    for (int i = 0; i < len; ++i) v[i] = std::min(std::max(v[i], -1.0f), 1.0f);
    rank_codes(v, len, mid, rank);
    for (int i = 0; i < len; ++i) idx[i] = static_cast<uint8_t>(ord[rank[i]]);
    uint8_t* dst = packed + start / 2;  // start is even: blocksizes are even
    const int pairs = len / 2;
    for (int i = 0; i < pairs; ++i) dst[i] = static_cast<uint8_t>((idx[2 * i] << 4) | idx[2 * i + 1]);
    if (len & 1) dst[pairs] = static_cast<uint8_t>((idx[len - 1] << 4) | pad);
    absmax[b] = amax;
  }
}

}  // namespace

void quantize_4bit(const void* w, DType dtype, int64_t n, int blocksize, const float* midpoints, const int32_t* order,
                   uint8_t* packed, float* absmax, int threads) {
  dispatch(dtype, [&](auto e) {
    using E = decltype(e);
    quantize_4bit_impl<E>(static_cast<const typename E::raw*>(w), n, blocksize, midpoints, order, packed, absmax,
                          threads);
  });
}

void quantize_blockwise_8bit(const float* x, int64_t n, int blocksize, const uint8_t* lut, uint8_t* q, float* absmax,
                             int threads) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static) num_threads(team(threads, n))
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t len = std::min<int64_t>(blocksize, n - start);
    float amax = 0.0f;
    for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[start + i]));
    const float inv = amax == 0.0f ? 0.0f : 1.0f / amax;
    for (int64_t i = 0; i < len; ++i) {
      const float s = std::min(std::max(x[start + i] * inv, -1.0f), 1.0f);
      const float grid = ((s + 1.0f) * 0.5f) * 65535.0f + 0.5f;  // fp32 steps, truncated: bitsandbytes' CPU path
      q[start + i] = amax == 0.0f ? 0 : lut[static_cast<int64_t>(grid)];
    }
    absmax[b] = amax;
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantisation

namespace {

// out[2i] = table[p[i] >> 4], out[2i + 1] = table[p[i] & 15] for i < pairs: the portable loop.
template <typename Raw>
void lookup_pairs(const uint8_t* p, int64_t pairs, const Raw* table, Raw* out) {
  for (int64_t i = 0; i < pairs; ++i) {
    const uint8_t byte = p[i];
    out[2 * i] = table[byte >> 4];
    out[2 * i + 1] = table[byte & 0xF];
  }
}

#ifdef FASTLORA_AVX2
// 16 packed bytes -> the 32 nibble indices in element order (each byte's high nibble first),
// elements 0-15 in the low 128 bits and 16-31 in the high 128 bits.
__attribute__((target("avx2"))) inline __m256i nibble_indices(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask), lo = _mm_and_si128(v, mask);
  return _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
}

// 16-bit outputs: the table's low and high bytes as two 16-byte shuffle tables (pshufb).
__attribute__((target("avx2"))) void lookup_pairs_avx2(const uint8_t* p, int64_t pairs, const uint16_t* table,
                                                      uint16_t* out) {
  const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i t0 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)), order);
  const __m128i t1 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table + 8)), order);
  const __m256i lo = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(t0, t1));
  const __m256i hi = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(t0, t1));
  int64_t i = 0;
  for (; i + 16 <= pairs; i += 16) {
    const __m256i idx = nibble_indices(p + i);
    const __m256i bl = _mm256_shuffle_epi8(lo, idx), bh = _mm256_shuffle_epi8(hi, idx);
    const __m256i w0 = _mm256_unpacklo_epi8(bl, bh), w1 = _mm256_unpackhi_epi8(bl, bh);  // e0-7|e16-23, e8-15|e24-31
    __m256i* dst = reinterpret_cast<__m256i*>(out + 2 * i);
    _mm256_storeu_si256(dst, _mm256_permute2x128_si256(w0, w1, 0x20));
    _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(w0, w1, 0x31));
  }
  lookup_pairs(p + i, pairs - i, table, out + 2 * i);
}

// fp32 outputs: two 8-entry permutes, picked by bit 3 of the index.
__attribute__((target("avx2"))) void lookup_pairs_avx2(const uint8_t* p, int64_t pairs, const float* table,
                                                      float* out) {
  const __m256 t_lo = _mm256_loadu_ps(table), t_hi = _mm256_loadu_ps(table + 8);
  int64_t i = 0;
  for (; i + 16 <= pairs; i += 16) {
    const __m256i idx = nibble_indices(p + i);
    const __m128i parts[2] = {_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1)};
    for (int h = 0; h < 2; ++h) {
      for (int q = 0; q < 2; ++q) {
        const __m256i i32 = _mm256_cvtepu8_epi32(q == 0 ? parts[h] : _mm_srli_si128(parts[h], 8));
        const __m256 lo = _mm256_permutevar8x32_ps(t_lo, i32), hi = _mm256_permutevar8x32_ps(t_hi, i32);
        const __m256 pick = _mm256_castsi256_ps(_mm256_slli_epi32(i32, 28));  // bit 3 -> the sign bit
        _mm256_storeu_ps(out + 2 * i + 16 * h + 8 * q, _mm256_blendv_ps(lo, hi, pick));
      }
    }
  }
  lookup_pairs(p + i, pairs - i, table, out + 2 * i);
}
#endif

template <typename Raw>
void lookup_pairs_fast(const uint8_t* p, int64_t pairs, const Raw* table, Raw* out) {
#ifdef FASTLORA_AVX2
  if (pairs >= 16 && use_avx2()) {
    lookup_pairs_avx2(p, pairs, table, out);
    return;
  }
#endif
  lookup_pairs(p, pairs, table, out);
}

// Dequantise flat elements [start, start + count) into out (count values of E). Each block's 16
// scaled codes are computed (and rounded to E) once; the same fp32 product code[j] * absmax as
// the reference, so the result is bit-identical. Rows may start mid-byte and mid-block.
template <typename E>
void dequant_range(const uint8_t* packed, const AbsmaxRef& am, const float* code, int bs, int64_t start, int64_t count,
                   typename E::raw* out) {
  int64_t e = start;
  const int64_t end = start + count;
  while (e < end) {
    const int64_t block = e / bs;
    const int64_t block_end = std::min(end, (block + 1) * bs);
    const float a = am(block);
    typename E::raw sc[16];
    for (int j = 0; j < 16; ++j) sc[j] = E::store(code[j] * a);
    if (e & 1) {
      *out++ = sc[packed[e >> 1] & 0xF];
      ++e;
    }
    const int64_t pairs = (block_end - e) / 2;
    lookup_pairs_fast(packed + (e >> 1), pairs, sc, out);
    e += 2 * pairs;
    out += 2 * pairs;
    if (e < block_end) {
      *out++ = sc[packed[e >> 1] >> 4];
      ++e;
    }
  }
}

template <typename E>
void dequantize_impl(const uint8_t* packed, const AbsmaxRef& am, const float* code, int bs, int64_t n,
                     typename E::raw* out, int threads) {
  const int64_t chunk = std::max<int64_t>(kDequantChunk / bs, 1) * bs;
  const int64_t nchunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(team(threads, n))
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t start = c * chunk;
    dequant_range<E>(packed, am, code, bs, start, std::min(chunk, n - start), out + start);
  }
}

// Sum of a[k] * b[k] in fp32 over 16 interleaved partial sums, added in a fixed order: the
// portable loop vectorises without reassociation flags, and the AVX2 loop (two 8-wide
// accumulators, multiply then add) computes exactly the same partial sums.
float dot_portable(const float* a, const float* b, int64_t K, int64_t k, float (&part)[16]) {
  for (; k + 16 <= K; k += 16)
    for (int i = 0; i < 16; ++i) part[i] += a[k + i] * b[k + i];
  for (int i = 0; k < K; ++k, ++i) part[i] += a[k] * b[k];
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += part[i];
  return s;
}

#ifdef FASTLORA_AVX2
__attribute__((target("avx2"))) float dot_avx2(const float* a, const float* b, int64_t K) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    s0 = _mm256_add_ps(s0, _mm256_mul_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k)));
    s1 = _mm256_add_ps(s1, _mm256_mul_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8)));
  }
  float part[16];
  _mm256_storeu_ps(part, s0);
  _mm256_storeu_ps(part + 8, s1);
  return dot_portable(a, b, K, k, part);
}
#endif

inline float dot(const float* a, const float* b, int64_t K) {
#ifdef FASTLORA_AVX2
  if (use_avx2()) return dot_avx2(a, b, K);
#endif
  float part[16] = {};
  return dot_portable(a, b, K, 0, part);
}

#ifdef FASTLORA_AVX2
// out[i] = dot(x + i * ldx, w, K) for 4 rows of x at once: each w vector is loaded once for 4
// rows (the GEMV is load-bound otherwise). Same partial sums as dot(), so the same bits.
__attribute__((target("avx2"))) void dot4_avx2(const float* x, int64_t ldx, const float* w, int64_t K, float* out) {
  __m256 acc[4][2];
  for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
    for (int i = 0; i < 4; ++i) {
      acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_mul_ps(_mm256_loadu_ps(x + i * ldx + k), w0));
      acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_mul_ps(_mm256_loadu_ps(x + i * ldx + k + 8), w1));
    }
  }
  for (int i = 0; i < 4; ++i) {
    float part[16];
    _mm256_storeu_ps(part, acc[i][0]);
    _mm256_storeu_ps(part + 8, acc[i][1]);
    out[i] = dot_portable(x + i * ldx, w, K, k, part);
  }
}
#endif

// out[m] = dot(x + m * ldx, w, K) for m < M.
void dot_rows(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K, float* out) {
  int64_t m = 0;
#ifdef FASTLORA_AVX2
  if (use_avx2())
    for (; m + 4 <= M; m += 4) dot4_avx2(x + m * ldx, ldx, w, K, out + m);
#endif
  for (; m < M; ++m) out[m] = dot(x + m * ldx, w, K);
}

template <typename E>
std::vector<float> to_f32(const void* src, int64_t rows, int64_t cols, int64_t ld) {
  const auto* p = static_cast<const typename E::raw*>(src);
  std::vector<float> out(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = E::load(p[i * ld + j]);
  return out;
}

template <typename E>
void gemv_impl(const GemvArgs& g, int threads) {
  using raw = typename E::raw;
  const int64_t M = g.M, N = g.N, K = g.K, r = g.r;
  const std::vector<float> x = to_f32<E>(g.x, M, K, g.ldx);
  // Row m's B (N, r): the one B, or its slot's B in the pool; nullptr: no LoRA term for the row.
  std::vector<const raw*> row_b(static_cast<size_t>(M), static_cast<const raw*>(g.lora_b));
  // su = scale · u (M, r), fp32: u = x Aᵀ computed here, or given; with a pool, each row's scale.
  std::vector<float> su;
  if (g.lora_b != nullptr) {
    su.assign(static_cast<size_t>(M * r), 0.0f);
    if (g.lora_idx != nullptr) {
      const auto* u = static_cast<const raw*>(g.lora_u);
      for (int64_t m = 0; m < M; ++m) {
        const int64_t i = g.lora_idx[m];
        if (i < 0 || i >= g.slots) {
          row_b[m] = nullptr;
          continue;
        }
        row_b[m] += i * N * r;
        for (int64_t j = 0; j < r; ++j) su[m * r + j] = g.lora_scales[i] * E::load(u[m * r + j]);
      }
    } else if (g.lora_a != nullptr) {
      const std::vector<float> a = to_f32<E>(g.lora_a, r, K, K);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < r; ++j) su[m * r + j] = g.scale * dot(&x[m * K], &a[j * K], K);
    } else {
      const auto* u = static_cast<const raw*>(g.lora_u);
      for (int64_t i = 0; i < M * r; ++i) su[i] = g.scale * E::load(u[i]);
    }
  }
  const auto* bias = static_cast<const raw*>(g.bias);
  auto* y = static_cast<raw*>(g.y);

  // K is walked in chunks so that the chunk of x (M rows, fp32) stays in L2 while every row of
  // this thread's share of W streams past it; each row's chunk is dequantised once.
  const int64_t kc = std::min<int64_t>(K, std::max<int64_t>(1024, (int64_t{1} << 16) / M));
#pragma omp parallel num_threads(team(threads, N * K))
  {
    int tid = 0, nt = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    const int64_t n0 = N * tid / nt, n1 = N * (tid + 1) / nt;
    std::vector<float> row(static_cast<size_t>(kc)), acc(static_cast<size_t>((n1 - n0) * M), 0.0f);
    std::vector<float> sums(static_cast<size_t>(M));
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t len = std::min(kc, K - k0);
      for (int64_t n = n0; n < n1; ++n) {
        dequant_range<Elem<DType::f32>>(g.packed, g.absmax, g.code, g.blocksize, n * K + k0, len, row.data());
        dot_rows(&x[k0], K, M, row.data(), len, sums.data());
        for (int64_t m = 0; m < M; ++m) acc[(n - n0) * M + m] += sums[m];
      }
    }
    for (int64_t n = n0; n < n1; ++n) {
      const float b = bias != nullptr ? E::load(bias[n]) : 0.0f;
      for (int64_t m = 0; m < M; ++m) {
        float v = acc[(n - n0) * M + m] + b;
        if (const raw* lora_b = row_b[m]; lora_b != nullptr) {
          float l = 0.0f;
          for (int64_t j = 0; j < r; ++j) l += su[m * r + j] * E::load(lora_b[n * r + j]);
          v += l;
        }
        y[m * N + n] = E::store(v);
      }
    }
  }
}

template <typename E, typename O>
void merge_impl(const MergeArgs& g, int threads) {
  const int64_t N = g.N, K = g.K, r = g.r;
  const std::vector<float> a = to_f32<E>(g.lora_a, r, K, K);
  const std::vector<float> b = to_f32<E>(g.lora_b, N, r, r);
  auto* out = static_cast<typename O::raw*>(g.out);
#pragma omp parallel num_threads(team(threads, N * K))
  {
    std::vector<float> row(static_cast<size_t>(K)), delta(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      dequant_range<Elem<DType::f32>>(g.packed, g.absmax, g.code, g.blocksize, n * K, K, row.data());
      std::fill(delta.begin(), delta.end(), 0.0f);
      for (int64_t j = 0; j < r; ++j) {
        const float bj = b[n * r + j];
        const float* aj = &a[j * K];
        for (int64_t k = 0; k < K; ++k) delta[k] += bj * aj[k];
      }
      for (int64_t k = 0; k < K; ++k) out[n * K + k] = O::store(row[k] + g.scale * delta[k]);
    }
  }
}

}  // namespace

void dequantize_4bit(const uint8_t* packed, const AbsmaxRef& absmax, const float* code, int blocksize, int64_t n,
                     void* out, DType out_dtype, int threads) {
  dispatch(out_dtype, [&](auto e) {
    using E = decltype(e);
    dequantize_impl<E>(packed, absmax, code, blocksize, n, static_cast<typename E::raw*>(out), threads);
  });
}

void gemv_4bit(const GemvArgs& args, int threads) {
  dispatch(args.dtype, [&](auto e) { gemv_impl<decltype(e)>(args, threads); });
}

void merge_4bit(const MergeArgs& args, int threads) {
  dispatch(args.dtype, [&](auto e) {
    dispatch(args.out_dtype, [&](auto o) { merge_impl<decltype(e), decltype(o)>(args, threads); });
  });
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace fastlora
