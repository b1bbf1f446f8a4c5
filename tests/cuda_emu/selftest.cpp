// Kernels that check the emulator itself (tests/test_cuda_emulated.py): shared memory is per
// block, shuffles exchange the right lanes, grid.sync() orders every block's writes, and a
// shuffle that part of a warp never reaches is reported instead of hanging.
#include <cooperative_groups.h>

#include "emu.h"

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
int selftest_grid_sync(int* flags, int* out, int blocks, int threads) {
  return launch_cooperative_kernel(grid_sync_orders_writes, dim3(blocks), dim3(threads), nullptr, flags, out);
}
int selftest_divergent_shuffle(float* out) {
  return launch_kernel(divergent_shuffle, dim3(1), dim3(64), nullptr, out);
}

}  // extern "C"
