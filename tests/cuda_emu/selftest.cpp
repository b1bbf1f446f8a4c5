// Kernels that check the emulator itself (tests/test_cuda_emulated.py): shared memory is per
// block, shuffles exchange the right lanes, mma.sync multiplies by PTX's fragment layout,
// grid.sync() orders every block's writes, and a collective that part of a warp never reaches is
// reported instead of hanging.
#include <cooperative_groups.h>

#include "emu.h"

#include "cuda/quant4.cuh"

namespace {

__global__ void shared_is_per_block(int* out) {
  __shared__ int tag;
  if (threadIdx.x == 0) tag = static_cast<int>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = tag;
}

__global__ void shuffle_xor(float* out, int lane_mask) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  out[t] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<float>(t), lane_mask);
}

// d (16x8, row-major fp32) += a (16x16) · b (16x8), both row-major 16-bit, through one
// mma_16816: each lane gathers its fragments by the layout documented there.
template <typename T>
__global__ void mma_tile(const uint16_t* a, const uint16_t* b, float* d) {
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  auto pair = [](uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); };
  auto A = [&](int row, int k) { return pair(a[row * 16 + k], a[row * 16 + k + 1]); };
  auto B = [&](int k, int col) { return pair(b[k * 8 + col], b[(k + 1) * 8 + col]); };
  const uint32_t ra[4] = {A(g, 2 * t), A(g + 8, 2 * t), A(g, 2 * t + 8), A(g + 8, 2 * t + 8)};
  const uint32_t rb[2] = {B(2 * t, g), B(2 * t + 8, g)};
  float* const out[4] = {d + g * 8 + 2 * t, d + g * 8 + 2 * t + 1, d + (g + 8) * 8 + 2 * t, d + (g + 8) * 8 + 2 * t + 1};
  float acc[4] = {*out[0], *out[1], *out[2], *out[3]};
  fastlora::cuda::mma_16816<T>(acc, ra, rb);
  for (int i = 0; i < 4; ++i) *out[i] = acc[i];
}

__global__ void grid_sync_orders_writes(int* flags, int* out) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x), n = static_cast<int>(gridDim.x * blockDim.x);
  flags[t] = t + 1;
  cooperative_groups::this_grid().sync();
  int sum = 0;
  for (int i = 0; i < n; ++i) sum += flags[i];
  out[t] = sum;
}

__global__ void divergent_shuffle(float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, 1.0f, 1);
}

}  // namespace

extern "C" {

int selftest_shared(int* out, int blocks, int threads) {
  return launch_kernel(shared_is_per_block, dim3(blocks), dim3(threads), nullptr, out);
}
int selftest_shuffle(float* out, int blocks, int threads, int lane_mask) {
  return launch_kernel(shuffle_xor, dim3(blocks), dim3(threads), nullptr, out, lane_mask);
}
int selftest_mma(const uint16_t* a, const uint16_t* b, float* d, int bf16) {
  return bf16 ? launch_kernel(mma_tile<__nv_bfloat16>, dim3(1), dim3(32), nullptr, a, b, d)
              : launch_kernel(mma_tile<__half>, dim3(1), dim3(32), nullptr, a, b, d);
}
int selftest_grid_sync(int* flags, int* out, int blocks, int threads) {
  return launch_cooperative_kernel(grid_sync_orders_writes, dim3(blocks), dim3(threads), nullptr, flags, out);
}
int selftest_divergent_shuffle(float* out) {
  return launch_kernel(divergent_shuffle, dim3(1), dim3(64), nullptr, out);
}

}  // extern "C"
