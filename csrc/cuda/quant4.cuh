// Device helpers of the 4-bit CUDA kernels: dtype conversion, vector loads and stores, nibble
// decoding, warp reductions. CUDA headers only (no torch), so `nvcc -arch=sm_90 -cubin` compiles
// the kernels on a machine without a GPU or a CUDA torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

#include <type_traits>

#include "../quant4_format.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fastlora's CUDA kernels need compute capability 8.0 or newer (bf16, mma.sync m16n8k16)"
#endif

namespace fastlora {
namespace cuda {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// fp32 -> T rounding to nearest-even, as torch's `.to(dtype)`.
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16 bytes of a tensor that is read exactly once (the packed weight): no L1 allocation, so the
// activations that every warp re-reads stay in L1.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
#if defined(__CUDA_ARCH__)
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#else  // the CPU emulator of tests/cuda_emu
  return *static_cast<const uint4*>(p);
#endif
}

// 8 consecutive values at a 16-byte aligned address (32-byte for fp32), converted to fp32.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little-endian: the even element is the low half
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xFFFFu)));
    v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}

// 8 values to a 16-byte aligned address (32-byte for fp32), rounded to T.
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const T lo = from_f32<T>(v[2 * i]), hi = from_f32<T>(v[2 * i + 1]);
    uint16_t l, h;
    memcpy(&l, &lo, 2);
    memcpy(&h, &hi, 2);
    w[i] = static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// The 8 codes of one little-endian 32-bit word of packed data (its 4 bytes are 8 consecutive
// values, each byte's high nibble first), looked up in a 16-entry shared-memory table. The 16
// entries sit in 16 distinct banks, so a warp's lookups never conflict.
__device__ __forceinline__ void decode8(uint32_t word, const float* lut, float (&v)[8]) {
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    v[2 * b] = lut[(word >> (8 * b + 4)) & 0xFu];
    v[2 * b + 1] = lut[(word >> (8 * b)) & 0xFu];
  }
}

// Two fp32 values rounded (nearest-even) to T and packed into one 32-bit register, `lo` in the
// low half: the layout of a __half2 / __nv_bfloat162 and of an mma.sync operand register.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  uint32_t out;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&out, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&out, &v, 4);
  }
  return out;
#else
  const T l = from_f32<T>(lo), h = from_f32<T>(hi);
  uint16_t a, b;
  memcpy(&a, &l, 2);
  memcpy(&b, &h, 2);
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
#endif
}

// d += A·B on the tensor cores for one warp: mma.sync m16n8k16, T (fp16 or bf16) operands, fp32
// accumulators. Every lane of the warp must call it. With g = lane / 4 and t = lane % 4, a lane
// holds (each register two values, the first in the low half):
//   a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]    a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]                         d[2], d[3] = D[g+8][2t, 2t+1]
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma operands are fp16 or bf16");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif !defined(__CUDACC__)  // the CPU emulator of tests/cuda_emu (nvcc's host pass never calls it)
  cuda_emu::mma_m16n8k16(std::is_same_v<T, __nv_bfloat16>, a, b, d);
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Kernel launches go through these two, so that a host compiler can build the kernels against
// the CPU emulator of tests/cuda_emu (which defines both when __CUDACC__ is not).
#if defined(__CUDACC__)
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
}

// Every block resident at once (the caller sizes the grid by occupancy), so grid.sync() works.
template <typename... Params>
cudaError_t launch_cooperative_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                                      std::decay_t<Params>... args) {
  void* ptrs[] = {static_cast<void*>(&args)...};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, ptrs, 0, stream);
}
#endif

__host__ __device__ __forceinline__ bool aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1u)) == 0;
}

}  // namespace cuda
}  // namespace fastlora
