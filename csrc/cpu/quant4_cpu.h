// CPU kernels of the blockwise 4-bit format: quantise, dequantise, the 4-bit GEMV/GEMM with a
// fused LoRA term, and the LoRA merge. Torch-free C++17 with OpenMP; the torch binding
// (csrc/bindings.cpp) checks every input and calls these on raw pointers.
//
// Quantise and dequantise are bit-identical to fastlora.quant's PyTorch path (and so to
// bitsandbytes); the GEMV accumulates in fp32 and rounds once to the output dtype.
#pragma once

#include <stdint.h>

#include "../quant4_format.h"

namespace fastlora {
namespace cpu {

using fastlora::DType;

// Blockwise 4-bit quantisation of n values (w: n values of `dtype`, flat).
//   midpoints: (15,) fp32 decision boundaries between the sorted codes; a value on a boundary
//              takes the lower code. order: (16,) stored index of the i-th smallest code.
//   packed: (ceil(n / 2),) out; absmax: (ceil(n / blocksize),) out, NaN or inf for a block holding
//   a NaN or inf (whose packed values are then meaningless: callers reject such input).
void quantize_4bit(const void* w, DType dtype, int64_t n, int blocksize, const float* midpoints, const int32_t* order,
                   uint8_t* packed, float* absmax, int threads);

// Blockwise 8-bit quantisation of n fp32 values against a 65,536-point grid of [-1, 1]:
// q = lut[int((x / absmax + 1) / 2 * 65535 + 0.5)], 0 for an all-zero block (bitsandbytes' CPU
// quantiser, used for the nested absmax). lut: (65536,) uint8. q: (n,) out; absmax: (ceil(n /
// blocksize),) out.
void quantize_blockwise_8bit(const float* x, int64_t n, int blocksize, const uint8_t* lut, uint8_t* q, float* absmax,
                             int threads);

// Dequantise n values: out[i] = code[index(i)] * absmax(i / blocksize), rounded to out_dtype.
void dequantize_4bit(const uint8_t* packed, const AbsmaxRef& absmax, const float* code, int blocksize, int64_t n,
                     void* out, DType out_dtype, int threads);

// y = x Wᵀ + bias + scale · u Bᵀ, W (N, K) 4-bit. u = x Aᵀ (given lora_a) or given (lora_u).
// Grouped (many adapters, lora_idx given): lora_b is a pool (slots, N, r), lora_u (M, r) is given,
// and row m adds lora_scales[i] · u[m] B_iᵀ for its slot i = lora_idx[m]; none for i outside
// [0, slots) (-1: the bare base). `scale` is unused then.
struct GemvArgs {
  const void* x;  // (M, K) of dtype, rows `ldx` apart
  int64_t ldx;
  DType dtype;  // of x, bias, lora_a, lora_b, lora_u and y
  int64_t M, N, K;
  const uint8_t* packed;  // ceil(N * K / 2) bytes
  AbsmaxRef absmax;
  const float* code;  // (16,) fp32
  int blocksize;
  const void* bias;    // (N,) or nullptr
  const void* lora_a;  // (r, K) or nullptr
  const void* lora_b;  // (N, r) or nullptr (no LoRA term)
  const void* lora_u;  // (M, r) or nullptr; with lora_b, exactly one of lora_a / lora_u
  int64_t r;
  float scale;
  void* y;  // (M, N) out, contiguous
  const int32_t* lora_idx;   // (M,) slot of each row, or nullptr (one adapter)
  const float* lora_scales;  // (slots,) fp32, with lora_idx
  int64_t slots;
};
void gemv_4bit(const GemvArgs& args, int threads);

// W' = dequant(W) + scale · B A, W (N, K) 4-bit, A (r, K) and B (N, r) of `dtype`; out (N, K) of
// out_dtype, computed in fp32 and rounded once.
struct MergeArgs {
  const uint8_t* packed;
  AbsmaxRef absmax;
  const float* code;
  int blocksize;
  int64_t N, K, r;
  const void* lora_a;
  const void* lora_b;
  DType dtype;
  float scale;
  void* out;
  DType out_dtype;
};
void merge_4bit(const MergeArgs& args, int threads);

// Threads OpenMP would use by default (1 when built without OpenMP).
int max_threads();

}  // namespace cpu
}  // namespace fastlora
