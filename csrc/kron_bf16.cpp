// The Kronecker kernels in bf16 on torch's bf16 GEMMs (kron_bf16.h). Where the native fp32
// kernels block rows for the cache and call the BLAS on raw pointers, these are whole-tensor
// ATen products: torch's bf16 GEMMs (oneDNN, on AMX tiles or AVX512-BF16 dot products) run
// 2-7x the fp32 GEMM rate on such CPUs, more than blocking gains. Per row: sums over rows
// (dA, dB) are one GEMM with the rows folded into its inner dimension (dB in X B^T-first
// order, dA in A X-first order), or one batched product summed over the rows in fp32; a
// factor applied to every row is a batched product with the factor repeated, no copies.
// Mode-major: dY and X copied once with their rows moved inside, then only GEMMs. Rows
// transposed: every product a GEMM with the rows folded into its rows or its inner dimension,
// a factor on the left of every row taken as the transposed product on the rows transposed
// (copies of three operands with each row transposed in place, which stay in cache).
#include "kron_bf16.h"

#include <ATen/ATen.h>

#include "row_transpose.h"

namespace kronops::native {
namespace {

// s * t, rounded to bf16 (t itself when s = 1).
at::Tensor scaled(const at::Tensor& t, double s) { return s == 1.0 ? t : t * s; }

// F t_m for every row m of t (M, q, r), F (p, q): one batched product with F repeated
// (stride 0; ATen's bf16 bmm makes the repeated F contiguous first, M p q elements, which a
// chunked bmm on a small repeated F did not beat warm; at::matmul would copy t transposed
// to fold it, slower here even at 16x24x16 row products: bench/NOTES.md).
at::Tensor each_left(const at::Tensor& f, const at::Tensor& t) {
  return at::bmm(f.expand({t.size(0), f.size(0), f.size(1)}), t);
}

// sum_m L_m R_m^T for L (M, p, n) and R (M, r, n): one batched product summed over m in fp32,
// rounded once. (One GEMM on mode-major copies of both ran slower: bench/NOTES.md.)
at::Tensor summed_products(const at::Tensor& l, const at::Tensor& r) {
  return at::bmm(l, r.transpose(1, 2)).sum(0, false, at::kFloat).to(l.scalar_type());
}

// t (M, p, q) as one (M*p, q) matrix.
at::Tensor folded(const at::Tensor& t) { return t.reshape({-1, t.size(2)}); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> kron_forward_bf16(const at::Tensor& x, const at::Tensor& a,
                                                     const at::Tensor& b,
                                                     const std::optional<at::Tensor>& bias,
                                                     double scale, bool b_first, bool keep) {
  const int64_t m = x.size(0), out = a.size(0) * b.size(0);
  at::Tensor inner, y;
  if (b_first) {  // T_m = X_m B^T (one GEMM, rows folded), then y_m = (s A) T_m
    inner = at::matmul(x, b.t());
    y = each_left(scaled(a, scale), inner);
  } else {  // Z_m = A X_m, then y = Z (s B)^T (one GEMM)
    inner = each_left(a, x);
    y = at::matmul(inner, scaled(b, scale).t());
  }
  y = y.reshape({m, out});
  if (bias) y = y + *bias;
  return {y, keep ? inner : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_grads_bf16(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
    double scale, bool b_first, bool need_x, bool need_a, bool need_b, const at::Tensor& inner) {
  const int64_t m = x.size(0);
  at::Tensor dx = at::empty({0}, dy.options()), da = dx, db = dx;
  if (b_first) {
    // U_m = s A^T dY_m: dX_m = U_m B, dB = sum_m U_m^T X_m; dA = s sum_m dY_m T_m^T
    if (need_x || need_b) {
      const at::Tensor u = each_left(scaled(a, scale).t(), dy);  // (M, a2, b1)
      if (need_x) dx = at::matmul(u, b);
      if (need_b) db = at::mm(u.reshape({m * a.size(1), b.size(0)}).t(),
                              x.reshape({m * a.size(1), b.size(1)}));
    }
    if (need_a)
      da = summed_products(dy, inner.defined() ? inner : at::matmul(x, scaled(b, scale).t()));
    if (need_a && inner.defined() && scale != 1.0) da = da * scale;
  } else {
    // V_m = s dY_m B: dX_m = A^T V_m, dA = sum_m V_m X_m^T; dB = s sum_m dY_m^T Z_m
    if (need_x || need_a) {
      const at::Tensor v = at::matmul(dy, scaled(b, scale));  // (M, a1, b2)
      if (need_x) dx = each_left(a.t(), v);
      if (need_a) da = summed_products(v, x);
    }
    if (need_b) {
      const at::Tensor z = inner.defined() ? inner : each_left(a, x);  // (M, a1, b2)
      db = scaled(at::mm(dy.reshape({m * a.size(0), b.size(0)}).t(),
                         z.reshape({m * a.size(0), b.size(1)})), scale);
    }
  }
  return {dx, da, db};
}

std::tuple<at::Tensor, at::Tensor> kron_factor_grads_bf16_mode_major(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
    double scale, bool b_first, bool need_a, bool need_b, const at::Tensor& inner) {
  const int64_t m = x.size(0), a1 = a.size(0), a2 = a.size(1), b1 = b.size(0), b2 = b.size(1);
  // dY (a1, M*b1) and X (a2, M*b2): every product below is one GEMM with the rows folded in.
  const at::Tensor dyp = dy.transpose(0, 1).contiguous().view({a1, m * b1});
  const bool need_xp = b_first ? need_b || (need_a && !inner.defined())
                               : need_a || (need_b && !inner.defined());
  const at::Tensor xp =
      need_xp ? x.transpose(0, 1).contiguous().view({a2, m * b2}) : at::Tensor();
  // The kept intermediate, mode-major: (a2, M, b1) = X B^T or (a1, M, b2) = A X.
  const auto kept_mode_major = [&](int64_t p, int64_t q) {
    return inner.transpose(0, 1).contiguous().view({p, m * q});
  };
  at::Tensor da = at::empty({0}, dy.options()), db = da;
  if (b_first) {
    // U = s A^T dY (a2, M, b1): dB = U^T X; dA = s dY (X B^T)^T
    if (need_b) {
      const at::Tensor u = at::mm(scaled(a, scale).t(), dyp);  // (a2, M*b1)
      db = at::mm(u.view({a2 * m, b1}).t(), xp.view({a2 * m, b2}));
    }
    if (need_a) {
      const at::Tensor t = inner.defined()
                               ? kept_mode_major(a2, b1)
                               : at::mm(xp.view({a2 * m, b2}), b.t()).view({a2, m * b1});
      da = scaled(at::mm(dyp, t.t()), scale);
    }
  } else {
    // V = s dY B (a1, M, b2): dA = V X^T; dB = s dY^T (A X)
    if (need_a) {
      const at::Tensor v = at::mm(dyp.view({a1 * m, b1}), scaled(b, scale)).view({a1, m * b2});
      da = at::mm(v, xp.t());
    }
    if (need_b) {
      const at::Tensor z = inner.defined() ? kept_mode_major(a1, b2) : at::mm(a, xp);
      db = scaled(at::mm(dyp.view({a1 * m, b1}).t(), z.view({a1 * m, b2})), scale);
    }
  }
  return {da, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_grads_bf16_rows_transposed(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
    double scale, bool b_first, bool need_x, bool need_a, bool need_b, const at::Tensor& inner) {
  const int64_t m = x.size(0), a1 = a.size(0), a2 = a.size(1), b1 = b.size(0), b2 = b.size(1);
  at::Tensor dx = at::empty({0}, dy.options()), da = dx, db = dx;
  // A buffer is used again once dead (buffer_of): 3 of the 5 activation-sized buffers below.
  if (b_first) {
    // U_m = s A^T dY_m as its transpose s dY_m^T A: dX = U B, dB = U^T X; dA = s dY^T (X B^T)
    // with the sum over rows on both operands transposed (m, b1 folded).
    const at::Tensor dyt = rows_transposed(dy);  // (M, b1, a1)
    at::Tensor spare;
    if (need_a) {
      const at::Tensor t = inner.defined() ? inner : at::matmul(x, b.t());  // (M, a2, b1)
      spare = rows_transposed(t);                                            // (M, b1, a2)
      da = scaled(at::mm(folded(dyt).t(), folded(spare)), scale);
    }
    if (need_x || need_b) {
      at::Tensor ut = buffer_of(spare, {m * b1, a2}, dy);                   // (M b1, a2)
      at::mm_out(ut, folded(dyt), scaled(a, scale));
      const at::Tensor u = rows_transposed(ut.view({m, b1, a2}), dyt);      // (M, a2, b1)
      if (need_x) dx = at::mm(folded(u), b).view({m, a2, b2});
      if (need_b) db = at::mm(folded(u).t(), folded(x));
    }
  } else {
    // V = s dY B (a1 folded): dX_m = A^T V_m as (V_m^T A)^T; dA = sum_m V_m X_m^T on both
    // transposed (m, b2 folded); dB = s dY^T (A X) (m, a1 folded).
    if (need_x || need_a) {
      at::Tensor spare = at::mm(folded(dy), scaled(b, scale));               // (M a1, b2)
      const at::Tensor vt = rows_transposed(spare.view({m, a1, b2}));        // (M, b2, a1)
      if (need_x) {
        at::Tensor w = buffer_of(spare, {m * b2, a2}, dy);
        at::mm_out(w, folded(vt), a);
        dx = rows_transposed(w.view({m, b2, a2}));
        spare = w;
      }
      if (need_a) da = at::mm(folded(vt).t(), folded(rows_transposed(x, spare)));
    }
    if (need_b) {
      const at::Tensor z = inner.defined() ? inner : each_left(a, x);  // (M, a1, b2)
      db = scaled(at::mm(folded(dy).t(), folded(z)), scale);
    }
  }
  return {dx, da, db};
}

at::Tensor kron_mode_bf16(const at::Tensor& x, const at::Tensor& f) { return each_left(f, x); }

}  // namespace kronops::native
