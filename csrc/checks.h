// The arguments of the native kernels: checks whose errors name the op and the argument
// (checks.cpp), and the dtype the kernels compute in.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace kronops::native {

// Refuses a tensor that is not a floating-point CPU tensor.
void check_floating(const char* op, const char* name, const at::Tensor& t);

// Refuses a tensor that is not a CPU tensor of dtype `dtype`.
void check_like(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype);

// Refuses an index tensor (1-D int64, CPU) with a value outside [0, size); returns it contiguous.
at::Tensor checked_index(const char* op, const char* name, const at::Tensor& index, int64_t size);

// The dtype products are computed in: fp64 for fp64, else fp32 (fp16/bf16 rounded once).
inline at::ScalarType work_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace kronops::native
