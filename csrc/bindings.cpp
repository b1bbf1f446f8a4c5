// The torch binding of fastlora's native kernels: the `fastlora::*_native` op schemas, their CPU
// implementations (csrc/cpu/), and the Python module `fastlora._C` (pybind11).
//
// The CUDA implementations of the same ops live in bindings_cuda.cpp, compiled only when torch
// has CUDA. Fake (meta) implementations are registered from Python (fastlora/native.py), so
// torch.compile sees every op as opaque with the right output shapes. Thin bindings, loud checks:
// every input is validated here (checks.h) before a kernel runs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/quant4_cpu.h"

namespace fastlora {

std::atomic<bool> g_poison{false};

namespace {

const char* kSchemas[] = {
    "quantize_4bit_native(Tensor w, Tensor midpoints, Tensor order, int blocksize) -> (Tensor, Tensor)",
    "quantize_blockwise_native(Tensor x, Tensor lut, int blocksize) -> (Tensor, Tensor)",
    "dequantize_4bit_native(Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
    "float nested_offset, int blocksize, int numel, ScalarType out_dtype) -> Tensor",
    "gemv_4bit_native(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, "
    "Tensor? nested_code, float nested_offset, int blocksize, int out_features, Tensor? bias, Tensor? lora_a, "
    "Tensor? lora_b, Tensor? lora_u, float scale) -> Tensor",
    "gemv_4bit_multi_native(Tensor x, Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, "
    "Tensor? nested_code, float nested_offset, int blocksize, int out_features, Tensor? bias, Tensor lora_u, "
    "Tensor pool_b, Tensor scales, Tensor adapter_idx) -> Tensor",
    "merge_4bit_native(Tensor packed, Tensor absmax, Tensor code, Tensor? nested_absmax, Tensor? nested_code, "
    "float nested_offset, int blocksize, Tensor lora_a, Tensor lora_b, float scale, ScalarType out_dtype) -> Tensor",
};

void check_cpu(const char* op, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastlora ", op, ": the CPU kernel got a tensor on ", t.device());
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& w, const at::Tensor& midpoints,
                                                     const at::Tensor& order, int64_t blocksize) {
  const char* op = "quantize_4bit_native";
  check_cpu(op, w);
  TORCH_CHECK_TYPE(is_float_dtype(w.scalar_type()), "fastlora ", op, ": w must be float32/float16/bfloat16, got ",
                   dtype_name(w.scalar_type()));
  TORCH_CHECK_VALUE(w.numel() > 0, "fastlora ", op, ": w is empty (shape ", w.sizes(), ")");
  check_blocksize(op, blocksize);
  check_device(op, "midpoints", midpoints, w.device());
  check_device(op, "order", order, w.device());
  check_dtype(op, "midpoints", midpoints, at::kFloat);
  check_dtype(op, "order", order, at::kInt);
  check_numel(op, "midpoints", midpoints, 15);
  check_numel(op, "order", order, 16);
  const at::Tensor wc = w.contiguous(), mid = midpoints.contiguous(), ord = order.contiguous();
  const int64_t n = w.numel();
  at::Tensor packed = new_output({(n + 1) / 2}, w.options().dtype(at::kByte));
  at::Tensor absmax = new_output({(n + blocksize - 1) / blocksize}, w.options().dtype(at::kFloat));
  cpu::quantize_4bit(wc.const_data_ptr(), to_dtype(w.scalar_type()), n, static_cast<int>(blocksize),
                     mid.const_data_ptr<float>(), ord.const_data_ptr<int32_t>(), packed.mutable_data_ptr<uint8_t>(),
                     absmax.mutable_data_ptr<float>(), at::get_num_threads());
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& lut,
                                                          int64_t blocksize) {
  const char* op = "quantize_blockwise_native";
  check_cpu(op, x);
  check_dtype(op, "x", x, at::kFloat);
  TORCH_CHECK_VALUE(x.numel() > 0, "fastlora ", op, ": x is empty");
  TORCH_CHECK_VALUE(blocksize > 0, "fastlora ", op, ": blocksize must be positive, got ", blocksize);
  check_device(op, "lut", lut, x.device());
  check_dtype(op, "lut", lut, at::kByte);
  check_numel(op, "lut", lut, 65536);
  const at::Tensor xc = x.contiguous(), lc = lut.contiguous();
  const int64_t n = x.numel();
  at::Tensor q = new_output({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = new_output({(n + blocksize - 1) / blocksize}, x.options());
  cpu::quantize_blockwise_8bit(xc.const_data_ptr<float>(), n, static_cast<int>(blocksize), lc.const_data_ptr<uint8_t>(),
                               q.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>(), at::get_num_threads());
  return {q, absmax};
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                               int64_t numel, at::ScalarType out_dtype) {
  const char* op = "dequantize_4bit_native";
  check_cpu(op, packed);
  TORCH_CHECK_TYPE(is_float_dtype(out_dtype), "fastlora ", op, ": out_dtype must be float32/float16/bfloat16, got ",
                   dtype_name(out_dtype));
  const AbsmaxRef am =
      check_quant_state(op, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, numel);
  at::Tensor out = new_output({numel}, packed.options().dtype(out_dtype));
  cpu::dequantize_4bit(static_cast<const uint8_t*>(packed.const_data_ptr()), am, code.const_data_ptr<float>(),
                       static_cast<int>(blocksize), numel, out.mutable_data_ptr(), to_dtype(out_dtype),
                       at::get_num_threads());
  return out;
}

at::Tensor gemv_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                         int64_t out_features, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& lora_a, const std::optional<at::Tensor>& lora_b,
                         const std::optional<at::Tensor>& lora_u, double scale) {
  const char* op = "gemv_4bit_native";
  check_cpu(op, x);
  const GemvShape s = check_gemv(op, x, packed, out_features, bias, lora_a, lora_b, lora_u);
  const AbsmaxRef am = check_quant_state(op, packed, absmax, code, nested_absmax, nested_code, nested_offset,
                                         blocksize, s.N * s.K);
  at::Tensor y = new_output({s.M, s.N}, x.options());
  if (s.M == 0) return y;
  cpu::GemvArgs args{};
  args.x = x.const_data_ptr();
  args.ldx = s.M > 1 ? x.stride(0) : s.K;
  args.dtype = to_dtype(x.scalar_type());
  args.M = s.M;
  args.N = s.N;
  args.K = s.K;
  args.packed = static_cast<const uint8_t*>(packed.const_data_ptr());
  args.absmax = am;
  args.code = code.const_data_ptr<float>();
  args.blocksize = static_cast<int>(blocksize);
  args.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  args.lora_a = lora_a.has_value() ? lora_a->const_data_ptr() : nullptr;
  args.lora_b = lora_b.has_value() ? lora_b->const_data_ptr() : nullptr;
  args.lora_u = lora_u.has_value() ? lora_u->const_data_ptr() : nullptr;
  args.r = s.r;
  args.scale = static_cast<float>(scale);
  args.y = y.mutable_data_ptr();
  cpu::gemv_4bit(args, at::get_num_threads());
  return y;
}

at::Tensor gemv_4bit_multi_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, double nested_offset, int64_t blocksize,
                               int64_t out_features, const std::optional<at::Tensor>& bias, const at::Tensor& lora_u,
                               const at::Tensor& pool_b, const at::Tensor& scales, const at::Tensor& adapter_idx) {
  const char* op = "gemv_4bit_multi_native";
  check_cpu(op, x);
  const GemvMultiShape s = check_gemv_multi(op, x, packed, out_features, bias, lora_u, pool_b, scales, adapter_idx);
  const AbsmaxRef am = check_quant_state(op, packed, absmax, code, nested_absmax, nested_code, nested_offset,
                                         blocksize, s.N * s.K);
  const int32_t* idx = adapter_idx.const_data_ptr<int32_t>();
  for (int64_t m = 0; m < s.M; ++m)
    TORCH_CHECK_VALUE(idx[m] >= -1 && idx[m] < s.S, "fastlora ", op, ": adapter_idx[", m, "] = ", idx[m],
                      " is not a slot of the pool: expected -1 (the bare base) or 0 <= i < ", s.S);
  at::Tensor y = new_output({s.M, s.N}, x.options());
  if (s.M == 0) return y;
  cpu::GemvArgs args{};
  args.x = x.const_data_ptr();
  args.ldx = s.M > 1 ? x.stride(0) : s.K;
  args.dtype = to_dtype(x.scalar_type());
  args.M = s.M;
  args.N = s.N;
  args.K = s.K;
  args.packed = static_cast<const uint8_t*>(packed.const_data_ptr());
  args.absmax = am;
  args.code = code.const_data_ptr<float>();
  args.blocksize = static_cast<int>(blocksize);
  args.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  if (s.R > 0 && s.S > 0) {  // rank 0 or no slot: the base alone
    args.lora_b = pool_b.const_data_ptr();
    args.lora_u = lora_u.const_data_ptr();
    args.r = s.R;
    args.lora_idx = idx;
    args.lora_scales = scales.const_data_ptr<float>();
    args.slots = s.S;
  }
  args.y = y.mutable_data_ptr();
  cpu::gemv_4bit(args, at::get_num_threads());
  return y;
}

at::Tensor merge_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                          double nested_offset, int64_t blocksize, const at::Tensor& lora_a, const at::Tensor& lora_b,
                          double scale, at::ScalarType out_dtype) {
  const char* op = "merge_4bit_native";
  check_cpu(op, packed);
  const auto [N, K, r] = check_merge(op, packed, lora_a, lora_b, out_dtype);
  const AbsmaxRef am =
      check_quant_state(op, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, N * K);
  at::Tensor out = new_output({N, K}, packed.options().dtype(out_dtype));
  cpu::MergeArgs args{};
  args.packed = static_cast<const uint8_t*>(packed.const_data_ptr());
  args.absmax = am;
  args.code = code.const_data_ptr<float>();
  args.blocksize = static_cast<int>(blocksize);
  args.N = N;
  args.K = K;
  args.r = r;
  args.lora_a = lora_a.const_data_ptr();
  args.lora_b = lora_b.const_data_ptr();
  args.dtype = to_dtype(lora_a.scalar_type());
  args.scale = static_cast<float>(scale);
  args.out = out.mutable_data_ptr();
  args.out_dtype = to_dtype(out_dtype);
  cpu::merge_4bit(args, at::get_num_threads());
  return out;
}

}  // namespace

bool has_cuda_kernels();  // bindings_cuda.cpp, or the stub below

#ifndef FASTLORA_WITH_CUDA
bool has_cuda_kernels() { return false; }
#endif

}  // namespace fastlora

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  for (const char* schema : fastlora::kSchemas) m.def(schema);
}

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("quantize_4bit_native", &fastlora::quantize_4bit_cpu);
  m.impl("quantize_blockwise_native", &fastlora::quantize_blockwise_cpu);
  m.impl("dequantize_4bit_native", &fastlora::dequantize_4bit_cpu);
  m.impl("gemv_4bit_native", &fastlora::gemv_4bit_cpu);
  m.impl("gemv_4bit_multi_native", &fastlora::gemv_4bit_multi_cpu);
  m.impl("merge_4bit_native", &fastlora::merge_4bit_cpu);
}

#ifndef FASTLORA_SOURCE_HASH
#define FASTLORA_SOURCE_HASH unknown
#endif
#define FASTLORA_STR2(x) #x
#define FASTLORA_STR(x) FASTLORA_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlora native kernels: the ops are torch.ops.fastlora.*_native; see fastlora/native.py";
  // csrc/build.py's source_hash() of the sources this module was built from ("h" + 16 hex digits).
  m.attr("source_hash") = FASTLORA_STR(FASTLORA_SOURCE_HASH);
  m.def("has_cuda", &fastlora::has_cuda_kernels, "True when the CUDA kernels (csrc/cuda/) are compiled in");
  m.def("max_threads", &fastlora::cpu::max_threads, "OpenMP's default thread count (1 without OpenMP)");
  m.def(
      "openmp", []() {
#ifdef _OPENMP
        return true;
#else
        return false;
#endif
      },
      "True when the CPU kernels were compiled with OpenMP");
  m.def(
      "_set_poison", [](bool enabled) { return fastlora::g_poison.exchange(enabled); },
      "Fill new outputs with NaN / 0xFF (tests); returns the previous setting");
}
