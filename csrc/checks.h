// The arguments of the native kernels: checks whose errors name the op and the argument
// (checks.cpp), and the dtype the kernels compute in.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu_isa.h"

namespace kronops::native {

// Refuses a tensor that is not a floating-point CPU tensor.
void check_floating(const char* op, const char* name, const at::Tensor& t);

// Refuses a tensor that is not a CPU tensor of dtype `dtype`.
void check_like(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype);

// Refuses an index tensor (1-D int64, CPU) with a value outside [0, size); returns it contiguous.
at::Tensor checked_index(const char* op, const char* name, const at::Tensor& index, int64_t size);

// fp64 for fp64, else fp32: what the fp32 kernels compute fp16 and bf16 in (rounded once).
inline at::ScalarType float_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype of an intermediate kept between a forward and its backward (the ops' contract,
// kronops.dtypes.kept_dtype): bf16 for bf16, else float_type(t).
inline at::ScalarType kept_type(at::ScalarType t) {
  return t == at::kBFloat16 ? t : float_type(t);
}

// The dtype products are computed in: bf16 for bf16 where the CPU's bf16 GEMMs are used
// (bf16_products()), else float_type(t).
inline at::ScalarType work_type(at::ScalarType t) {
  return t == at::kBFloat16 && bf16_products() ? at::kBFloat16 : float_type(t);
}

}  // namespace kronops::native
