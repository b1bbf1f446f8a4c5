// Host launchers of the CUDA kernels in quant4_cuda.cu. Torch-free: raw device pointers and a
// stream; the torch binding (csrc/bindings_cuda.cpp) checks every input and passes the current
// stream. Each launcher returns the CUDA error of its launch (cudaSuccess when it started).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../quant4_format.h"

namespace fastlora {
namespace cuda {

constexpr int kMaxM = 16;  // rows of x the GEMV takes (one fp32 accumulator per row per lane)

// out[i] = code[index(i)] * absmax(i / blocksize) for n values, rounded to out_dtype (nearest-even):
// bit-identical to fastlora.quant's reference. code: (16,) fp32 on the device.
cudaError_t dequantize_4bit(const uint8_t* packed, const AbsmaxRef& absmax, const float* code, int blocksize, int64_t n,
                            void* out, DType out_dtype, cudaStream_t stream);

// y = x Wᵀ + bias + scale · u Bᵀ for x (M <= 16, K) and a 4-bit W (N, K), one launch.
//   lora_b == nullptr: no LoRA term.
//   lora_u given: u (M, r) precomputed (e.g. with dropout); the term is added in the epilogue.
//   lora_a given: u = x Aᵀ is computed in the same launch (cooperative: the A rows are extra
//     tasks of the same grid, then one grid-wide sync before the epilogue), which needs the
//     scratch buffers `su` (M * r fp32) and `y_partial` (M * N fp32).
//   lora_idx given (many adapters): lora_b is a pool (slots, N, r), lora_u (M, r) is given, and
//     row m adds lora_scales[i] · u[m] B_iᵀ for its slot i = lora_idx[m] in the epilogue; none for
//     i outside [0, slots) (-1: the bare base). `scale` is unused then; lora_a must be nullptr.
struct GemvParams {
  const void* x;  // (M, K), rows ldx elements apart
  int64_t ldx;
  DType dtype;  // of x, bias, lora_a, lora_b, lora_u and y
  int M;
  int64_t N, K;
  const uint8_t* packed;  // ceil(N * K / 2) bytes
  AbsmaxRef absmax;
  const float* code;  // (16,) fp32
  int blocksize;
  const void* bias;    // (N,) or nullptr
  const void* lora_a;  // (r, K) or nullptr
  const void* lora_b;  // (N, r) or nullptr
  const void* lora_u;  // (M, r) or nullptr
  int r;
  float scale;
  void* y;           // (M, N), contiguous
  float* su;         // scratch (M, r), only with lora_a
  float* y_partial;  // scratch (M, N), only with lora_a
  const int32_t* lora_idx;   // (M,) slot of each row, or nullptr (one adapter)
  const float* lora_scales;  // (slots,) fp32, with lora_idx
  int slots;
};
cudaError_t gemv_4bit(const GemvParams& params, cudaStream_t stream);

// out = dequant(W) + scale · B A for a 4-bit W (N, K), A (r, K), B (N, r) of `dtype`; out (N, K)
// of out_dtype, computed in fp32 and rounded once.
struct MergeParams {
  const uint8_t* packed;
  AbsmaxRef absmax;
  const float* code;
  int blocksize;
  int64_t N, K;
  int r;
  const void* lora_a;
  const void* lora_b;
  DType dtype;
  float scale;
  void* out;
  DType out_dtype;
};
cudaError_t merge_4bit(const MergeParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlora
