// The blockwise 4-bit format (bitsandbytes' layout) as scalar helpers shared by the CPU kernels
// (csrc/cpu/) and the CUDA kernels (csrc/cuda/). Torch-free: plain C++17, and CUDA when compiled
// by nvcc (the helpers are then __host__ __device__).
//
// Layout: a weight of n values is flattened row-major and cut into blocks of `blocksize`
// consecutive values (blocksize is even, a power of two from 32 to 4096); block b keeps an fp32
// absmax; value i is the 4-bit index of the nearest code to value / absmax. Two indices share a
// byte, the first (even) element in the high nibble. With double quantisation the absmax itself is
// stored as 8-bit indices q into a 256-entry code, scaled per 256 blocks, plus an fp32 offset:
//     absmax[b] = nested_code[q[b]] * nested_absmax[b / 256] + offset     (two roundings, no FMA)
// which is how bitsandbytes and fastlora.quant de-nest it; the CPU sources are compiled with
// -ffp-contract=off and the CUDA code uses __fmul_rn/__fadd_rn so the result is bit-identical.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FASTLORA_HD __host__ __device__ __forceinline__
#else
#define FASTLORA_HD inline
#endif

namespace fastlora {

constexpr int kNestedBlocksize = 256;  // blocks per nested absmax (bitsandbytes' double quantisation)

// Element type of a float buffer: fp32, or fp16 / bf16 (held as raw uint16 bits on the CPU side).
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

FASTLORA_HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

FASTLORA_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// bfloat16 <-> fp32 on raw bits. fp32 -> bf16 rounds to nearest-even, NaN -> 0x7FC0: exactly
// c10::BFloat16's conversion, so a CPU kernel's bf16 output equals torch's `.to(torch.bfloat16)`.
FASTLORA_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

FASTLORA_HD uint16_t f32_to_bf16(float x) {
  uint32_t u = f32_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE binary16 <-> fp32 on raw bits, in integer arithmetic (independent of the FPU's
// flush-to-zero mode). fp32 -> fp16 rounds to nearest-even with subnormals and overflow to inf,
// as torch's `.to(torch.float16)`.
FASTLORA_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_f32(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    if (mant == 0) return bits_f32(sign);
    exp = 113;  // subnormal: normalise the mantissa
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    return bits_f32(sign | (exp << 23) | ((mant & 0x3FFu) << 13));
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

FASTLORA_HD uint16_t f32_to_f16(float x) {
  const uint32_t u = f32_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;   // NaN
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                        // below 2^-14: a subnormal half (or zero)
    if (a <= 0x33000000u) return sign;          // <= 2^-25 rounds to 0 (the tie goes to even)
    const uint32_t shift = 126u - (a >> 23);    // 14 .. 24
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  uint32_t r = a - 0x38000000u;  // re-bias the exponent from 127 to 15
  r += 0xFFFu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

// The 4-bit index of flat element e: its byte is e / 2, even elements in the high nibble.
FASTLORA_HD int nibble(const uint8_t* packed, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  return (e & 1) ? (byte & 0xF) : (byte >> 4);
}

// The fp32 absmax of a block: plain, or de-nested (see the header comment).
struct AbsmaxRef {
  const float* absmax;         // (nblocks,) fp32, or nullptr when double-quantised
  const uint8_t* q;            // (nblocks,) uint8 8-bit indices when double-quantised
  const float* nested_absmax;  // (ceil(nblocks / 256),) fp32
  const float* nested_code;    // (256,) fp32 signed dynamic map
  float offset;                // mean of the first-level absmax

  FASTLORA_HD float operator()(int64_t block) const {
    if (absmax != nullptr) return absmax[block];
#if defined(__CUDA_ARCH__)
    return __fadd_rn(__fmul_rn(nested_code[q[block]], nested_absmax[block / kNestedBlocksize]), offset);
#else
    const float scaled = nested_code[q[block]] * nested_absmax[block / kNestedBlocksize];
    return scaled + offset;
#endif
  }
};

}  // namespace fastlora
