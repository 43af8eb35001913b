// CPU kernels of the Kronecker ops: y_m = s * A X_m B^T over the rows m of x (M, a2, b2),
// its backward (dX, dA, dB in one pass), the factor gradient of the double backward, and one
// factor on one mode (y_m = F X_m, kron_matmul's leading factors).
//
// Rows are cut into blocks whose working set fits in a core's L2; a block's intermediate
// (X_m B^T or A X_m) lives in a per-thread buffer and is used while it is in cache, and
// outputs are written once, in their final layout. Products on a block are BLAS calls on
// raw pointers, one a block where its rows fold into one operand (row_gemm), else one per
// row; per-row products with one factor go to our FMA kernel (repeated_gemm.cpp), else one
// BLAS call per row (one batch call for small row products, where the BLAS has one). For dA
// and dB alone, and where the row products are small (Shape::mode_major), the backward
// copies each block mode-major in cache instead, so that all of its products, the sums over
// rows included, are one GEMM a block. Factor gradients sum into one partial per chunk of
// rows (at most one chunk per thread), added in chunk order. fp32 and fp64 compute in their
// own dtype; fp16 is computed in fp32 and rounded once, as the PyTorch kernels do on CPU,
// and so is bf16 unless the CPU has bf16 matrix instructions (cpu_isa.h): then kron_bf16.cpp
// runs the products on torch's bf16 GEMMs. The double backward's factor gradient is always
// fp32 (or fp64).
#include "kronops_kernels.h"  // generated: the kernels' declarations

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "blas.h"
#include "checks.h"
#include "cpu_isa.h"
#include "kron_bf16.h"
#include "parallel.h"

namespace kronops::native {
namespace {

constexpr const char* kRows = "kronops::kron_rows";
constexpr const char* kGrads = "kronops::kron_rows_grads";
constexpr const char* kFactorGrad = "kronops::kron_factor_grad";
constexpr const char* kMode = "kronops::kron_mode";

struct Shape {
  int64_t m, a1, a2, b1, b2;
  // X_m B^T first (2*b1*a2*(b2+a1) flops a row) or A X_m first (2*a1*b2*(a2+b1)): the
  // PyTorch kernel's rule, so both keep the same intermediate.
  bool b_first() const { return b1 * a2 * (b2 + a1) <= a1 * b2 * (a2 + b1); }
  // Elements a row of that intermediate has: X_m B^T (a2, b1) or A X_m (a1, b2).
  int64_t inner() const { return b_first() ? a2 * b1 : a1 * b2; }
  // Whether the row product done once per row (A T_m or A X_m) is small: at most 32K
  // multiply-adds in fp32, where per-row BLAS calls on 32x32x32 products lost 10-17% at 2
  // threads; 16K in bf16, whose per-row route is oneDNN's batched products (bench/NOTES.md).
  bool small_rows(bool bf16) const {
    return a1 * a2 * (b_first() ? b1 : b2) <= (bf16 ? 1 : 2) * kSmallGemm;
  }
  // Whether the fp32 backward runs mode-major (every product one GEMM on a block of rows
  // copied mode-major) rather than per row: for dA and dB alone, and at small row products.
  bool mode_major(bool need_x) const { return !need_x || small_rows(false); }
};

// One matrix as a batch that repeats it (step 0).
template <class T>
Batch<T> repeated(Mat<T> m) {
  return {m.p, 0, m.ld, m.trans};
}

// The batch from its matrix i on.
template <class T>
Batch<T> starting_at(Batch<T> b, int64_t i) {
  return {b.p + i * b.step, b.step, b.ld, b.trans};
}

template <class T>
Mat<T> transposed(Mat<T> m) {
  return {m.p, m.ld, !m.trans};
}

Shape rows_shape(const char* op, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  check_floating(op, "x", x);
  check_like(op, "a", a, x.scalar_type());
  check_like(op, "b", b, x.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, op, ": a and b must be 2-D, got shapes ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(1) == a.size(1) && x.size(2) == b.size(1), op,
                    ": x must have shape (M, a2, b2) = (M, ", a.size(1), ", ", b.size(1),
                    "), got ", x.sizes());
  return {x.size(0), a.size(0), a.size(1), b.size(0), b.size(1)};
}

// Rows m0 .. m0+k of a (M, p, q) tensor (element (m, i, j) at src[m*st[0] + i*st[1] + j*st[2]],
// src pointing at row m0) copied mode-major into dst (p, k, q): dst[i][m] = row m's i-th row.
// In that layout a factor on either mode of every row is one GEMM: F (f x p) * dst (p x k*q)
// on the first mode, dst (p*k x q) * F^T on the last.
template <class T>
void to_mode_major(const T* src, at::IntArrayRef st, int64_t k, int64_t p, int64_t q, T* dst) {
  for (int64_t m = 0; m < k; ++m)
    for (int64_t i = 0; i < p; ++i) {
      const T* row = src + m * st[0] + i * st[1];
      T* to = dst + (i * k + m) * q;
      if (st[2] == 1) {
        std::copy_n(row, q, to);
      } else {
        for (int64_t j = 0; j < q; ++j) to[j] = row[j * st[2]];
      }
    }
}

// The inverse: src (p, k, q) mode-major into k contiguous rows dst (k, p, q).
template <class T>
void from_mode_major(const T* src, int64_t k, int64_t p, int64_t q, T* dst) {
  for (int64_t m = 0; m < k; ++m)
    for (int64_t i = 0; i < p; ++i) std::copy_n(src + (i * k + m) * q, q, dst + (m * p + i) * q);
}

// y (M, a1*b1) = s * vec(A X_m B^T) + bias; the intermediate of every row is written to
// `inner` when given (M rows of Shape::inner() elements), else kept in a block buffer.
template <class T>
void rows_forward(const Shape& s, at::Tensor x, at::Tensor a, at::Tensor b, const T* bias,
                  T scale, T* y, T* inner) {
  const Batch<T> X = as_batch<T>(x);
  const Mat<T> A = as_mat<T>(a), Bt = transposed(as_mat<T>(b));
  const int64_t width = s.inner(), out = s.a1 * s.b1;
  const int64_t block = rows_per_block((s.a2 * s.b2 + width + out) * int64_t(sizeof(T)));
  at::parallel_for(0, at::divup(s.m, block), 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> buffer(inner ? 0 : block * width);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t m0 = k * block, rows = std::min(block, s.m - m0);
      T* t = inner ? inner + m0 * width : buffer.data();
      T* yb = y + m0 * out;
      T beta = 0;
      if (bias) {
        for (int64_t r = 0; r < rows; ++r) std::copy(bias, bias + out, yb + r * out);
        beta = 1;
      }
      if (s.b_first()) {  // T_m = X_m B^T, then y_m = s * A T_m
        row_gemm<T>(rows, s.a2, s.b1, s.b2, 1, starting_at(X, m0), repeated(Bt), 0, t, width,
                    s.b1);
        gemm_batch<T>(rows, s.a1, s.b1, s.a2, scale, repeated(A), {t, width, s.b1, false}, beta,
                      yb, out, s.b1);
      } else {  // Z_m = A X_m, then the block's rows at once: y = s * Z B^T
        gemm_batch<T>(rows, s.a1, s.b2, s.a2, 1, repeated(A), starting_at(X, m0), 0, t, width,
                      s.b2);
        gemm<T>(rows * s.a1, s.b1, s.b2, scale, {t, s.b2, false}, Bt, beta, yb, s.b1);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor& a_in,
                                           const at::Tensor& b_in,
                                           const std::optional<at::Tensor>& bias_in, double scale,
                                           bool keep) {
  const Shape s = rows_shape(kRows, x_in, a_in, b_in);
  if (bias_in) {
    check_like(kRows, "bias", *bias_in, x_in.scalar_type());
    TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == s.a1 * s.b1, kRows,
                      ": bias must have shape (a1*b1,) = (", s.a1 * s.b1, ",), got ",
                      bias_in->sizes());
  }
  const at::ScalarType dtype = x_in.scalar_type(), work = work_type(dtype);
  if (work == at::kBFloat16)
    return kron_forward_bf16(x_in, a_in, b_in, bias_in, scale, s.b_first(), keep);
  at::Tensor x = x_in.to(work), a = a_in.to(work), b = b_in.to(work);
  at::Tensor bias = bias_in ? bias_in->to(work).contiguous() : at::Tensor();
  at::Tensor y = at::empty({s.m, s.a1 * s.b1}, x.options());
  at::Tensor inner = keep ? at::empty({s.m, s.b_first() ? s.a2 : s.a1,
                                       s.b_first() ? s.b1 : s.b2}, x.options())
                          : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(work, "kron_rows", [&] {
    rows_forward<scalar_t>(s, x, a, b, bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                           static_cast<scalar_t>(scale), y.mutable_data_ptr<scalar_t>(),
                           keep ? inner.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {y.to(dtype), inner.to(kept_type(dtype))};
}

// dX, dA, dB of y_m = s * A X_m B^T for dy (M, a1, b1). U_m = s A^T dY_m serves
// dX_m = U_m B and dB = sum_m U_m^T X_m; dA = s * sum_m dY_m (X_m B^T)^T or
// s * sum_m (dY_m B) X_m^T, whichever is cheaper. A kept intermediate (`inner`, from the
// forward) replaces its recomputation: X_m B^T for dA, or A X_m for dB = s sum dY_m^T Z_m.
template <class T>
void rows_backward(const Shape& s, at::Tensor dy, at::Tensor x, at::Tensor a, at::Tensor b,
                   const T* inner, T scale, T* dx, T* da, T* db) {
  const Batch<T> DY = as_batch<T>(dy), X = as_batch<T>(x);
  const Mat<T> A = as_mat<T>(a), B = as_mat<T>(b), At = transposed(A), Bt = transposed(B);
  const bool b_first = s.b_first();
  const bool kept_t = inner && b_first, kept_z = inner && !b_first;
  const bool via_t = kept_t || (!kept_z && s.a2 <= s.a1);  // dA through X_m B^T or dY_m B
  const bool need_u = dx || (db && !kept_z);
  const int64_t u_width = s.a2 * s.b1, v_width = via_t ? s.a2 * s.b1 : s.a1 * s.b2;
  const int64_t block = rows_per_block(
      (s.a2 * s.b2 * 2 + s.a1 * s.b1 + u_width + v_width) * int64_t(sizeof(T)));
  const int64_t chunks = chunk_count(s.m, block);
  std::vector<T> da_part(da ? chunks * s.a1 * s.a2 : 0), db_part(db ? chunks * s.b1 * s.b2 : 0);
  for_chunks(s.m, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    std::vector<T> u(need_u ? block * u_width : 0), v(da && !kept_t ? block * v_width : 0);
    T* dap = da ? da_part.data() + c * s.a1 * s.a2 : nullptr;
    T* dbp = db ? db_part.data() + c * s.b1 * s.b2 : nullptr;
    for (int64_t m0 = begin; m0 < end; m0 += block) {
      const int64_t rows = std::min(block, end - m0);
      if (need_u) {
        gemm_batch<T>(rows, s.a2, s.b1, s.a1, scale, repeated(At), starting_at(DY, m0), 0,
                      u.data(), u_width, s.b1);
        if (dx)
          gemm<T>(rows * s.a2, s.b2, s.b1, 1, {u.data(), s.b1, false}, B, 0,
                  dx + m0 * s.a2 * s.b2, s.b2);
        if (db && !kept_z)
          row_gemm<T>(rows, s.b1, s.b2, s.a2, 1, {u.data(), u_width, s.b1, true},
                      starting_at(X, m0), 1, dbp, 0, s.b2);
      }
      if (db && kept_z) {
        for (int64_t r = 0; r < rows; ++r)
          gemm<T>(s.b1, s.b2, s.a1, scale, transposed(DY.at(m0 + r)),
                  {inner + (m0 + r) * s.a1 * s.b2, s.b2, false}, 1, dbp, s.b2);
      }
      if (!da) continue;
      if (via_t) {
        const T* t = kept_t ? inner + m0 * v_width : v.data();
        if (!kept_t)
          row_gemm<T>(rows, s.a2, s.b1, s.b2, 1, starting_at(X, m0), repeated(Bt), 0, v.data(),
                      v_width, s.b1);
        for (int64_t r = 0; r < rows; ++r)
          gemm<T>(s.a1, s.a2, s.b1, scale, DY.at(m0 + r), {t + r * v_width, s.b1, true}, 1, dap,
                  s.a2);
      } else {
        row_gemm<T>(rows, s.a1, s.b2, s.b1, 1, starting_at(DY, m0), repeated(B), 0, v.data(),
                    v_width, s.b2);
        for (int64_t r = 0; r < rows; ++r)
          gemm<T>(s.a1, s.a2, s.b2, scale, {v.data() + r * v_width, s.b2, false},
                  transposed(X.at(m0 + r)), 1, dap, s.a2);
      }
    }
  });
  if (da) sum_chunks(da_part, chunks, da, s.a1 * s.a2);
  if (db) sum_chunks(db_part, chunks, db, s.b1 * s.b2);
}

// rows_backward with each block of rows mode-major (dY (a1, k, b1), X (a2, k, b2)): every
// product, the sums over rows included, is one GEMM on the block, in the forward's order:
//   X B^T first: U (a2, k, b1) = s A^T dY;  dX = U B;  dB += U^T X;  dA += s dY (X B^T)^T
//   A X first:   V (a1, k, b2) = s dY B;    dX = A^T V;  dA += V X^T;  dB += s dY^T (A X)
// (sums over the rows (i, m) of the mode-major layout: one GEMM with the rows folded).
template <class T>
void rows_backward_mode_major(const Shape& s, const at::Tensor& dy, const at::Tensor& x,
                              at::Tensor a, at::Tensor b, T scale, T* dx, T* da, T* db) {
  const Mat<T> A = as_mat<T>(a), B = as_mat<T>(b), At = transposed(A), Bt = transposed(B);
  const bool b_first = s.b_first();
  const int64_t in = s.a2 * s.b2, out = s.a1 * s.b1;
  const int64_t width = b_first ? s.a2 * s.b1 : s.a1 * s.b2;  // U and X B^T, or V and A X
  const int64_t block = rows_per_block((in * 2 + out + width * 2) * int64_t(sizeof(T)));
  const int64_t chunks = chunk_count(s.m, block);
  std::vector<T> da_part(da ? chunks * s.a1 * s.a2 : 0), db_part(db ? chunks * s.b1 * s.b2 : 0);
  const T* xp = x.const_data_ptr<T>();
  const T* dyp = dy.const_data_ptr<T>();
  for_chunks(s.m, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    std::vector<T> xb(block * in), gb(block * out), u(block * width), t(block * width);
    T* dap = da ? da_part.data() + c * s.a1 * s.a2 : nullptr;
    T* dbp = db ? db_part.data() + c * s.b1 * s.b2 : nullptr;
    for (int64_t m0 = begin; m0 < end; m0 += block) {
      const int64_t k = std::min(block, end - m0);
      const int64_t kb1 = k * s.b1, kb2 = k * s.b2;
      to_mode_major(dyp + m0 * dy.stride(0), dy.strides(), k, s.a1, s.b1, gb.data());
      if (da || db) to_mode_major(xp + m0 * x.stride(0), x.strides(), k, s.a2, s.b2, xb.data());
      if (b_first) {
        if (dx || db)
          gemm<T>(s.a2, kb1, s.a1, scale, At, {gb.data(), kb1, false}, 0, u.data(), kb1);
        if (db)
          gemm<T>(s.b1, s.b2, s.a2 * k, 1, {u.data(), s.b1, true}, {xb.data(), s.b2, false}, 1,
                  dbp, s.b2);
        if (da) {
          gemm<T>(s.a2 * k, s.b1, s.b2, 1, {xb.data(), s.b2, false}, Bt, 0, t.data(), s.b1);
          gemm<T>(s.a1, s.a2, kb1, scale, {gb.data(), kb1, false}, {t.data(), kb1, true}, 1, dap,
                  s.a2);
        }
        if (dx)  // dX (a2, k, b2) into X's buffer, which is no longer needed
          gemm<T>(s.a2 * k, s.b2, s.b1, 1, {u.data(), s.b1, false}, B, 0, xb.data(), s.b2);
      } else {
        if (dx || da)
          gemm<T>(s.a1 * k, s.b2, s.b1, scale, {gb.data(), s.b1, false}, B, 0, u.data(), s.b2);
        if (da)
          gemm<T>(s.a1, s.a2, kb2, 1, {u.data(), kb2, false}, {xb.data(), kb2, true}, 1, dap, s.a2);
        if (db) {
          gemm<T>(s.a1, kb2, s.a2, 1, A, {xb.data(), kb2, false}, 0, t.data(), kb2);
          gemm<T>(s.b1, s.b2, s.a1 * k, scale, {gb.data(), s.b1, true}, {t.data(), s.b2, false}, 1,
                  dbp, s.b2);
        }
        if (dx) gemm<T>(s.a2, kb2, s.a1, 1, At, {u.data(), kb2, false}, 0, xb.data(), kb2);
      }
      if (dx) from_mode_major(xb.data(), k, s.a2, s.b2, dx + m0 * in);
    }
  });
  if (da) sum_chunks(da_part, chunks, da, s.a1 * s.a2);
  if (db) sum_chunks(db_part, chunks, db, s.b1 * s.b2);
}

// G (P, R) = s * sum_m dy_m f x_m^T for dy (M, P, N), f (N, Q), x (M, R, Q): through
// V_m = f x_m^T or W_m = dy_m f, whichever is cheaper.
template <class T>
void factor_grad(at::Tensor dy, at::Tensor f, at::Tensor x, T scale, T* g) {
  const int64_t m = dy.size(0), p = dy.size(1), n = dy.size(2), q = f.size(1), r = x.size(1);
  const Batch<T> DY = as_batch<T>(dy), X = as_batch<T>(x);
  const Mat<T> F = as_mat<T>(f);
  const bool via_v = n * q * r + p * n * r <= p * n * q + p * q * r;
  const int64_t width = via_v ? n * r : p * q;
  const int64_t chunks = chunk_count(m, 1);
  std::vector<T> parts(chunks * p * r);
  for_chunks(m, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    std::vector<T> v(width);
    T* gp = parts.data() + c * p * r;
    for (int64_t i = begin; i < end; ++i) {
      if (via_v) {
        gemm<T>(n, r, q, 1, F, transposed(X.at(i)), 0, v.data(), r);
        gemm<T>(p, r, n, scale, DY.at(i), {v.data(), r, false}, 1, gp, r);
      } else {
        gemm<T>(p, q, n, 1, DY.at(i), F, 0, v.data(), q);
        gemm<T>(p, r, q, scale, {v.data(), q, false}, transposed(X.at(i)), 1, gp, r);
      }
    }
  });
  sum_chunks(parts, chunks, g, p * r);
}

}  // namespace

at::Tensor kron_mode(const at::Tensor& x_in, const at::Tensor& f_in) {
  check_floating(kMode, "x", x_in);
  check_like(kMode, "f", f_in, x_in.scalar_type());
  TORCH_CHECK_VALUE(x_in.dim() == 3 && f_in.dim() == 2 && f_in.size(1) == x_in.size(1), kMode,
                    ": x must have shape (M, q, r) and f (p, q), got ", x_in.sizes(), " and ",
                    f_in.sizes());
  const at::ScalarType dtype = x_in.scalar_type(), work = work_type(dtype);
  if (work == at::kBFloat16) return kron_mode_bf16(x_in, f_in);
  at::Tensor x = x_in.to(work), f = f_in.to(work);
  const int64_t m = x.size(0), q = x.size(1), r = x.size(2), p = f.size(0);
  at::Tensor y = at::empty({m, p, r}, x.options());
  AT_DISPATCH_FLOATING_TYPES(work, "kron_mode", [&] {
    using T = scalar_t;
    const Batch<T> X = as_batch<T>(x);
    const Mat<T> F = as_mat<T>(f);
    T* out = y.mutable_data_ptr<T>();
    const int64_t block = rows_per_block((q + p) * r * int64_t(sizeof(T)));
    at::parallel_for(0, at::divup(m, block), 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t m0 = k * block, rows = std::min(block, m - m0);
        gemm_batch<T>(rows, p, r, q, 1, repeated(F), starting_at(X, m0), 0, out + m0 * p * r,
                      p * r, r);
      }
    });
  });
  return y.to(dtype);
}

at::Tensor kron_rows(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                     const std::optional<at::Tensor>& bias, double scale) {
  return std::get<0>(forward(x, a, b, bias, scale, false));
}

std::tuple<at::Tensor, at::Tensor> kron_rows_keep(const at::Tensor& x, const at::Tensor& a,
                                                  const at::Tensor& b,
                                                  const std::optional<at::Tensor>& bias,
                                                  double scale) {
  return forward(x, a, b, bias, scale, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_rows_grads(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& a_in, const at::Tensor& b_in,
    double scale, bool need_x, bool need_a, bool need_b,
    const std::optional<at::Tensor>& inner_in) {
  const Shape s = rows_shape(kGrads, x_in, a_in, b_in);
  check_like(kGrads, "dy", dy_in, x_in.scalar_type());
  TORCH_CHECK_VALUE(dy_in.dim() == 3 && dy_in.size(0) == s.m && dy_in.size(1) == s.a1 &&
                        dy_in.size(2) == s.b1,
                    kGrads, ": dy must have shape (M, a1, b1) = (", s.m, ", ", s.a1, ", ", s.b1,
                    "), got ", dy_in.sizes());
  const at::ScalarType dtype = dy_in.scalar_type();
  at::ScalarType work = work_type(dtype);
  at::Tensor inner;
  if (inner_in) {
    const std::vector<int64_t> expected = {s.m, s.b_first() ? s.a2 : s.a1,
                                           s.b_first() ? s.b1 : s.b2};
    TORCH_CHECK_VALUE(inner_in->sizes() == at::IntArrayRef(expected), kGrads,
                      ": inner must have shape ", at::IntArrayRef(expected), ", got ",
                      inner_in->sizes());
    check_like(kGrads, "inner", *inner_in, kept_type(dtype));
    inner = inner_in->to(work).contiguous();
  }
  if (work == at::kBFloat16) {
    if (!need_x) {  // dA and dB alone: mode-major
      auto [da, db] = kron_factor_grads_bf16_mode_major(dy_in, x_in, a_in, b_in, scale,
                                                        s.b_first(), need_a, need_b, inner);
      return {at::empty({0}, dy_in.options()), da, db};
    }
    // With dX: rows transposed, except per row for large row products with a factor under 16
    // columns (GEMMs of so few columns on rows transposed).
    const auto grads = s.small_rows(true) || std::min(s.a2, s.b2) >= 16
                           ? kron_grads_bf16_rows_transposed
                           : kron_grads_bf16;
    return grads(dy_in, x_in, a_in, b_in, scale, s.b_first(), need_x, need_a, need_b, inner);
  }
  at::Tensor dy = dy_in.to(work), x = x_in.to(work), a = a_in.to(work), b = b_in.to(work);
  const auto opts = dy.options();
  at::Tensor dx = need_x ? at::empty({s.m, s.a2, s.b2}, opts) : at::empty({0}, opts);
  at::Tensor da = need_a ? at::empty({s.a1, s.a2}, opts) : at::empty({0}, opts);
  at::Tensor db = need_b ? at::empty({s.b1, s.b2}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(work, "kron_rows_grads", [&] {
    if (s.mode_major(need_x)) {  // recomputes a kept intermediate in cache
      rows_backward_mode_major<scalar_t>(s, dy, x, a, b, static_cast<scalar_t>(scale),
                                         need_x ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                                         need_a ? da.mutable_data_ptr<scalar_t>() : nullptr,
                                         need_b ? db.mutable_data_ptr<scalar_t>() : nullptr);
      return;
    }
    rows_backward<scalar_t>(s, dy, x, a, b,
                            inner.defined() ? inner.const_data_ptr<scalar_t>() : nullptr,
                            static_cast<scalar_t>(scale),
                            need_x ? dx.mutable_data_ptr<scalar_t>() : nullptr,
                            need_a ? da.mutable_data_ptr<scalar_t>() : nullptr,
                            need_b ? db.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {dx.to(dtype), da.to(dtype), db.to(dtype)};
}

at::Tensor kron_factor_grad(const at::Tensor& dy_in, const at::Tensor& f_in,
                            const at::Tensor& x_in, double scale) {
  check_floating(kFactorGrad, "dy", dy_in);
  check_like(kFactorGrad, "f", f_in, dy_in.scalar_type());
  check_like(kFactorGrad, "x", x_in, dy_in.scalar_type());
  TORCH_CHECK_VALUE(dy_in.dim() == 3 && f_in.dim() == 2 && x_in.dim() == 3 &&
                        f_in.size(0) == dy_in.size(2) && x_in.size(0) == dy_in.size(0) &&
                        x_in.size(2) == f_in.size(1),
                    kFactorGrad, ": expected dy (M, P, N), f (N, Q), x (M, R, Q), got ",
                    dy_in.sizes(), ", ", f_in.sizes(), ", ", x_in.sizes());
  const at::ScalarType dtype = dy_in.scalar_type(), work = float_type(dtype);
  at::Tensor dy = dy_in.to(work), f = f_in.to(work), x = x_in.to(work);
  at::Tensor g = at::empty({dy.size(1), x.size(1)}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(work, "kron_factor_grad", [&] {
    factor_grad<scalar_t>(dy, f, x, static_cast<scalar_t>(scale), g.mutable_data_ptr<scalar_t>());
  });
  return g.to(dtype);
}

}  // namespace kronops::native
