// Input checks shared by the torch bindings (bindings.cpp: CPU, bindings_cuda.cpp: CUDA).
// Every error a caller can cause raises ValueError/TypeError naming the argument, what was
// found and what was expected; a kernel never sees an inconsistent input.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "quant4_format.h"

namespace fastlora {

// Set from Python while tests run (fastlora._alloc's poisoning): new outputs start as NaN / 0xFF
// so an element a kernel forgets to write fails the comparison.
extern std::atomic<bool> g_poison;

// A new output tensor, poisoned while g_poison is on.
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  if (g_poison.load(std::memory_order_relaxed)) {
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(-1);  // all-ones bits
    }
  }
  return t;
}

inline std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::f32;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      TORCH_CHECK_TYPE(false, "fastlora: expected float32/float16/bfloat16, got ", c10::toString(t));
  }
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "fastlora ", op, ": ", name, " is on ", t.device(), ", expected ", device,
                    " (the device of the first input)");
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastlora ", op, ": ", name, " must be contiguous, got strides ", t.strides());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, "fastlora ", op, ": ", name, " must be ", dtype_name(expected),
                   ", got ", dtype_name(t.scalar_type()));
}

inline void check_numel(const char* op, const char* name, const at::Tensor& t, int64_t expected) {
  TORCH_CHECK_VALUE(t.numel() == expected, "fastlora ", op, ": ", name, " must have ", expected,
                    " elements, got shape ", t.sizes());
}

inline void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, "fastlora ", op,
                    ": blocksize must be a power of two from 32 to 4096, got ", blocksize);
}

// The quantisation state of a 4-bit tensor of `numel` values, checked against its packed data.
// Returns the absmax accessor the kernels use (raw pointers into the given tensors).
inline AbsmaxRef check_quant_state(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                   const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_code, double nested_offset,
                                   int64_t blocksize, int64_t numel) {
  const at::Device device = packed.device();
  TORCH_CHECK_VALUE(numel > 0, "fastlora ", op, ": the 4-bit tensor must have at least one element, got ", numel);
  check_blocksize(op, blocksize);
  check_contiguous(op, "packed", packed);
  TORCH_CHECK_VALUE(packed.nbytes() == static_cast<size_t>((numel + 1) / 2), "fastlora ", op, ": packed holds ",
                    packed.nbytes(), " bytes (shape ", packed.sizes(), ", ", dtype_name(packed.scalar_type()),
                    ") but ", numel, " values need ceil(", numel, " / 2) = ", (numel + 1) / 2);
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"absmax", &absmax}, {"code", &code}}) {
    check_device(op, name, *t, device);
    check_contiguous(op, name, *t);
  }
  check_dtype(op, "code", code, at::kFloat);
  check_numel(op, "code", code, 16);
  check_numel(op, "absmax", absmax, nblocks);
  TORCH_CHECK_VALUE(nested_absmax.has_value() == nested_code.has_value(), "fastlora ", op,
                    ": nested_absmax and nested_code come together (double quantisation), got only one");
  AbsmaxRef ref{nullptr, nullptr, nullptr, nullptr, 0.0f};
  if (nested_absmax.has_value()) {
    check_dtype(op, "absmax (double-quantised)", absmax, at::kByte);
    for (const auto& [name, t] :
         {std::pair<const char*, const at::Tensor*>{"nested_absmax", &*nested_absmax}, {"nested_code", &*nested_code}}) {
      check_device(op, name, *t, device);
      check_contiguous(op, name, *t);
      check_dtype(op, name, *t, at::kFloat);
    }
    check_numel(op, "nested_absmax", *nested_absmax, (nblocks + kNestedBlocksize - 1) / kNestedBlocksize);
    check_numel(op, "nested_code", *nested_code, 256);
    TORCH_CHECK_VALUE(std::isfinite(nested_offset), "fastlora ", op, ": nested_offset must be finite, got ",
                      nested_offset);
    ref.q = absmax.data_ptr<uint8_t>();
    ref.nested_absmax = nested_absmax->data_ptr<float>();
    ref.nested_code = nested_code->data_ptr<float>();
    ref.offset = static_cast<float>(nested_offset);
  } else {
    check_dtype(op, "absmax", absmax, at::kFloat);
    ref.absmax = absmax.data_ptr<float>();
  }
  return ref;
}

// The optional (rows, cols) operand `name` of a float op: contiguous, on `device`, of `dtype`.
inline void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Device& device,
                          at::ScalarType dtype, int64_t rows, int64_t cols) {
  check_device(op, name, t, device);
  check_dtype(op, name, t, dtype);
  check_contiguous(op, name, t);
  const bool ok = cols < 0 ? (t.dim() == 1 && t.size(0) == rows)
                           : (t.dim() == 2 && t.size(0) == rows && (cols == 0 || t.size(1) == cols));
  if (cols < 0) {
    TORCH_CHECK_VALUE(ok, "fastlora ", op, ": ", name, " must have shape (", rows, ",), got ", t.sizes());
  } else if (cols == 0) {
    TORCH_CHECK_VALUE(ok, "fastlora ", op, ": ", name, " must have shape (", rows, ", r), got ", t.sizes());
  } else {
    TORCH_CHECK_VALUE(ok, "fastlora ", op, ": ", name, " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  }
}

// Shapes of a 4-bit GEMV y = x Wᵀ + bias + scale · u Bᵀ, checked (see gemv_4bit_native's schema).
struct GemvShape {
  int64_t M, N, K, r;
};

inline GemvShape check_gemv(const char* op, const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_a,
                            const std::optional<at::Tensor>& lora_b, const std::optional<at::Tensor>& lora_u) {
  TORCH_CHECK_VALUE(x.dim() == 2, "fastlora ", op, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "fastlora ", op, ": x must be float32/float16/bfloat16, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, "fastlora ", op,
                    ": x must have unit stride along K, got strides ", x.strides());
  TORCH_CHECK_VALUE(x.size(0) <= 1 || x.stride(0) >= x.size(1), "fastlora ", op,
                    ": x rows overlap (strides ", x.strides(), ")");
  TORCH_CHECK_VALUE(out_features > 0 && x.size(1) > 0, "fastlora ", op, ": W must be non-empty, got (",
                    out_features, ", ", x.size(1), ")");
  const at::Device device = x.device();
  check_device(op, "packed", packed, device);
  GemvShape s{x.size(0), out_features, x.size(1), 0};
  const at::ScalarType dt = x.scalar_type();
  if (bias.has_value()) check_operand(op, "bias", *bias, device, dt, s.N, -1);
  if (lora_b.has_value()) {
    check_operand(op, "lora_b", *lora_b, device, dt, s.N, 0);
    s.r = lora_b->size(1);
    TORCH_CHECK_VALUE(s.r > 0, "fastlora ", op, ": lora_b must have at least one column (rank r >= 1)");
    TORCH_CHECK_VALUE(lora_a.has_value() != lora_u.has_value(), "fastlora ", op,
                      ": with lora_b give exactly one of lora_a (r, K) and lora_u (M, r)");
    if (lora_a.has_value()) check_operand(op, "lora_a", *lora_a, device, dt, s.r, s.K);
    if (lora_u.has_value()) check_operand(op, "lora_u", *lora_u, device, dt, s.M, s.r);
  } else {
    TORCH_CHECK_VALUE(!lora_a.has_value() && !lora_u.has_value(), "fastlora ", op,
                      ": lora_a / lora_u given without lora_b");
  }
  return s;
}

// Shapes of a grouped 4-bit GEMV y[m] = x[m] Wᵀ + bias + scales[i] · u[m] B_iᵀ, i = adapter_idx[m]
// (see gemv_4bit_multi_native's schema): u (M, R) and pool_b (S, N, R) in x's dtype, scales (S,)
// fp32, adapter_idx (M,) int32, all contiguous on x's device. The index values are checked by
// the CPU binding (the CUDA kernel skips rows whose slot is outside [0, S)).
struct GemvMultiShape {
  int64_t M, N, K, R, S;
};

inline GemvMultiShape check_gemv_multi(const char* op, const at::Tensor& x, const at::Tensor& packed,
                                       int64_t out_features, const std::optional<at::Tensor>& bias,
                                       const at::Tensor& lora_u, const at::Tensor& pool_b, const at::Tensor& scales,
                                       const at::Tensor& adapter_idx) {
  const GemvShape g = check_gemv(op, x, packed, out_features, bias, std::nullopt, std::nullopt, std::nullopt);
  const at::Device device = x.device();
  TORCH_CHECK_VALUE(pool_b.dim() == 3 && pool_b.size(1) == g.N, "fastlora ", op, ": pool_b must have shape (S, ",
                    g.N, ", R), got ", pool_b.sizes());
  check_device(op, "pool_b", pool_b, device);
  check_dtype(op, "pool_b", pool_b, x.scalar_type());
  check_contiguous(op, "pool_b", pool_b);
  GemvMultiShape s{g.M, g.N, g.K, pool_b.size(2), pool_b.size(0)};
  check_operand(op, "lora_u", lora_u, device, x.scalar_type(), s.M, s.R);
  TORCH_CHECK_VALUE(lora_u.size(1) == s.R, "fastlora ", op, ": lora_u must have shape (", s.M, ", ", s.R,
                    ") (R = pool_b.size(2)), got ", lora_u.sizes());
  check_device(op, "scales", scales, device);
  check_dtype(op, "scales", scales, at::kFloat);
  check_contiguous(op, "scales", scales);
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == s.S, "fastlora ", op, ": scales must have shape (", s.S,
                    ",) (one per slot of pool_b), got ", scales.sizes());
  check_device(op, "adapter_idx", adapter_idx, device);
  check_dtype(op, "adapter_idx", adapter_idx, at::kInt);
  check_contiguous(op, "adapter_idx", adapter_idx);
  TORCH_CHECK_VALUE(adapter_idx.dim() == 1 && adapter_idx.size(0) == s.M, "fastlora ", op,
                    ": adapter_idx must have shape (", s.M, ",) (one slot per row of x), got ", adapter_idx.sizes());
  return s;
}

// Shapes of a merge dequant(W) + scale · B A: lora_a (r, K), lora_b (N, r), one float dtype.
struct MergeShape {
  int64_t N, K, r;
};

inline MergeShape check_merge(const char* op, const at::Tensor& packed, const at::Tensor& lora_a,
                              const at::Tensor& lora_b, at::ScalarType out_dtype) {
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_b.dim() == 2 && lora_b.size(1) == lora_a.size(0), "fastlora ", op,
                    ": lora_a must be (r, K) and lora_b (N, r), got ", lora_a.sizes(), " and ", lora_b.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(lora_a.scalar_type()), "fastlora ", op,
                   ": lora_a must be float32/float16/bfloat16, got ", dtype_name(lora_a.scalar_type()));
  TORCH_CHECK_TYPE(is_float_dtype(out_dtype), "fastlora ", op, ": out_dtype must be float32/float16/bfloat16, got ",
                   dtype_name(out_dtype));
  const MergeShape s{lora_b.size(0), lora_a.size(1), lora_a.size(0)};
  TORCH_CHECK_VALUE(s.N > 0 && s.K > 0 && s.r > 0, "fastlora ", op, ": empty merge: N=", s.N, ", K=", s.K, ", r=", s.r);
  check_operand(op, "lora_a", lora_a, packed.device(), lora_a.scalar_type(), s.r, s.K);
  check_operand(op, "lora_b", lora_b, packed.device(), lora_a.scalar_type(), s.N, s.r);
  return s;
}

}  // namespace fastlora
