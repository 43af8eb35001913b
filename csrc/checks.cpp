// Argument checks of the native kernels: errors name the op and the argument.
#include "checks.h"

#include <c10/util/Exception.h>

namespace kronops::native {

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

void check_like(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
                   " but expected ", dtype);
}

at::Tensor checked_index(const char* op, const char* name, const at::Tensor& index, int64_t size) {
  TORCH_CHECK_VALUE(index.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ",
                    index.device());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, op, ": ", name,
                   " must have dtype torch.int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1, op, ": ", name, " must be 1-D, got ", index.dim(), "-D");
  at::Tensor idx = index.contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < size, op, ": ", name, "[", i, "] = ", p[i],
                      " is out of range [0, ", size, ")");
  }
  return idx;
}

}  // namespace kronops::native
