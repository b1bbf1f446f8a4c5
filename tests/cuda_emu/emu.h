// A CPU emulator of the parts of CUDA that csrc/cuda/*.cu uses, so that the real kernel sources
// run, unchanged, on a machine with no GPU (tests/test_cuda_emulated.py builds them with the
// host C++ compiler against this header). The headers in include/ stand in for CUDA's.
//
// Execution model: each block runs on one OS thread, each of its CUDA threads as a fiber
// (ucontext) that runs until it reaches a barrier: __syncthreads, a warp shuffle, or a grid
// sync. A cooperative launch runs every block at once (one OS thread each), so
// cooperative_groups::this_grid().sync() is a real barrier across blocks; other launches run
// their blocks on a small pool. A barrier that can never complete (a shuffle some lanes of the
// warp never reach, __syncthreads in divergent code) fails the launch with a description.
//
// Emulated: threadIdx / blockIdx / blockDim / gridDim; __shared__ (one copy per block);
// __syncthreads; __shfl_xor_sync on full warps; mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulators,
// the fragment layout of PTX's ISA); grid sync; __ldg; __half / __nv_bfloat16 with
// round-to-nearest-even conversions; __fmul_rn / __fadd_rn; the occupancy and device queries of a
// configurable device (`cuda_emu::configure`); cudaLaunchCooperativeKernel's size limit.
// Not emulated: memory spaces (host memory stands for all of them), timing, inline PTX (kernels
// keep it under __CUDA_ARCH__, which is never defined here).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include "quant4_format.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __shared__ static thread_local  // blocks run on distinct OS threads (see above)

// -- runtime types ---------------------------------------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// -- the emulator --------------------------------------------------------------------------------

namespace cuda_emu {

// The order in which a block's parked threads resume. Round robin interleaves warps evenly; the
// eager orders let the lowest (or highest) warp run as far ahead as the barriers allow, so a
// missing __syncthreads between one task's reads of shared memory and the next task's writes
// turns into a wrong result.
enum class Schedule : int { round_robin = 0, lowest_first = 1, highest_first = 2 };

struct Device {
  int sms = 2;            // multiprocessors
  int blocks_per_sm = 1;  // what the occupancy query answers, for any kernel
  Schedule schedule = Schedule::round_robin;
};
void configure(const Device& device);
const Device& device();

// Runs `body` (the kernel call) as every thread of a grid. Returns cudaSuccess, or an error with
// its description in last_error_message().
cudaError_t run(dim3 grid, dim3 block, bool cooperative, const std::function<void()>& body);
const char* last_error_message();

struct LaunchRecord {
  unsigned grid = 0, block = 0;
  bool cooperative = false;
};
const LaunchRecord& last_launch();

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void sync_threads();
float shfl_xor(unsigned mask, float value, int lane_mask, int width);
// d += A·B for the calling warp (every lane calls it, as mma.sync.aligned): the operand
// registers of each lane are gathered into A (16x16), B (16x8) by the layout of PTX's
// mma.m16n8k16 for .f16/.bf16; the (exact) products are summed in double and rounded to fp32.
void mma_m16n8k16(bool bf16, const uint32_t (&a)[4], const uint32_t (&b)[2], float (&d)[4]);
void sync_grid();

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

inline void __syncthreads() { cuda_emu::sync_threads(); }
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int width = 32) {
  return cuda_emu::shfl_xor(mask, value, lane_mask, width);
}

namespace cooperative_groups {
struct grid_group {
  void sync() const { cuda_emu::sync_grid(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// -- device functions ------------------------------------------------------------------------------

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __uint_as_float(unsigned u) { return fastlora::bits_f32(u); }
inline unsigned __float_as_uint(float x) { return fastlora::f32_bits(x); }
// Built with -ffp-contract=off: one IEEE rounding each, like the _rn intrinsics.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return fastlora::f16_to_f32(h.bits); }
inline __half __float2half_rn(float v) { return {fastlora::f32_to_f16(v)}; }
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
inline float __bfloat162float(__nv_bfloat16 h) { return fastlora::bf16_to_f32(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return {fastlora::f32_to_bf16(v)}; }

// -- runtime API -----------------------------------------------------------------------------------

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device != 0) return cudaErrorInvalidValue;
  *value = cuda_emu::device().sms;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = cuda_emu::device().blocks_per_sm;
  return cudaSuccess;
}

// The launch helpers of csrc/cuda/quant4.cuh. Each CUDA thread gets its own copy of the arguments.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args... args) {
  return cuda_emu::run(grid, block, false, [&] { kernel(args...); });
}

template <typename... Params>
cudaError_t launch_cooperative_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t,
                                      std::decay_t<Params>... args) {
  const cuda_emu::Device& d = cuda_emu::device();
  if (static_cast<int64_t>(grid.x) * grid.y * grid.z > static_cast<int64_t>(d.sms) * d.blocks_per_sm)
    return cudaErrorCooperativeLaunchTooLarge;  // what the driver says: not every block fits at once
  return cuda_emu::run(grid, block, true, [&] { kernel(args...); });
}
