// CPU kernels of the S²FT ops: the frozen GEMM (x W^T, dY W) as one ATen call on the whole
// tensors, then the Δ product on selected rows or columns without a gathered copy of the
// activations: per block of rows (about half a core's L2), the selected columns are gathered
// into a buffer that feeds the GEMM, or the GEMM's result is added into the selected
// columns, while the block is in cache. A contiguous selection (a range) needs no gather:
// the GEMM reads and writes a strided view. The in-place AdamW is one fused pass over the
// selected elements. fp32 and fp64 take these kernels above 1M gathered elements; below it,
// and in fp16 and bf16, the products are ATen GEMMs on whole operands (bf16 GEMMs where the
// CPU has bf16 instructions), the selected columns gathered into a copy or added into the
// result by row-parallel loops (ATen's index_select and index_add_ along columns were slower,
// and its index_add_ copied a bf16 result twice). The merged weight W'
// (sparse_linear's merged route), in every dtype: a copy of W with the selected elements
// added in place, each rounded once as ATen's add rounds it. Index values are checked
// on every call (IndexError), also inside compiled graphs, where the host skips the check.
// The PyTorch and Triton kernels apply the same checks (kronops/s2ft/ops.py): keep them alike.
#include "kronops_kernels.h"  // generated: the kernels' declarations

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "blas.h"
#include "checks.h"
#include "parallel.h"

namespace kronops::native {
namespace {

constexpr const char* kLinear = "kronops::sparse_linear";
constexpr const char* kInputGrad = "kronops::sparse_input_grad";
constexpr const char* kDeltaGrad = "kronops::sparse_delta_grad";
constexpr const char* kMergedWeight = "kronops::sparse_merged_weight";
constexpr const char* kAdamW = "kronops::sparse_adamw";

bool blas_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

template <class T>
Mat<T> sub(Mat<T> m, int64_t r0, int64_t c0) {
  return {m.trans ? m.p + c0 * m.ld + r0 : m.p + r0 * m.ld + c0, m.ld, m.trans};
}

// A selection: `count` positions along a dimension of `size`, index values or a range at start.
struct Selection {
  at::Tensor index;  // contiguous int64, or undefined for a range
  int64_t start, count;
  int64_t at(int64_t j) const { return index.defined() ? index.const_data_ptr<int64_t>()[j] : start + j; }
};

// `index` with `count` positions in [0, size), or the range [start, start + count) inside
// [0, size]; `counted` names what fixes the count ("delta has").
Selection selection(const char* op, const std::optional<at::Tensor>& index, int64_t start,
                    int64_t count, const char* counted, int64_t size) {
  if (index) {
    TORCH_CHECK_VALUE(index->numel() == count, op, ": index has ", index->numel(),
                      " positions but ", counted, " ", count);
    return {checked_index(op, "index", *index, size), 0, count};
  }
  TORCH_CHECK_VALUE(start >= 0 && start + count <= size, op, ": the range [", start, ", ",
                    start + count, ") of index must lie in [0, ", size, "]");
  return {at::Tensor(), start, count};
}

// A gathered operand of at most this many elements (x[:, C] or dY[:, R]) is copied and the
// product run as one GEMM on it (ATen: one multi-threaded BLAS call), as the PyTorch kernels
// do: at 512 rows x 25 selected the blocked no-copy kernels below took 10-190% longer on 2
// threads (small per-thread GEMMs); larger operands take them and never hold the copy.
constexpr int64_t kCopiedGatherElements = int64_t{1} << 20;

bool copies_gather(const at::Tensor& t, const Selection& sel) {
  return !blas_dtype(t) || t.size(0) * sel.count <= kCopiedGatherElements;
}

// Rows a task of a row-parallel pass over `k` selected columns takes: about 16K elements.
int64_t rows_per_task(int64_t k) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(k, 1)); }

// t[:, sel] (M, k) as a contiguous copy, rows in parallel, any dtype (ATen's index_select
// along columns took 0.15-0.4 ms for 1024 rows of 51-102 bf16 columns: bench/NOTES.md).
at::Tensor gathered_columns(const at::Tensor& t, const Selection& sel) {
  at::Tensor out = at::empty({t.size(0), sel.count}, t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "gathered_columns", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t k = sel.count, s0 = t.stride(0), s1 = t.stride(1);
    const int64_t* idx = sel.index.const_data_ptr<int64_t>();
    at::parallel_for(0, t.size(0), rows_per_task(k), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < k; ++j) dst[r * k + j] = src[r * s0 + idx[j] * s1];
    });
  });
  return out;
}

// out[:, sel(j)] += p[:, j] for out (M, n) and p (M, k), both of any strides, any dtype:
// each sum in the op math type, rounded once, as ATen's add and index_add_ round it
// (index_add_ copied a bf16 out twice along columns: bench/NOTES.md). Rows in parallel, each
// task column by column over its rows; a repeated position sums in index order. Returns out.
at::Tensor add_into_columns(const at::Tensor& out, const Selection& sel, const at::Tensor& p) {
  std::vector<int64_t> columns(sel.count);  // read once, not through the tensor per element
  for (int64_t j = 0; j < sel.count; ++j) columns[j] = sel.at(j);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "add_into_columns", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t* src = p.const_data_ptr<scalar_t>();
    const int64_t os0 = out.stride(0), os1 = out.stride(1), ps0 = p.stride(0), ps1 = p.stride(1);
    at::parallel_for(0, out.size(0), rows_per_task(sel.count), [&](int64_t r0, int64_t r1) {
      for (int64_t j = 0; j < sel.count; ++j)
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t& e = o[r * os0 + columns[j] * os1];
          e = static_cast<scalar_t>(static_cast<acc_t>(e) + static_cast<acc_t>(src[r * ps0 + j * ps1]));
        }
    });
  });
  return out;
}

int64_t block_rows(int64_t row_elements, int64_t element_bytes) {
  return rows_per_block(row_elements * element_bytes);
}

// out[:, :] += G W for each block of rows, G[r, j] = src[r, sel(j)] gathered into a buffer:
// src (M, *), W (k, n), out (M, n) contiguous.
template <class T>
void gather_gemm(const at::Tensor& src, const Selection& sel, Mat<T> w, int64_t n, T* out) {
  const int64_t m = src.size(0), k = sel.count, s0 = src.stride(0), s1 = src.stride(1);
  const T* p = src.const_data_ptr<T>();
  const int64_t block = block_rows(k + n, sizeof(T));
  at::parallel_for(0, at::divup(m, block), 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> g(block * k);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * block, rows = std::min(block, m - m0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < k; ++j) g[r * k + j] = p[(m0 + r) * s0 + sel.at(j) * s1];
      gemm<T>(rows, n, k, 1, {g.data(), k, false}, w, 1, out + m0 * n, n);
    }
  });
}

// out[:, sel(j)] += (src W)[:, j] for each block of rows: src (M, kk), W (kk, k), out (M, n)
// contiguous; the block's product is formed in a buffer and added into the selected columns.
template <class T>
void gemm_scatter(const at::Tensor& src_in, Mat<T> w, const Selection& sel, int64_t n, T* out) {
  at::Tensor src = src_in;
  const Mat<T> s = as_mat<T>(src);
  const int64_t m = src.size(0), kk = src.size(1), k = sel.count;
  const int64_t block = block_rows(kk + k + n, sizeof(T));
  at::parallel_for(0, at::divup(m, block), 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(block * k);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * block, rows = std::min(block, m - m0);
      gemm<T>(rows, k, kk, 1, sub(s, m0, 0), w, 0, buf.data(), k);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < k; ++j) out[(m0 + r) * n + sel.at(j)] += buf[r * k + j];
    }
  });
}

// dΔ (k, q) = src[:, sel]^T X for src (M, *), x (M, q): parallel over column chunks of X
// (for_chunks; no partial sums); each thread gathers the selected columns of a block of rows,
// then accumulates one GEMM into its columns of the result.
template <class T>
void gathered_t_gemm(const at::Tensor& src, const Selection& sel, const at::Tensor& x_in, T* out) {
  at::Tensor x = x_in;
  const Mat<T> X = as_mat<T>(x);
  const int64_t m = src.size(0), k = sel.count, q = x.size(1), s0 = src.stride(0), s1 = src.stride(1);
  const T* p = src.const_data_ptr<T>();
  std::fill(out, out + k * q, T(0));
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), q / 64));
  for_chunks(q, chunks, [&](int64_t, int64_t q0, int64_t q1) {
    const int64_t width = q1 - q0, block = block_rows(k + width, sizeof(T));
    std::vector<T> g(block * k);
    for (int64_t m0 = 0; m0 < m; m0 += block) {
      const int64_t rows = std::min(block, m - m0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < k; ++j) g[r * k + j] = p[(m0 + r) * s0 + sel.at(j) * s1];
      gemm<T>(k, width, rows, 1, {g.data(), k, true}, sub(X, m0, q0), 1, out + q0, q);
    }
  });
}

void check_2d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

// Checks x/dy (M, k_in), weight (out, in) and delta against the mode; returns the selection.
Selection linear_args(const char* op, const char* first, const at::Tensor& t, int64_t t_width,
                      const at::Tensor& weight, const at::Tensor& delta,
                      const std::optional<at::Tensor>& index, int64_t start, bool cols) {
  check_floating(op, first, t);
  check_like(op, "weight", weight, t.scalar_type());
  check_like(op, "delta", delta, t.scalar_type());
  check_2d(op, first, t);
  check_2d(op, "weight", weight);
  check_2d(op, "delta", delta);
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK_VALUE(t.size(1) == t_width, op, ": ", first, " must have ", t_width,
                    " columns for weight of shape ", weight.sizes(), ", got ", t.sizes());
  if (cols) {
    TORCH_CHECK_VALUE(delta.size(0) == out, op, ": delta must have shape (out, |C|) with out = ",
                      out, ", got ", delta.sizes());
    return selection(op, index, start, delta.size(1), "delta has", in);
  }
  TORCH_CHECK_VALUE(delta.size(1) == in, op, ": delta must have shape (|R|, in) with in = ", in,
                    ", got ", delta.sizes());
  return selection(op, index, start, delta.size(0), "delta has", out);
}

// torch.optim.AdamW's arithmetic on one row of `q` selected elements, as the PyTorch kernel
// does it (kronops/s2ft/torch_kernels.py): s the values (master or weight), g the gradient, m and
// v the moments, all contiguous. One loop with no index or branch in it, so it vectorises; an
// AVX2 clone is picked at run time where the CPU has it (no FMA contraction: AVX2 alone, so
// every clone rounds as the scalar loop does).
struct AdamWStep {
  double decay, w1, w2, beta2, root_bc2, step_size, eps;

  AdamWStep(double lr, double beta1, double beta2_, double eps_, double weight_decay, int64_t step)
      : decay(1 - lr * weight_decay), w1(1 - beta1), w2(1 - beta2_), beta2(beta2_),
        root_bc2(std::sqrt(1 - std::pow(beta2_, double(step)))),
        step_size(-lr / (1 - std::pow(beta1, double(step)))), eps(eps_) {}
};

template <class S>
[[gnu::always_inline]] inline void adamw_row_body(S* __restrict s, const S* __restrict g,
                                                  S* __restrict m, S* __restrict v, int64_t q,
                                                  const AdamWStep& c) {
  const S decay = S(c.decay), w1 = S(c.w1), w2 = S(c.w2), b2 = S(c.beta2), e = S(c.eps);
  const S root_bc2 = S(c.root_bc2), step_size = S(c.step_size);
  const bool small_weight = w1 < S(0.5);  // torch.lerp: start + w (end - start) for w < 0.5
  for (int64_t j = 0; j < q; ++j) {
    const S gj = g[j], mj = m[j], diff = gj - mj;
    const S mn = small_weight ? mj + w1 * diff : gj - diff * (S(1) - w1);
    const S vn = v[j] * b2 + w2 * gj * gj;
    const S denom = std::sqrt(vn) / root_bc2 + e;
    s[j] = s[j] * decay + step_size * (mn / denom);
    m[j] = mn;
    v[j] = vn;
  }
}

[[gnu::target_clones("avx2", "default")]] void adamw_row(float* s, const float* g, float* m,
                                                         float* v, int64_t q,
                                                         const AdamWStep& c) {
  adamw_row_body(s, g, m, v, q, c);
}

[[gnu::target_clones("avx2", "default")]] void adamw_row(double* s, const double* g, double* m,
                                                         double* v, int64_t q,
                                                         const AdamWStep& c) {
  adamw_row_body(s, g, m, v, q, c);
}

// The update of the selected submatrix of `weight`, row by row of grad (p, q): each row's
// values are gathered into a buffer (or are the master row), updated, and written back.
template <class W, class S>
void adamw_loop(const at::Tensor& weight, const at::Tensor& grad, const at::Tensor& m,
                const at::Tensor& v, S* master, const Selection& sel, bool cols,
                const AdamWStep& c) {
  const int64_t p = grad.size(0), q = grad.size(1), ws0 = weight.stride(0), ws1 = weight.stride(1);
  W* w = weight.mutable_data_ptr<W>();
  const S* g = grad.const_data_ptr<S>();
  S* mp = m.mutable_data_ptr<S>();
  S* vp = v.mutable_data_ptr<S>();
  std::vector<int64_t> columns(q);  // offsets of a row's selected elements in weight's row
  for (int64_t j = 0; j < q; ++j) columns[j] = (cols ? sel.at(j) : j) * ws1;
  at::parallel_for(0, p, 1, [&](int64_t i0, int64_t i1) {
    std::vector<S> buffer(master ? 0 : q);
    for (int64_t i = i0; i < i1; ++i) {
      W* row = w + (cols ? i : sel.at(i)) * ws0;
      S* s = master ? master + i * q : buffer.data();
      if (!master)
        for (int64_t j = 0; j < q; ++j) s[j] = static_cast<S>(row[columns[j]]);
      adamw_row(s, g + i * q, mp + i * q, vp + i * q, q, c);
      for (int64_t j = 0; j < q; ++j) row[columns[j]] = static_cast<W>(s[j]);
    }
  });
}

}  // namespace

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& delta,
                         const std::optional<at::Tensor>& index, int64_t start,
                         const std::optional<at::Tensor>& bias, bool cols) {
  const Selection sel = linear_args(kLinear, "x", x, weight.dim() == 2 ? weight.size(1) : -1,
                                    weight, delta, index, start, cols);
  if (bias) {
    check_like(kLinear, "bias", *bias, x.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), kLinear,
                      ": bias must have shape (out,) = (", weight.size(0), ",), got ", bias->sizes());
  }
  at::Tensor y = at::linear(x, weight, bias).contiguous();
  const int64_t out = weight.size(0);
  if (!sel.index.defined()) {  // a range: the GEMM reads or writes a strided view
    if (cols) return y.addmm_(x.narrow(1, sel.start, sel.count), delta.t());
    y.narrow(1, sel.start, sel.count).addmm_(x, delta.t());
    return y;
  }
  if (copies_gather(x, sel)) {
    if (cols) return y.addmm_(gathered_columns(x, sel), delta.t());
    return add_into_columns(y, sel, at::matmul(x, delta.t()));
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_linear", [&] {
    at::Tensor d = delta;
    const Mat<scalar_t> dm = as_mat<scalar_t>(d), dt{dm.p, dm.ld, !dm.trans};
    if (cols)  // y += x[:, C] Δ^T
      gather_gemm<scalar_t>(x, sel, dt, out, y.mutable_data_ptr<scalar_t>());
    else  // y[:, R] += x Δ^T
      gemm_scatter<scalar_t>(x, dt, sel, out, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor sparse_input_grad(const at::Tensor& dy, const at::Tensor& weight,
                             const at::Tensor& delta, const std::optional<at::Tensor>& index,
                             int64_t start, bool cols) {
  const Selection sel = linear_args(kInputGrad, "dy", dy, weight.dim() == 2 ? weight.size(0) : -1,
                                    weight, delta, index, start, cols);
  at::Tensor dx = at::mm(dy, weight).contiguous();
  const int64_t in = weight.size(1);
  if (!sel.index.defined()) {
    if (cols) {
      dx.narrow(1, sel.start, sel.count).addmm_(dy, delta);
      return dx;
    }
    return dx.addmm_(dy.narrow(1, sel.start, sel.count), delta);
  }
  if (copies_gather(dy, sel)) {
    if (cols) return add_into_columns(dx, sel, at::mm(dy, delta));
    return dx.addmm_(gathered_columns(dy, sel), delta);
  }
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "sparse_input_grad", [&] {
    at::Tensor d = delta;
    const Mat<scalar_t> dm = as_mat<scalar_t>(d);
    if (cols)  // dX[:, C] += dY Δ
      gemm_scatter<scalar_t>(dy, dm, sel, in, dx.mutable_data_ptr<scalar_t>());
    else  // dX += dY[:, R] Δ
      gather_gemm<scalar_t>(dy, sel, dm, in, dx.mutable_data_ptr<scalar_t>());
  });
  return dx;
}

at::Tensor sparse_delta_grad(const at::Tensor& dy, const at::Tensor& x,
                             const std::optional<at::Tensor>& index, int64_t start, bool cols,
                             int64_t rows_of_delta) {
  check_floating(kDeltaGrad, "dy", dy);
  check_like(kDeltaGrad, "x", x, dy.scalar_type());
  check_2d(kDeltaGrad, "dy", dy);
  check_2d(kDeltaGrad, "x", x);
  TORCH_CHECK_VALUE(x.size(0) == dy.size(0), kDeltaGrad, ": x and dy must have the same rows, got ",
                    x.sizes(), " and ", dy.sizes());
  const at::ScalarType acc = work_type(dy.scalar_type());  // bf16 GEMMs accumulate in fp32
  if (cols)  // dΔ = dY^T X[:, C], X[:, C] given: one GEMM
    return at::mm(dy.t().to(acc), x.to(acc)).to(dy.scalar_type());
  TORCH_CHECK_VALUE(rows_of_delta >= 0, kDeltaGrad, ": rows_of_delta must be >= 0, got ",
                    rows_of_delta);
  const Selection sel = selection(kDeltaGrad, index, start, rows_of_delta, "rows_of_delta is",
                                  dy.size(1));
  if (!sel.index.defined())
    return at::mm(dy.narrow(1, sel.start, sel.count).t().to(acc), x.to(acc)).to(dy.scalar_type());
  if (copies_gather(dy, sel))
    return at::mm(gathered_columns(dy, sel).t().to(acc), x.to(acc)).to(dy.scalar_type());
  at::Tensor out = at::empty({sel.count, x.size(1)}, dy.options());
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "sparse_delta_grad", [&] {
    gathered_t_gemm<scalar_t>(dy, sel, x, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// W' = W with Δ added into rows R or columns C: a copy of W in its own layout (a transposed
// view stays transposed), then Δ added into its selected columns, or into the selected
// columns of its transpose for rows (add_into_columns: each element rounded once, as ATen's
// add does; ATen's index_add along columns copies W three times in bf16). An index must be
// sorted and unique (a Selection's is), as the PyTorch kernel requires.
at::Tensor sparse_merged_weight(const at::Tensor& weight, const at::Tensor& delta,
                                const std::optional<at::Tensor>& index, int64_t start, bool cols) {
  const Selection sel = linear_args(kMergedWeight, "weight", weight,
                                    weight.dim() == 2 ? weight.size(1) : -1, weight, delta, index,
                                    start, cols);
  for (int64_t j = 1; j < sel.count; ++j)
    TORCH_CHECK_VALUE(sel.at(j) > sel.at(j - 1), kMergedWeight,
                      ": index must be sorted and unique (strictly increasing), got index[", j - 1,
                      "] = ", sel.at(j - 1), " and index[", j, "] = ", sel.at(j));
  at::Tensor merged = weight.clone(at::MemoryFormat::Preserve);
  if (cols) return add_into_columns(merged, sel, delta);
  add_into_columns(merged.t(), sel, delta.t());
  return merged;
}

void sparse_adamw(const at::Tensor& weight, const at::Tensor& grad, const at::Tensor& exp_avg,
                  const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& master,
                  const std::optional<at::Tensor>& index, int64_t start, bool cols, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  check_floating(kAdamW, "weight", weight);
  check_floating(kAdamW, "grad", grad);
  check_2d(kAdamW, "weight", weight);
  check_2d(kAdamW, "grad", grad);
  const at::ScalarType state = exp_avg.scalar_type();
  TORCH_CHECK_TYPE(state == at::kFloat || state == at::kDouble, kAdamW,
                   ": exp_avg must be float32 or float64, got ", state);
  check_like(kAdamW, "exp_avg_sq", exp_avg_sq, state);
  TORCH_CHECK_VALUE(exp_avg.sizes() == grad.sizes() && exp_avg_sq.sizes() == grad.sizes(), kAdamW,
                    ": exp_avg and exp_avg_sq must have grad's shape ", grad.sizes());
  TORCH_CHECK_VALUE(step >= 1, kAdamW, ": step counts from 1, got ", step);
  const int64_t dim = cols ? 1 : 0;
  TORCH_CHECK_VALUE(grad.size(1 - dim) == weight.size(1 - dim), kAdamW, ": grad must have shape ",
                    cols ? "(out, |C|)" : "(|R|, in)", " for weight of shape ", weight.sizes(),
                    ", got ", grad.sizes());
  const Selection sel =
      selection(kAdamW, index, start, grad.size(dim), "grad has", weight.size(dim));
  if (master) {
    check_like(kAdamW, "master", *master, state);
    TORCH_CHECK_VALUE(master->sizes() == grad.sizes(), kAdamW, ": master must have grad's shape ",
                      grad.sizes());
  }
  // The state is updated in place: work on contiguous tensors, copied back if they were not.
  at::Tensor m = exp_avg.contiguous(), v = exp_avg_sq.contiguous(), g = grad.to(state).contiguous();
  at::Tensor s = master ? master->contiguous() : at::Tensor();
  const AdamWStep step_constants(lr, beta1, beta2, eps, weight_decay, step);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "sparse_adamw", [&] {
    using W = scalar_t;
    if (state == at::kDouble) {
      adamw_loop<W, double>(weight, g, m, v, s.defined() ? s.mutable_data_ptr<double>() : nullptr,
                            sel, cols, step_constants);
    } else {
      adamw_loop<W, float>(weight, g, m, v, s.defined() ? s.mutable_data_ptr<float>() : nullptr,
                           sel, cols, step_constants);
    }
  });
  if (!m.is_same(exp_avg)) exp_avg.copy_(m);
  if (!v.is_same(exp_avg_sq)) exp_avg_sq.copy_(v);
  if (master && !s.is_same(*master)) master->copy_(s);
}

}  // namespace kronops::native
