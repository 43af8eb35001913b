// The Kronecker kernels in bf16 on torch's bf16 GEMMs (kron_bf16.cpp), for CPUs with bf16
// matrix instructions (cpu_isa.h: bf16_products()): every product accumulates in fp32
// inside oneDNN and is rounded to bf16 once; intermediates are bf16.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace kronops::native {

// (y (M, a1*b1), inner) for bf16 x (M, a2, b2), a (a1, a2), b (b1, b2): y_m = s A X_m B^T
// + bias, X_m B^T first when b_first (else A X_m). `inner` is that intermediate, unscaled,
// in bf16 when keep, else empty.
std::tuple<at::Tensor, at::Tensor> kron_forward_bf16(const at::Tensor& x, const at::Tensor& a,
                                                     const at::Tensor& b,
                                                     const std::optional<at::Tensor>& bias,
                                                     double scale, bool b_first, bool keep);

// (dX, dA, dB) of that forward for bf16 dy (M, a1, b1), in bf16 (a gradient not needed: an
// empty tensor). `inner`: the kept intermediate (bf16), or an undefined tensor. Per row: the
// factors applied to every row as batched products, dA or dB summed over the rows in fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_grads_bf16(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
    double scale, bool b_first, bool need_x, bool need_a, bool need_b, const at::Tensor& inner);

// (dA, dB) alone (dX not needed, as in the merged adapter step) mode-major: dY and X copied
// once as (a1, M, b1) and (a2, M, b2), then every product, the sums over rows included, is
// one GEMM with the rows folded in (two copies, where the route below needs three).
std::tuple<at::Tensor, at::Tensor> kron_factor_grads_bf16_mode_major(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
    double scale, bool b_first, bool need_a, bool need_b, const at::Tensor& inner);

// The same gradients with every product one GEMM on the rows as they are or on copies with
// each row transposed (three such copies, row_transpose.h): used where dX is needed, 5-25%
// faster than per row or mode-major at 16x24 (x) 24x16, 16^4, 32^4, 48^4 and three 16x16
// factors, level at 64^4, slower where a factor has under 16 columns at large row products
// (128x8 (x) 128x8: GEMMs of 8 columns), which run per row (bench/NOTES.md).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_grads_bf16_rows_transposed(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
    double scale, bool b_first, bool need_x, bool need_a, bool need_b, const at::Tensor& inner);

// y (M, p, r) = f X_m for bf16 x (M, q, r), f (p, q).
at::Tensor kron_mode_bf16(const at::Tensor& x, const at::Tensor& f);

}  // namespace kronops::native
