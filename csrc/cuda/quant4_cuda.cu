// CUDA kernels of the blockwise 4-bit format: dequantise, the decode GEMV (M <= 16) with a fused
// LoRA term, and the LoRA merge. Only CUDA headers: `nvcc -arch=sm_90 -cubin quant4_cuda.cu`
// compiles it without torch or a GPU (tests/test_native.py does, for sm_80 and sm_90).
//
// Decode GEMV, y = x Wᵀ + b (+ s·u Bᵀ), W (N, K) 4-bit. Two kernels share the LoRA handling:
// - fp16/bf16 x, K % 32 == 0 (the common case): the tensor-core kernel. A block owns 16 output
//   rows (the M of mma.sync m16n8k16; the tokens of x are its N, 8 or 16), its warps split K.
//   Each lane streams one 16-byte chunk (32 weights, one absmax) of rows g and g + 8 per step with
//   L1-bypassing loads, two steps ahead of the math (a ring of three), dequantises them into mma
//   operand registers (fp32 code x absmax rounded to T: the reference's dequantised weight, bit for
//   bit) and loads the matching 32 values of x (cache-resident) in the step that uses them; at 128
//   registers two blocks fit an SM. A dot product does not care in which order k is summed, so the
//   k of the mma fragments is a permutation of the k in memory, the same for A and B: lane
//   (g, t) feeds its own chunk, so no data moves between lanes. The decode costs about 4.5
//   instructions a weight whatever M is; the warps' partial sums meet in shared memory.
// - fp32 x, or shapes that break the 16-byte path: one warp per output row, CUDA cores. Each
//   lane streams 16-byte chunks of the row (or element by element for K % 32 != 0 and unaligned
//   views), codes from a 16-entry shared-memory table (16 banks: conflict-free), the products
//   summed per chunk in code units and scaled once; M accumulators (MT, M rounded up to a power
//   of two) in registers, reduced with warp shuffles.
// - the LoRA term: with u given it is added in the epilogue (with a pool of adapters, each row's
//   slot index is read there and picks its B_i and s_i: base + every adapter in one launch); with A given the r rows of A are
//   extra tasks of a cooperative grid (u = x Aᵀ into a scratch buffer while the W rows stream
//   into y_partial), then one grid-wide sync and an epilogue pass: still a single launch.
#include <cooperative_groups.h>

#include <algorithm>

#include "quant4.cuh"
#include "quant4_cuda.h"

namespace fastlora {
namespace cuda {
namespace {

constexpr int kDequantThreads = 256;
constexpr int kGemvWarps = 4;  // output rows per block of the CUDA-core GEMV
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kMmaWarps = 8;  // warps splitting K in a block of the tensor-core GEMV
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaRows = 16;  // output rows a block task owns: the M of m16n8k16
constexpr int kMmaStages = 3;  // W step buffers of a lane: two steps in flight during the third's math
constexpr int kMergeThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

__device__ __forceinline__ void load_lut(const float* __restrict__ code, float* lut) {
  if (threadIdx.x < 16) lut[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Dequantisation: one thread per 8 values (one 32-bit word of packed data), coalesced.

template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const AbsmaxRef absmax, const float* __restrict__ code,
                           int log2_blocksize, int64_t n, T* __restrict__ out, bool vec) {
  __shared__ float lut[16];
  load_lut(code, lut);
  const int64_t words = (n + 7) / 8, nbytes = (n + 1) / 2;
  for (int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; w < words;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = w * 8;
    const bool full = vec && e0 + 8 <= n;
    uint32_t word = 0;
    if (full) {
      word = __ldg(reinterpret_cast<const uint32_t*>(packed) + w);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (4 * w + i < nbytes) word |= static_cast<uint32_t>(packed[4 * w + i]) << (8 * i);
    }
    const float a = absmax(e0 >> log2_blocksize);
    float v[8];
    decode8(word, lut, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(v[i], a);  // the reference's one fp32 product
    if (full) {
      store8(out + e0, v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (e0 + i < n) out[e0 + i] = from_f32<T>(v[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decode GEMV

// acc[m] += Σ_k W[n, k] x[m, k] over this lane's share of the row (16-byte path). For M <= 4 the
// products are summed in code units per chunk and scaled once (part[m]); from 8 rows on, the 8
// decoded codes are scaled instead, which costs fewer registers than MT partial sums.
template <typename T, int MT>
__device__ __forceinline__ void weight_row_vec(const GemvParams& p, const T* __restrict__ x, int64_t n,
                                               const float* lut, int log2_blocksize, int lane, float (&acc)[MT]) {
  constexpr bool kScaleCodes = MT >= 8;
  const uint8_t* row = p.packed + n * (p.K / 2);
  const int64_t chunks = p.K / 32, first = n * p.K;
  int64_t c = lane;
  uint4 q = c < chunks ? load_stream16(row + c * 16) : make_uint4(0, 0, 0, 0);
  for (; c < chunks; c += 32) {
    const int64_t next = c + 32;
    const uint4 q_next = next < chunks ? load_stream16(row + next * 16) : q;  // in flight during the math
    const float a = p.absmax((first + c * 32) >> log2_blocksize);
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
    float part[kScaleCodes ? 1 : MT];
#pragma unroll
    for (int m = 0; m < (kScaleCodes ? 1 : MT); ++m) part[m] = 0.0f;
    const T* xc = x + c * 32;
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      float wv[8];
      decode8(words[g], lut, wv);
      if constexpr (kScaleCodes) {
#pragma unroll
        for (int i = 0; i < 8; ++i) wv[i] *= a;
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < p.M) {
          float xv[8];
          load8(xc + m * p.ldx + g * 8, xv);
          float& sum = kScaleCodes ? acc[m] : part[kScaleCodes ? 0 : m];
#pragma unroll
          for (int i = 0; i < 8; ++i) sum = fmaf(wv[i], xv[i], sum);
        }
      }
    }
    if constexpr (!kScaleCodes) {
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m] = fmaf(a, part[m], acc[m]);
    }
    q = q_next;
  }
}

// The same for any K and alignment: element by element.
template <typename T, int MT>
__device__ __forceinline__ void weight_row_any(const GemvParams& p, const T* __restrict__ x, int64_t n,
                                               const float* lut, int log2_blocksize, int lane, float (&acc)[MT]) {
  const int64_t first = n * p.K;
  for (int64_t k = lane; k < p.K; k += 32) {
    const int64_t e = first + k;
    const float w = lut[nibble(p.packed, e)] * p.absmax(e >> log2_blocksize);
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < p.M) acc[m] = fmaf(w, to_f32(x[m * p.ldx + k]), acc[m]);
  }
}

// acc[m] += Σ_k A[j, k] x[m, k] over this lane's share (a LoRA row, dense).
template <typename T, int MT>
__device__ __forceinline__ void dense_row(const GemvParams& p, const T* __restrict__ x, const T* __restrict__ a,
                                          bool vec, int lane, float (&acc)[MT]) {
  if (vec) {
    for (int64_t k8 = lane; k8 < p.K / 8; k8 += 32) {
      float av[8];
      load8(a + k8 * 8, av);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < p.M) {
          float xv[8];
          load8(x + m * p.ldx + k8 * 8, xv);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[m] = fmaf(av[i], xv[i], acc[m]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < p.K; k += 32) {
      const float av = to_f32(a[k]);
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < p.M) acc[m] = fmaf(av, to_f32(x[m * p.ldx + k]), acc[m]);
    }
  }
}

// bias[n] as fp32 (0 without a bias).
template <typename T>
__device__ __forceinline__ float bias_at(const GemvParams& p, int64_t n) {
  return p.bias != nullptr ? to_f32(static_cast<const T*>(p.bias)[n]) : 0.0f;
}

// Row m, column n of the output from v = its sum over K + bias: either into y_partial (the
// cooperative path adds the LoRA term after the grid sync) or + s·u Bᵀ and rounded into y.
template <typename T>
__device__ __forceinline__ void finish_output(const GemvParams& p, int m, int64_t n, float v, bool coop) {
  if (coop) {
    p.y_partial[m * p.N + n] = v;
    return;
  }
  if (p.lora_b != nullptr) {
    const T* __restrict__ lora_b = static_cast<const T*>(p.lora_b);
    const T* __restrict__ lora_u = static_cast<const T*>(p.lora_u);
    float scale = p.scale;
    bool term = true;
    if (p.lora_idx != nullptr) {  // many adapters: the row's slot picks B_i and s_i from the pool
      const int i = __ldg(p.lora_idx + m);
      term = i >= 0 && i < p.slots;  // -1: the bare base (anything else out of range: no term, no stray read)
      if (term) lora_b += static_cast<int64_t>(i) * p.N * p.r, scale = __ldg(p.lora_scales + i);
    }
    if (term) {
      float l = 0.0f;
      for (int j = 0; j < p.r; ++j) l = fmaf(to_f32(lora_u[m * p.r + j]), to_f32(lora_b[n * p.r + j]), l);
      v = fmaf(scale, l, v);
    }
  }
  static_cast<T*>(p.y)[m * p.N + n] = from_f32<T>(v);
}

// su[:, j] = scale · x A[j]ᵀ for one row j of A, by one warp.
template <typename T, int MT>
__device__ __forceinline__ void lora_a_row(const GemvParams& p, const T* __restrict__ x, int64_t j, bool vec,
                                           int lane) {
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
  dense_row<T, MT>(p, x, static_cast<const T*>(p.lora_a) + j * p.K, vec, lane, acc);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float s = warp_sum(acc[m]);
    if (m < p.M && lane == m) p.su[m * p.r + j] = p.scale * s;
  }
}

// The cooperative path after its grid-wide sync (every u and partial y written): y = y_partial + su Bᵀ.
template <typename T>
__device__ __forceinline__ void lora_epilogue(const GemvParams& p) {
  const T* __restrict__ lora_b = static_cast<const T*>(p.lora_b);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t total = p.M * p.N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / p.N, n = i - m * p.N;
    float l = 0.0f;
    for (int j = 0; j < p.r; ++j) l = fmaf(p.su[m * p.r + j], to_f32(lora_b[n * p.r + j]), l);
    y[i] = from_f32<T>(p.y_partial[i] + l);
  }
}

template <typename T, int MT>
__global__ void __launch_bounds__(kGemvThreads, 1)
    gemv_4bit_kernel(const GemvParams p, int log2_blocksize, bool w_vec, bool x_vec, bool a_vec, bool coop) {
  __shared__ float lut[16];
  load_lut(p.code, lut);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int64_t lora_rows = coop ? p.r : 0;  // with A: tasks [0, r) are the rows of A
  const int64_t tasks = p.N + lora_rows;

  for (int64_t task = blockIdx.x * static_cast<int64_t>(kGemvWarps) + warp; task < tasks;
       task += static_cast<int64_t>(gridDim.x) * kGemvWarps) {  // warp-uniform
    if (task < lora_rows) {
      lora_a_row<T, MT>(p, x, task, a_vec && x_vec, lane);
      continue;
    }
    const int64_t n = task - lora_rows;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
    if (std::is_same_v<T, float> && w_vec) {  // (16-bit x on the 16-byte path takes the tensor cores)
      weight_row_vec<T, MT>(p, x, n, lut, log2_blocksize, lane, acc);
    } else {
      weight_row_any<T, MT>(p, x, n, lut, log2_blocksize, lane, acc);
    }
    const float b = bias_at<T>(p, n);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float s = warp_sum(acc[m]);
      if (m < p.M && lane == m) finish_output<T>(p, m, n, s + b, coop);  // lane m finishes row m of the output
    }
  }

  if (coop) {
    cooperative_groups::this_grid().sync();
    lora_epilogue<T>(p);
  }
}

// ---------------------------------------------------------------------------------------------
// Decode GEMV on the tensor cores (fp16/bf16 x, K % 32 == 0, 16-byte aligned x rows and W).
//
// One step of a warp covers 128 k of the block's 16 rows: lane (g, t) = (lane / 4, lane % 4)
// takes chunk c = 4·step + t (32 values) of rows n0 + g and n0 + g + 8 and of tokens g (and
// g + 8 when NT = 2). Mma j (0..7) of the step takes values 4j .. 4j+3 of every lane's chunk:
// bytes 2j and 2j + 1 of the packed rows, 32-bit words 2j and 2j + 1 of x. In the fragment layout
// of mma_16816 that puts the same k opposite each other in A and B, so D is the exact product.
// Rows past N read row N - 1 and tokens past M read token M - 1: their products land only in
// output rows and columns that are never written. A chunk past K (in the last step when
// K % 128 != 0) is not read: zero weights and zero x.

// The 16 fp32 codes in shared memory (64-byte aligned), looked up by a nibble of a packed word.
struct CodeTable {
  const float* lut;
  uint32_t base;  // the table's shared-space address: the byte offset of a code is `offset | base`

  __device__ __forceinline__ float operator()(uint32_t word, int shift) const {  // the nibble at bit `shift`
#if defined(__CUDA_ARCH__)
    const uint32_t offset = shift >= 2 ? (word >> (shift - 2)) & 0x3Cu : (word << (2 - shift)) & 0x3Cu;
    float v;
    asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(offset | base));  // a shift, a LOP3, an LDS
    return v;
#else
    return lut[(word >> shift) & 0xFu];
#endif
  }
};

// W of one step for one lane: the 16 bytes of chunk c of rows g and g + 8 and their absmax (0 past K:
// zero weights). The stream from device memory: kMmaStages of these make the ring that keeps
// kMmaStages - 1 steps of W in flight while a step is computed.
struct MmaWeights {
  uint32_t w[2][4];
  float scale[2];
};

template <int NT>
struct MmaX {  // x of one step for one lane: 32 values of chunk c of tokens g (and g + 8), two a word
  uint32_t x[NT][16];
};

struct WeightCursor {  // a lane's addresses at its chunk of the next step of W to load
  const uint8_t* w[2];  // rows n0 + g, n0 + g + 8 (clamped to N - 1)
  int64_t e[2];         // flat index of the chunk's first weight: its absmax block is e >> log2_blocksize

  __device__ __forceinline__ void advance() {
#pragma unroll
    for (int h = 0; h < 2; ++h) w[h] += 64 * kMmaWarps, e[h] += 128 * kMmaWarps;
  }
};

// Loads W of the step at the cursor. kTail: the step may end past K (`chunk_ok` says whether this
// lane's chunk exists); otherwise every chunk exists.
template <bool kTail>
__device__ __forceinline__ void load_mma_weights(const GemvParams& p, const WeightCursor& cur, int log2_blocksize,
                                                 bool chunk_ok, MmaWeights& s) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint4 q = make_uint4(0, 0, 0, 0);
    float a = 0.0f;
    if (!kTail || chunk_ok) {
      q = load_stream16(cur.w[h]);
      a = p.absmax(cur.e[h] >> log2_blocksize);
    }
    s.w[h][0] = q.x, s.w[h][1] = q.y, s.w[h][2] = q.z, s.w[h][3] = q.w;
    s.scale[h] = a;
  }
}

// Loads x of one step: the chunk at x[nt] of each token tile (L1/L2-resident: every block reads it).
template <bool kTail, typename T, int NT>
__device__ __forceinline__ void load_mma_x(const T* const (&x)[NT], bool chunk_ok, MmaX<NT>& s) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint4 v = make_uint4(0, 0, 0, 0);
      if (!kTail || chunk_ok) v = __ldg(reinterpret_cast<const uint4*>(x[nt]) + i);
      s.x[nt][4 * i] = v.x, s.x[nt][4 * i + 1] = v.y, s.x[nt][4 * i + 2] = v.z, s.x[nt][4 * i + 3] = v.w;
    }
  }
}

// The two weights of byte `b` of a packed word (the even element in its high nibble) as an
// operand register: fp32 code x absmax, rounded to T (the reference's dequantised weights).
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int b, const CodeTable& codes, float scale) {
  return pack2<T>(__fmul_rn(codes(word, 8 * b + 4), scale), __fmul_rn(codes(word, 8 * b), scale));
}

template <typename T, int NT>
__device__ __forceinline__ void mma_step(const MmaWeights& s, const MmaX<NT>& xs, const CodeTable& codes,
                                         float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int word = j >> 1, b = 2 * (j & 1);  // bytes 2j and 2j + 1 of the chunk
    const uint32_t a[4] = {
        dequant_pair<T>(s.w[0][word], b, codes, s.scale[0]),      // row g, values 4j, 4j+1
        dequant_pair<T>(s.w[1][word], b, codes, s.scale[1]),      // row g + 8
        dequant_pair<T>(s.w[0][word], b + 1, codes, s.scale[0]),  // row g, values 4j+2, 4j+3
        dequant_pair<T>(s.w[1][word], b + 1, codes, s.scale[1]),  // row g + 8
    };
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint32_t bx[2] = {xs.x[nt][2 * j], xs.x[nt][2 * j + 1]};  // values 4j, 4j+1 | 4j+2, 4j+3
      mma_16816<T>(acc[nt], a, bx);
    }
  }
}

// Σ_k over this warp's steps of the block's 16 rows, as D fragments (acc[nt]: tokens 8nt .. 8nt+7).
// W streams from device memory kMmaStages - 1 steps ahead of the math (a ring of step buffers,
// its slots named by compile-time indices: the loop is unrolled by kMmaStages); x, which every
// block reads and the caches hold, is loaded in the step that uses it, so its registers are not
// doubled and the kernel fits two blocks an SM.
template <typename T, int NT>
__device__ __forceinline__ void mma_rows(const GemvParams& p, const T* __restrict__ x, int64_t n0, int warp, int g,
                                         int t, const CodeTable& codes, int log2_blocksize, float (&acc)[NT][4]) {
  const int64_t chunks = p.K / 32, full = chunks / 4;  // steps [0, full) have all four chunks
  const int64_t c0 = 4 * static_cast<int64_t>(warp) + t;
  WeightCursor cur;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = n0 + g + 8 * h;
    const int64_t r = row < p.N ? row : p.N - 1;
    cur.w[h] = p.packed + r * (p.K / 2) + c0 * 16;
    cur.e[h] = r * p.K + c0 * 32;
  }
  const T* xc[NT];  // x of tokens g (+ 8, clamped to M - 1) at the step being computed
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = g + 8 * nt < p.M ? g + 8 * nt : p.M - 1;
    xc[nt] = x + m * p.ldx + c0 * 32;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

  constexpr int S = kMmaStages;
  MmaWeights ring[S];
  int64_t step = warp;  // warp-uniform, as every branch below
#pragma unroll
  for (int i = 0; i < S - 1; ++i)
    if (step + i * kMmaWarps < full) load_mma_weights<false>(p, cur, log2_blocksize, true, ring[i]), cur.advance();
  while (step < full) {
#pragma unroll
    for (int i = 0; i < S; ++i) {
      // the slot of the step before this one is free: fill it with the step S - 1 ahead
      if (step + (S - 1) * kMmaWarps < full)
        load_mma_weights<false>(p, cur, log2_blocksize, true, ring[(i + S - 1) % S]), cur.advance();
      MmaX<NT> xs;
      load_mma_x<false, T, NT>(xc, true, xs);
      mma_step<T, NT>(ring[i], xs, codes, acc);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xc[nt] += 128 * kMmaWarps;
      if ((step += kMmaWarps) >= full) break;
    }
  }
  if (step == full && chunks % 4 != 0) {  // both cursors are at step `full`: the last, partial one
    const bool chunk_ok = 4 * full + t < chunks;
    MmaX<NT> xs;
    load_mma_weights<true>(p, cur, log2_blocksize, chunk_ok, ring[0]);
    load_mma_x<true, T, NT>(xc, chunk_ok, xs);
    mma_step<T, NT>(ring[0], xs, codes, acc);
  }
}

template <typename T, int NT>
__global__ void __launch_bounds__(kMmaThreads, 2)
    gemv_4bit_mma_kernel(const GemvParams p, int log2_blocksize, bool a_vec, bool coop) {
  static_assert(kMmaThreads == kMmaRows * 16, "the reduction gives each thread one (token, row) of the output");
  __shared__ __align__(64) float lut[16];
  __shared__ float partial[kMmaWarps][16][kMmaRows];  // [warp][token][row]
  load_lut(p.code, lut);
#if defined(__CUDA_ARCH__)
  const CodeTable codes{lut, static_cast<uint32_t>(__cvta_generic_to_shared(lut))};
#else
  const CodeTable codes{lut, 0};
#endif
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  // With A: tasks [0, lora_tasks) are the rows of A, one a warp; the rest are 16-row tiles of W.
  const int64_t lora_tasks = coop ? (p.r + kMmaWarps - 1) / kMmaWarps : 0;
  const int64_t tasks = lora_tasks + (p.N + kMmaRows - 1) / kMmaRows;

  for (int64_t task = blockIdx.x; task < tasks; task += gridDim.x) {  // block-uniform
    if (task < lora_tasks) {
      const int64_t j = task * kMmaWarps + warp;
      if (j < p.r) lora_a_row<T, 8 * NT>(p, x, j, a_vec, lane);
      continue;
    }
    const int64_t n0 = (task - lora_tasks) * kMmaRows;
    float acc[NT][4];
    mma_rows<T, NT>(p, x, n0, warp, g, t, codes, log2_blocksize, acc);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int m = 8 * nt + 2 * t;
      partial[warp][m][g] = acc[nt][0], partial[warp][m + 1][g] = acc[nt][1];
      partial[warp][m][g + 8] = acc[nt][2], partial[warp][m + 1][g + 8] = acc[nt][3];
    }
    __syncthreads();
    const int row = threadIdx.x % kMmaRows, m = threadIdx.x / kMmaRows;
    if (m < p.M && n0 + row < p.N) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) sum += partial[w][m][row];  // a fixed order: deterministic
      finish_output<T>(p, m, n0 + row, sum + bias_at<T>(p, n0 + row), coop);
    }
    __syncthreads();  // `partial` is free for the next task
  }

  if (coop) {
    cooperative_groups::this_grid().sync();
    lora_epilogue<T>(p);
  }
}

// ---------------------------------------------------------------------------------------------
// Merge: one thread per output element (coalesced in k; B[n, :] is a warp-wide broadcast).

template <typename T, typename O>
__global__ void __launch_bounds__(kMergeThreads) merge_4bit_kernel(const MergeParams p, int log2_blocksize) {
  __shared__ float lut[16];
  load_lut(p.code, lut);
  const T* __restrict__ a = static_cast<const T*>(p.lora_a);
  const T* __restrict__ b = static_cast<const T*>(p.lora_b);
  O* __restrict__ out = static_cast<O*>(p.out);
  const int64_t total = p.N * p.K;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / p.K, k = e - n * p.K;
    const float w = __fmul_rn(lut[nibble(p.packed, e)], p.absmax(e >> log2_blocksize));
    float d = 0.0f;
    for (int j = 0; j < p.r; ++j) d = fmaf(to_f32(b[n * p.r + j]), to_f32(a[j * p.K + k]), d);
    out[e] = from_f32<O>(fmaf(p.scale, d, w));
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

template <typename F>
void dispatch(DType d, F&& f) {
  switch (d) {
    case DType::f32:
      f(float{});
      break;
    case DType::f16:
      f(__half{});
      break;
    case DType::bf16:
      f(__nv_bfloat16{});
      break;
  }
}

int log2_int(int v) {
  int l = 0;
  while ((1 << (l + 1)) <= v) ++l;
  return l;
}

unsigned grid_for(int64_t items, int threads) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((items + threads - 1) / threads, kMaxBlocks)));
}

int element_size(DType d) { return d == DType::f32 ? 4 : 2; }

// A GEMV kernel on enough blocks for `blocks` block tasks; cooperative: on no more blocks than are
// resident at once (the grid-stride loops cover the rest), as the grid-wide sync needs.
template <typename... Params, typename... Args>
cudaError_t launch_gemv(void (*kernel)(Params...), int64_t blocks, int threads, bool coop, cudaStream_t stream,
                        Args... args) {
  if (!coop) return launch_kernel(kernel, dim3(grid_for(blocks, 1)), dim3(threads), stream, args...);
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (err != cudaSuccess) return err;
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(per_sm) * sms)));
  return launch_cooperative_kernel(kernel, dim3(grid), dim3(threads), stream, args...);
}

}  // namespace

cudaError_t dequantize_4bit(const uint8_t* packed, const AbsmaxRef& absmax, const float* code, int blocksize, int64_t n,
                            void* out, DType out_dtype, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vec = aligned(packed, 4) && aligned(out, 32);
  const int log2_bs = log2_int(blocksize);
  const unsigned grid = grid_for((n + 7) / 8, kDequantThreads);
  cudaError_t err = cudaSuccess;
  dispatch(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    err = launch_kernel(dequantize_4bit_kernel<T>, dim3(grid), dim3(kDequantThreads), stream, packed, absmax, code,
                        log2_bs, n, static_cast<T*>(out), vec);
  });
  return err;
}

cudaError_t gemv_4bit(const GemvParams& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return cudaSuccess;
  if (p.M > kMaxM || p.K <= 0 || (p.lora_b != nullptr && p.r <= 0)) return cudaErrorInvalidValue;
  if (p.lora_idx != nullptr && (p.lora_a != nullptr || p.lora_u == nullptr || p.lora_scales == nullptr))
    return cudaErrorInvalidValue;  // a pool takes u precomputed
  const int es = element_size(p.dtype);
  const bool x_vec = aligned(p.x, 16) && (p.ldx * es) % 16 == 0 && p.K % 8 == 0;
  const bool w_vec = x_vec && p.K % 32 == 0 && aligned(p.packed, 16);
  const bool a_vec = p.lora_a != nullptr && aligned(p.lora_a, 16);
  const bool coop = p.lora_b != nullptr && p.lora_a != nullptr;
  const int log2_bs = log2_int(p.blocksize);
  cudaError_t err = cudaSuccess;
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (w_vec) {  // the tensor cores
        const int64_t blocks = (coop ? (p.r + kMmaWarps - 1) / kMmaWarps : 0) + (p.N + kMmaRows - 1) / kMmaRows;
        auto kernel = p.M <= 8 ? gemv_4bit_mma_kernel<T, 1> : gemv_4bit_mma_kernel<T, 2>;
        err = launch_gemv(kernel, blocks, kMmaThreads, coop, stream, p, log2_bs, a_vec, coop);
        return;
      }
    }
    const int64_t blocks = (p.N + (coop ? p.r : 0) + kGemvWarps - 1) / kGemvWarps;
    auto kernel = p.M == 1   ? gemv_4bit_kernel<T, 1>
                  : p.M == 2 ? gemv_4bit_kernel<T, 2>
                  : p.M <= 4 ? gemv_4bit_kernel<T, 4>
                  : p.M <= 8 ? gemv_4bit_kernel<T, 8>
                             : gemv_4bit_kernel<T, 16>;
    err = launch_gemv(kernel, blocks, kGemvThreads, coop, stream, p, log2_bs, w_vec, x_vec, a_vec, coop);
  });
  return err;
}

cudaError_t merge_4bit(const MergeParams& p, cudaStream_t stream) {
  const int64_t total = p.N * p.K;
  if (total <= 0) return cudaSuccess;
  const int log2_bs = log2_int(p.blocksize);
  const unsigned grid = grid_for(total, kMergeThreads);
  cudaError_t err = cudaSuccess;
  dispatch(p.dtype, [&](auto t) {
    dispatch(p.out_dtype, [&](auto o) {
      err = launch_kernel(merge_4bit_kernel<decltype(t), decltype(o)>, dim3(grid), dim3(kMergeThreads), stream, p,
                          log2_bs);
    });
  });
  return err;
}

}  // namespace cuda
}  // namespace fastlora
