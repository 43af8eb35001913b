// The native CPU kernels of the kronops ops, one function per op; their signatures follow
// the schemas of kronops/native/schemas.py (the dispatcher checks them at registration).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace kronops::native {

at::Tensor kron_rows(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& bias, double scale);
std::tuple<at::Tensor, at::Tensor> kron_rows_keep(const at::Tensor& x, const at::Tensor& a,
                                                  const at::Tensor& b,
                                                  const std::optional<at::Tensor>& bias,
                                                  double scale);
at::Tensor kron_mode(const at::Tensor& x, const at::Tensor& f);
at::Tensor kron_factor_grad(const at::Tensor& dy, const at::Tensor& f, const at::Tensor& x,
                            double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_rows_grads(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
    double scale, bool need_x, bool need_a, bool need_b, const std::optional<at::Tensor>& inner);

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
                         const std::optional<at::Tensor>& index, int64_t start,
                         const std::optional<at::Tensor>& bias, bool cols);
at::Tensor sparse_input_grad(const at::Tensor& dy, const at::Tensor& weight,
                             const at::Tensor& delta, const std::optional<at::Tensor>& index,
                             int64_t start, bool cols);
at::Tensor sparse_delta_grad(const at::Tensor& dy, const at::Tensor& x,
                             const std::optional<at::Tensor>& index, int64_t start, bool cols,
                             int64_t rows_of_delta);
void sparse_adamw(const at::Tensor& weight, const at::Tensor& grad, const at::Tensor& exp_avg,
                  const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& master,
                  const std::optional<at::Tensor>& index, int64_t start, bool cols, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step);


void routed_kron_add(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a,
                     const at::Tensor& b, const at::Tensor& tokens, const at::Tensor& tiles,
                     at::IntArrayRef offsets, at::IntArrayRef starts);
void routed_sparse_add(const at::Tensor& y, const at::Tensor& x, const at::Tensor& values,
                       const at::Tensor& index, const at::Tensor& tokens, const at::Tensor& tiles,
                       at::IntArrayRef offsets, at::IntArrayRef starts, at::IntArrayRef widths,
                       bool cols);

}  // namespace kronops::native
