// CUDA kernels of the blockwise 4-bit format: dequantise, the decode GEMV (M <= 16) with a fused
// LoRA term, and the LoRA merge. Only CUDA headers: `nvcc -arch=sm_90 -cubin quant4_cuda.cu`
// compiles it without torch or a GPU (tests/test_native.py does, for sm_80 and sm_90).
//
// Decode GEMV, y = x Wᵀ + b (+ s·u Bᵀ), W (N, K) 4-bit:
// - one warp per output row n; each lane streams 16-byte chunks of the row (32 values, one
//   absmax since every blocksize is a multiple of 32) with L1-bypassing loads, prefetching its
//   next chunk while it computes the current one, so the packed weight is read exactly once;
// - codes come from a 16-entry shared-memory table (16 banks: conflict-free), the products are
//   summed per chunk in code units and scaled by the chunk's absmax once (1 FMA a value a row);
// - x (M rows, fp32/fp16/bf16) is re-read by every warp from L1; the M accumulators (MT, M
//   rounded up to a power of two) live in registers and are reduced with warp shuffles;
// - the LoRA term: with u given it is added in the epilogue; with A given the r rows of A are
//   extra tasks of a cooperative grid (u = x Aᵀ into a scratch buffer while the W rows stream
//   into y_partial), then one grid-wide sync and an epilogue pass: still a single launch.
// Shapes that break the 16-byte path (K % 32 != 0, unaligned views) take a per-element path.
#include <cooperative_groups.h>

#include <algorithm>

#include "quant4.cuh"
#include "quant4_cuda.h"

namespace fastlora {
namespace cuda {
namespace {

constexpr int kDequantThreads = 256;
constexpr int kGemvWarps = 4;  // output rows per block of the GEMV
constexpr int kGemvThreads = kGemvWarps * 32;
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

template <typename T, int MT>
__global__ void __launch_bounds__(kGemvThreads, 1)
    gemv_4bit_kernel(const GemvParams p, int log2_blocksize, bool w_vec, bool x_vec, bool a_vec, bool coop) {
  __shared__ float lut[16];
  load_lut(p.code, lut);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  const T* __restrict__ lora_b = static_cast<const T*>(p.lora_b);
  const T* __restrict__ lora_u = static_cast<const T*>(p.lora_u);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t lora_rows = coop ? p.r : 0;  // with A: tasks [0, r) are the rows of A
  const int64_t tasks = p.N + lora_rows;

  for (int64_t task = blockIdx.x * static_cast<int64_t>(kGemvWarps) + warp; task < tasks;
       task += static_cast<int64_t>(gridDim.x) * kGemvWarps) {  // warp-uniform
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
    if (task < lora_rows) {
      dense_row<T, MT>(p, x, static_cast<const T*>(p.lora_a) + task * p.K, a_vec && x_vec, lane, acc);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float s = warp_sum(acc[m]);
        if (m < p.M && lane == m) p.su[m * p.r + task] = p.scale * s;
      }
      continue;
    }
    const int64_t n = task - lora_rows;
    if (w_vec) {
      weight_row_vec<T, MT>(p, x, n, lut, log2_blocksize, lane, acc);
    } else {
      weight_row_any<T, MT>(p, x, n, lut, log2_blocksize, lane, acc);
    }
    const float b = bias != nullptr ? to_f32(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float s = warp_sum(acc[m]);
      if (m < p.M && lane == m) {  // lane m finishes row m of the output
        float v = s + b;
        if (coop) {
          p.y_partial[m * p.N + n] = v;
        } else {
          if (lora_b != nullptr) {
            float l = 0.0f;
            for (int j = 0; j < p.r; ++j) l = fmaf(to_f32(lora_u[m * p.r + j]), to_f32(lora_b[n * p.r + j]), l);
            v = fmaf(p.scale, l, v);
          }
          y[m * p.N + n] = from_f32<T>(v);
        }
      }
    }
  }

  if (coop) {  // every u and partial y is written: add s·u Bᵀ
    cooperative_groups::this_grid().sync();
    const int64_t total = p.M * p.N;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t m = i / p.N, n = i - m * p.N;
      float l = 0.0f;
      for (int j = 0; j < p.r; ++j) l = fmaf(p.su[m * p.r + j], to_f32(lora_b[n * p.r + j]), l);
      y[i] = from_f32<T>(p.y_partial[i] + l);
    }
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

template <typename T, int MT>
cudaError_t launch_gemv(const GemvParams& p, cudaStream_t stream, bool w_vec, bool x_vec, bool a_vec, bool coop) {
  auto kernel = gemv_4bit_kernel<T, MT>;
  const int log2_bs = log2_int(p.blocksize);
  if (!coop) {
    return launch_kernel(kernel, dim3(grid_for(p.N, kGemvWarps)), dim3(kGemvThreads), stream, p, log2_bs, w_vec,
                         x_vec, a_vec, coop);
  }
  // Cooperative: every block must be resident at once for the grid-wide sync.
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kGemvThreads, 0);
  if (err != cudaSuccess) return err;
  const int64_t wanted = (p.N + p.r + kGemvWarps - 1) / kGemvWarps;
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(per_sm) * sms)));
  return launch_cooperative_kernel(kernel, dim3(grid), dim3(kGemvThreads), stream, p, log2_bs, w_vec, x_vec, a_vec,
                                   coop);
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
  const int es = element_size(p.dtype);
  const bool x_vec = aligned(p.x, 16) && (p.ldx * es) % 16 == 0 && p.K % 8 == 0;
  const bool w_vec = x_vec && p.K % 32 == 0 && aligned(p.packed, 16);
  const bool a_vec = p.lora_a != nullptr && aligned(p.lora_a, 16);
  const bool coop = p.lora_b != nullptr && p.lora_a != nullptr;
  cudaError_t err = cudaSuccess;
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.M == 1) {
      err = launch_gemv<T, 1>(p, stream, w_vec, x_vec, a_vec, coop);
    } else if (p.M == 2) {
      err = launch_gemv<T, 2>(p, stream, w_vec, x_vec, a_vec, coop);
    } else if (p.M <= 4) {
      err = launch_gemv<T, 4>(p, stream, w_vec, x_vec, a_vec, coop);
    } else if (p.M <= 8) {
      err = launch_gemv<T, 8>(p, stream, w_vec, x_vec, a_vec, coop);
    } else {
      err = launch_gemv<T, 16>(p, stream, w_vec, x_vec, a_vec, coop);
    }
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
