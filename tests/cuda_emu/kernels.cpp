// csrc/cuda/quant4_cuda.cu, unchanged, built for the CPU emulator (emu.h), behind a C ABI that
// tests/test_cuda_emulated.py calls through ctypes. Pointers are host memory; an absent optional
// tensor is a null pointer. Each function returns the launcher's cudaError_t.
#include "emu.h"

#include "cuda/quant4_cuda.cu"

using fastlora::AbsmaxRef;
using fastlora::DType;

extern "C" {

// schedule: 0 round robin, 1 lowest thread first, 2 highest first (cuda_emu::Schedule).
void emu_configure(int sms, int blocks_per_sm, int schedule) {
  cuda_emu::configure({sms, blocks_per_sm, static_cast<cuda_emu::Schedule>(schedule)});
}

const char* emu_last_error() { return cuda_emu::last_error_message(); }

// The last launch: grid blocks, threads per block, cooperative (0/1).
void emu_last_launch(int64_t* out) {
  const cuda_emu::LaunchRecord& r = cuda_emu::last_launch();
  out[0] = r.grid, out[1] = r.block, out[2] = r.cooperative;
}

int emu_dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* q, const float* nested_absmax,
                        const float* nested_code, float offset, const float* code, int blocksize, int64_t n,
                        void* out, int out_dtype) {
  const AbsmaxRef am{absmax, q, nested_absmax, nested_code, offset};
  return fastlora::cuda::dequantize_4bit(packed, am, code, blocksize, n, out, static_cast<DType>(out_dtype), nullptr);
}

int emu_gemv_4bit(const void* x, int64_t ldx, int dtype, int M, int64_t N, int64_t K, const uint8_t* packed,
                  const float* absmax, const uint8_t* q, const float* nested_absmax, const float* nested_code,
                  float offset, const float* code, int blocksize, const void* bias, const void* lora_a,
                  const void* lora_b, const void* lora_u, int r, float scale, void* y, float* su, float* y_partial) {
  fastlora::cuda::GemvParams p{};
  p.x = x;
  p.ldx = ldx;
  p.dtype = static_cast<DType>(dtype);
  p.M = M;
  p.N = N;
  p.K = K;
  p.packed = packed;
  p.absmax = AbsmaxRef{absmax, q, nested_absmax, nested_code, offset};
  p.code = code;
  p.blocksize = blocksize;
  p.bias = bias;
  p.lora_a = lora_a;
  p.lora_b = lora_b;
  p.lora_u = lora_u;
  p.r = r;
  p.scale = scale;
  p.y = y;
  p.su = su;
  p.y_partial = y_partial;
  return fastlora::cuda::gemv_4bit(p, nullptr);
}

// The grouped GEMV (csrc's gemv_4bit_multi_native): pool_b (slots, N, r), u (M, r), idx (M,), scales (slots,).
int emu_gemv_4bit_multi(const void* x, int dtype, int M, int64_t N, int64_t K, const uint8_t* packed,
                        const float* absmax, const uint8_t* q, const float* nested_absmax, const float* nested_code,
                        float offset, const float* code, int blocksize, const void* bias, const void* pool_b,
                        const void* lora_u, int r, const int32_t* idx, const float* scales, int slots, void* y) {
  fastlora::cuda::GemvParams p{};
  p.x = x;
  p.ldx = K;
  p.dtype = static_cast<DType>(dtype);
  p.M = M;
  p.N = N;
  p.K = K;
  p.packed = packed;
  p.absmax = AbsmaxRef{absmax, q, nested_absmax, nested_code, offset};
  p.code = code;
  p.blocksize = blocksize;
  p.bias = bias;
  p.lora_b = pool_b;
  p.lora_u = lora_u;
  p.r = r;
  p.lora_idx = idx;
  p.lora_scales = scales;
  p.slots = slots;
  p.scale = 1.0f;
  p.y = y;
  return fastlora::cuda::gemv_4bit(p, nullptr);
}

int emu_merge_4bit(const uint8_t* packed, const float* absmax, const uint8_t* q, const float* nested_absmax,
                   const float* nested_code, float offset, const float* code, int blocksize, int64_t N, int64_t K,
                   int r, const void* lora_a, const void* lora_b, int dtype, float scale, void* out, int out_dtype) {
  fastlora::cuda::MergeParams p{};
  p.packed = packed;
  p.absmax = AbsmaxRef{absmax, q, nested_absmax, nested_code, offset};
  p.code = code;
  p.blocksize = blocksize;
  p.N = N;
  p.K = K;
  p.r = r;
  p.lora_a = lora_a;
  p.lora_b = lora_b;
  p.dtype = static_cast<DType>(dtype);
  p.scale = scale;
  p.out = out;
  p.out_dtype = static_cast<DType>(out_dtype);
  return fastlora::cuda::merge_4bit(p, nullptr);
}

}  // extern "C"
