// CPU kernels of the serving ops: the adapters of one layer applied to a mixed batch and added
// into its output y in place (kronops/serving/ops.py has the layout of every argument).
// Members are taken one after another, each as whole-tensor work on its own rows: a slice of
// x and y where its tokens are consecutive (starts[p] >= 0), else a gather and an index-add.
// The Kronecker product of a member is the native kron_rows kernel; an S²FT member is one
// GEMM on its Δ. Products run in fp32 for fp16/bf16 (fp64 for fp64) and are rounded once into
// y, as the PyTorch kernels do.
#include "kernels.h"

#include <ATen/ATen.h>

#include "common.h"

namespace kronops::native {
namespace {

constexpr const char* kRoutedKron = "kronops::routed_kron_add";
constexpr const char* kRoutedSparse = "kronops::routed_sparse_add";

// The rows of x and y that one member adapts.
struct MemberRows {
  at::Tensor index;  // int64 rows, or undefined when they are consecutive from `start`
  int64_t start, count;

  at::Tensor take(const at::Tensor& t) const {
    return index.defined() ? t.index_select(0, index) : t.narrow(0, start, count);
  }
  void add(const at::Tensor& y, const at::Tensor& part) const {
    if (index.defined()) {
      y.index_add_(0, index, part.to(y.scalar_type()));
    } else {
      y.narrow(0, start, count).add_(part.to(y.scalar_type()));
    }
  }
};

// Checks the routing arguments against y and x (M rows each) and `members`; calls
// fn(p, rows) for every member p with tokens.
template <class F>
void for_members(const char* op, const at::Tensor& y, const at::Tensor& x, const at::Tensor& tokens,
                 at::IntArrayRef offsets, at::IntArrayRef starts, int64_t members, const F& fn) {
  TORCH_CHECK_VALUE(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0), op,
                    ": y and x must be 2-D with the same rows, got ", y.sizes(), " and ", x.sizes());
  check_floating(op, "y", y);
  check_floating(op, "x", x);
  TORCH_CHECK_VALUE(static_cast<int64_t>(offsets.size()) == members + 1 &&
                        static_cast<int64_t>(starts.size()) == members,
                    op, ": offsets must have ", members + 1, " entries and starts ", members,
                    " (one per member), got ", offsets.size(), " and ", starts.size());
  const at::Tensor rows = checked_index(op, "tokens", tokens.to(at::kLong), x.size(0));
  TORCH_CHECK_VALUE(offsets.front() == 0 && offsets.back() == rows.numel(), op,
                    ": offsets must run from 0 to the number of tokens ", rows.numel());
  for (int64_t p = 0; p < members; ++p) {
    const int64_t lo = offsets[p], hi = offsets[p + 1];
    TORCH_CHECK_VALUE(lo <= hi, op, ": offsets must not decrease, got ", offsets);
    if (hi == lo) continue;
    const int64_t start = starts[p];
    TORCH_CHECK_VALUE(start == -1 || (start >= 0 && start + hi - lo <= x.size(0)), op,
                      ": starts[", p, "] = ", start, " must be -1 or a row of x with ", hi - lo,
                      " rows after it");
    fn(p, start >= 0 ? MemberRows{at::Tensor(), start, hi - lo}
                     : MemberRows{rows.slice(0, lo, hi), 0, hi - lo});
  }
}

}  // namespace

void routed_kron_add(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a,
                     const at::Tensor& b, const at::Tensor& tokens, const at::Tensor& tiles,
                     at::IntArrayRef offsets, at::IntArrayRef starts) {
  TORCH_CHECK_VALUE(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0), kRoutedKron,
                    ": a and b must be (members, p, q) stacks of the same length, got ", a.sizes(),
                    " and ", b.sizes());
  const int64_t a2 = a.size(2), b2 = b.size(2);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == a2 * b2 && y.dim() == 2 &&
                        y.size(1) == a.size(1) * b.size(1),
                    kRoutedKron, ": x must have a2*b2 = ", a2 * b2, " columns and y a1*b1 = ",
                    a.size(1) * b.size(1), ", got ", x.sizes(), " and ", y.sizes());
  for_members(kRoutedKron, y, x, tokens, offsets, starts, a.size(0),
              [&](int64_t p, const MemberRows& rows) {
                const at::Tensor xs = rows.take(x).reshape({rows.count, a2, b2});
                rows.add(y, kron_rows(xs, a[p], b[p], std::nullopt, 1.0));
              });
}

void routed_sparse_add(const at::Tensor& y, const at::Tensor& x, const at::Tensor& values,
                       const at::Tensor& index, const at::Tensor& tokens, const at::Tensor& tiles,
                       at::IntArrayRef offsets, at::IntArrayRef starts, at::IntArrayRef widths,
                       bool cols) {
  const int64_t members = static_cast<int64_t>(widths.size());
  TORCH_CHECK_VALUE(members > 0 && values.dim() == 2 && values.size(0) % members == 0 &&
                        index.dim() == 1 && index.size(0) == values.size(0),
                    kRoutedSparse, ": values (members * W, features) and index (members * W,) ",
                    "must hold W rows for each of the ", members, " members, got ", values.sizes(),
                    " and ", index.sizes());
  const int64_t width = values.size(0) / members;
  const int64_t features = cols ? y.size(1) : x.size(1);  // values' rows: Δᵀ's or Δ's
  TORCH_CHECK_VALUE(values.size(1) == features, kRoutedSparse, ": values must have ", features,
                    cols ? " columns (y's width) in cols mode" : " columns (x's width) in rows mode",
                    ", got ", values.sizes());
  const at::Tensor idx = checked_index(kRoutedSparse, "index", index, cols ? x.size(1) : y.size(1));
  const at::ScalarType work = work_type(x.scalar_type());
  for_members(kRoutedSparse, y, x, tokens, offsets, starts, members,
              [&](int64_t p, const MemberRows& rows) {
                TORCH_CHECK_VALUE(widths[p] >= 0 && widths[p] <= width, kRoutedSparse, ": widths[",
                                  p, "] = ", widths[p], " must lie in [0, ", width, "]");
                const at::Tensor v = values.narrow(0, p * width, widths[p]).to(work);
                const at::Tensor sel = idx.narrow(0, p * width, widths[p]);
                const at::Tensor xs = rows.take(x).to(work);
                if (cols) {  // y[t] += x[t, C] Δᵀ, values holding Δᵀ (|C|, out)
                  rows.add(y, at::matmul(xs.index_select(1, sel), v));
                  return;
                }
                const at::Tensor part = at::matmul(xs, v.t()).to(y.scalar_type());  // (n, |R|)
                if (rows.index.defined()) {  // y[t, R] += x[t] Δᵀ
                  y.index_put_({rows.index.unsqueeze(1), sel.unsqueeze(0)}, part, true);
                } else {
                  y.narrow(0, rows.start, rows.count).index_add_(1, sel, part);
                }
              });
}

}  // namespace kronops::native
