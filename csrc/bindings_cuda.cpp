// CUDA implementations of the `fastlora::*_native` ops (schemas in bindings.cpp), compiled only
// into a CUDAExtension (torch with CUDA, nvcc found). Thin and loud: every input is checked
// (checks.h), the kernels (cuda/quant4_cuda.cu, torch-free) run on the current CUDA stream of
// the inputs' device, and a failed launch raises with CUDA's error string.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/quant4_cuda.h"

namespace fastlora {

bool has_cuda_kernels() { return true; }

namespace {

void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), "fastlora ", op, ": the CUDA kernel got a tensor on ", t.device());
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "fastlora ", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                                int64_t numel, at::ScalarType out_dtype) {
  const char* op = "dequantize_4bit_native";
  check_cuda(op, packed);
  TORCH_CHECK_TYPE(is_float_dtype(out_dtype), "fastlora ", op, ": out_dtype must be float32/float16/bfloat16, got ",
                   dtype_name(out_dtype));
  const c10::cuda::CUDAGuard guard(packed.device());
  const AbsmaxRef am =
      check_quant_state(op, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel);
  at::Tensor out = new_output({numel}, packed.options().dtype(out_dtype));
  check_launch(op, cuda::dequantize_4bit(static_cast<const uint8_t*>(packed.const_data_ptr()), am,
                                         code.const_data_ptr<float>(), static_cast<int>(blocksize), numel,
                                         out.mutable_data_ptr(), to_dtype(out_dtype),
                                         c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor gemv_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                          int64_t out_features, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                          const std::optional<at::Tensor>& lora_u, double scale) {
  const char* op = "gemv_4bit_native";
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const GemvShape s = check_gemv(op, x, packed, out_features, bias, lora_a, lora_b, lora_u);
  TORCH_CHECK_VALUE(s.M <= cuda::kMaxM, "fastlora ", op, ": the CUDA decode kernel takes at most ", cuda::kMaxM,
                    " rows of x, got ", s.M);
  TORCH_CHECK_VALUE(s.r <= std::numeric_limits<int>::max(), "fastlora ", op, ": rank ", s.r, " is too large");
  const AbsmaxRef am = check_quant_state(op, packed, absmax, code, nested_absmax, nested_code, nested_offset,
                                         blocksize, s.N * s.K);
  at::Tensor y = new_output({s.M, s.N}, x.options());
  if (s.M == 0) return y;
  at::Tensor su, y_partial;  // scratch of the single-launch LoRA path (u = x Aᵀ in the kernel)
  if (lora_b.has_value() && lora_a.has_value()) {
    su = at::empty({s.M, s.r}, x.options().dtype(at::kFloat));
    y_partial = at::empty({s.M, s.N}, x.options().dtype(at::kFloat));
  }
  cuda::GemvParams p{};
  p.x = x.const_data_ptr();
  p.ldx = s.M > 1 ? x.stride(0) : s.K;
  p.dtype = to_dtype(x.scalar_type());
  p.M = static_cast<int>(s.M);
  p.N = s.N;
  p.K = s.K;
  p.packed = static_cast<const uint8_t*>(packed.const_data_ptr());
  p.absmax = am;
  p.code = code.const_data_ptr<float>();
  p.blocksize = static_cast<int>(blocksize);
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  p.lora_a = lora_a.has_value() ? lora_a->const_data_ptr() : nullptr;
  p.lora_b = lora_b.has_value() ? lora_b->const_data_ptr() : nullptr;
  p.lora_u = lora_u.has_value() ? lora_u->const_data_ptr() : nullptr;
  p.r = static_cast<int>(s.r);
  p.scale = static_cast<float>(scale);
  p.y = y.mutable_data_ptr();
  p.su = su.defined() ? su.mutable_data_ptr<float>() : nullptr;
  p.y_partial = y_partial.defined() ? y_partial.mutable_data_ptr<float>() : nullptr;
  check_launch(op, cuda::gemv_4bit(p, c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor gemv_4bit_multi_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                                int64_t out_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_u,
                                const at::Tensor& pool_b, const at::Tensor& scales, const at::Tensor& adapter_idx) {
  const char* op = "gemv_4bit_multi_native";
  check_cuda(op, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const GemvMultiShape s = check_gemv_multi(op, x, packed, out_features, bias, lora_u, pool_b, scales, adapter_idx);
  TORCH_CHECK_VALUE(s.M <= cuda::kMaxM, "fastlora ", op, ": the CUDA decode kernel takes at most ", cuda::kMaxM,
                    " rows of x, got ", s.M);
  TORCH_CHECK_VALUE(s.R <= std::numeric_limits<int>::max() && s.S <= std::numeric_limits<int>::max(), "fastlora ",
                    op, ": pool_b of shape ", pool_b.sizes(), " is too large");
  const AbsmaxRef am = check_quant_state(op, packed, absmax, code, nested_absmax, nested_code, nested_offset,
                                         blocksize, s.N * s.K);
  // The index values are not read back here (a device sync per call): the kernel skips a row whose
  // slot is outside [0, S); fastlora.native.gemv_4bit_multi checks them in eager mode.
  at::Tensor y = new_output({s.M, s.N}, x.options());
  if (s.M == 0) return y;
  cuda::GemvParams p{};
  p.x = x.const_data_ptr();
  p.ldx = s.M > 1 ? x.stride(0) : s.K;
  p.dtype = to_dtype(x.scalar_type());
  p.M = static_cast<int>(s.M);
  p.N = s.N;
  p.K = s.K;
  p.packed = static_cast<const uint8_t*>(packed.const_data_ptr());
  p.absmax = am;
  p.code = code.const_data_ptr<float>();
  p.blocksize = static_cast<int>(blocksize);
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  if (s.R > 0 && s.S > 0) {  // rank 0 or no slot: the base alone
    p.lora_b = pool_b.const_data_ptr();
    p.lora_u = lora_u.const_data_ptr();
    p.r = static_cast<int>(s.R);
    p.lora_idx = adapter_idx.const_data_ptr<int32_t>();
    p.lora_scales = scales.const_data_ptr<float>();
    p.slots = static_cast<int>(s.S);
  }
  p.scale = 1.0f;
  p.y = y.mutable_data_ptr();
  check_launch(op, cuda::gemv_4bit(p, c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor merge_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                           const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                           at::ScalarType out_dtype) {
  const char* op = "merge_4bit_native";
  check_cuda(op, packed);
  const c10::cuda::CUDAGuard guard(packed.device());
  const auto [N, K, r] = check_merge(op, packed, lora_a, lora_b, out_dtype);
  TORCH_CHECK_VALUE(r <= std::numeric_limits<int>::max(), "fastlora ", op, ": rank ", r, " is too large");
  const AbsmaxRef am =
      check_quant_state(op, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, N * K);
  at::Tensor out = new_output({N, K}, packed.options().dtype(out_dtype));
  cuda::MergeParams p{};
  p.packed = static_cast<const uint8_t*>(packed.const_data_ptr());
  p.absmax = am;
  p.code = code.const_data_ptr<float>();
  p.blocksize = static_cast<int>(blocksize);
  p.N = N;
  p.K = K;
  p.r = static_cast<int>(r);
  p.lora_a = lora_a.const_data_ptr();
  p.lora_b = lora_b.const_data_ptr();
  p.dtype = to_dtype(lora_a.scalar_type());
  p.scale = static_cast<float>(scale);
  p.out = out.mutable_data_ptr();
  p.out_dtype = to_dtype(out_dtype);
  check_launch(op, cuda::merge_4bit(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace fastlora

TORCH_LIBRARY_IMPL(fastlora, CUDA, m) {
  m.impl("dequantize_4bit_native", &fastlora::dequantize_4bit_cuda);
  m.impl("gemv_4bit_native", &fastlora::gemv_4bit_cuda);
  m.impl("gemv_4bit_multi_native", &fastlora::gemv_4bit_multi_cuda);
  m.impl("merge_4bit_native", &fastlora::merge_4bit_cuda);
}
