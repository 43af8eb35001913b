// CPU kernels of the serving ops: the adapters of one layer applied to a mixed batch and added
// into its output y in place (kronops/serving/ops.py has the layout of every argument).
// Members are taken one after another, each as whole-tensor work on its own rows: a slice of
// x and y where its tokens are consecutive (starts[p] >= 0), else a gather and an index-add.
// The Kronecker product of a member is the native kron_rows kernel; an S²FT member is one
// GEMM on its Δ. Products run in fp32 for fp16/bf16 (fp64 for fp64) and are rounded once into
// y, as the PyTorch kernels do. Every argument is checked before y is written, as the PyTorch
// and Triton kernels check them (kronops/serving/ops.py): keep them alike.
#include "kronops_kernels.h"  // generated: the kernels' declarations

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "checks.h"

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

// y and x: 2-D floating-point CPU tensors with the same rows.
void check_rows(const char* op, const at::Tensor& y, const at::Tensor& x) {
  TORCH_CHECK_VALUE(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0), op,
                    ": y and x must be 2-D with the same rows, got ", y.sizes(), " and ",
                    x.sizes());
  check_floating(op, "y", y);
  check_floating(op, "x", x);
}

// Checks the routing arguments against x (M rows) and `members`; returns the rows of every
// member with tokens, so that nothing is written before all checks passed.
using Members = std::vector<std::pair<int64_t, MemberRows>>;
Members member_rows(const char* op, const at::Tensor& x, const at::Tensor& tokens,
                    const at::Tensor& tiles, at::IntArrayRef offsets, at::IntArrayRef starts,
                    int64_t members) {
  TORCH_CHECK_VALUE(tiles.device().is_cpu(), op, ": tiles must be a CPU tensor, got ",
                    tiles.device());
  TORCH_CHECK_TYPE(tiles.scalar_type() == at::kLong, op,
                   ": tiles must have dtype torch.int64, got ", tiles.scalar_type());
  TORCH_CHECK_VALUE(tiles.dim() == 2 && tiles.size(1) == 4, op,
                    ": tiles must have shape (n, 4), got ", tiles.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(offsets.size()) == members + 1, op,
                    ": offsets must have ", members + 1, " entries (members + 1), got ",
                    offsets.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(starts.size()) == members, op, ": starts must have ",
                    members, " entries (one per member), got ", starts.size());
  const at::Tensor rows = checked_index(op, "tokens", tokens, x.size(0));
  const int64_t* row = rows.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(offsets.front() == 0 && offsets.back() == rows.numel(), op,
                    ": offsets must run from 0 to the number of tokens ", rows.numel(), ", got ",
                    offsets);
  for (int64_t p = 0; p < members; ++p)
    TORCH_CHECK_VALUE(offsets[p] <= offsets[p + 1], op, ": offsets must not decrease, got ",
                      offsets);
  Members found;
  for (int64_t p = 0; p < members; ++p) {
    const int64_t lo = offsets[p], hi = offsets[p + 1], start = starts[p];
    TORCH_CHECK_VALUE(start == -1 || (start >= 0 && start <= x.size(0) - (hi - lo)), op,
                      ": starts[", p, "] = ", start, " must be -1 or a row of x with ", hi - lo,
                      " rows after it");
    for (int64_t t = lo; start >= 0 && t < hi; ++t)
      TORCH_CHECK_VALUE(row[t] == start + t - lo, op, ": starts[", p, "] = ", start,
                        " but tokens[", lo, ":", hi, "] are not the rows ", start, " to ",
                        start + hi - lo - 1);
    if (hi > lo)
      found.emplace_back(p, start >= 0 ? MemberRows{at::Tensor(), start, hi - lo}
                                       : MemberRows{rows.slice(0, lo, hi), 0, hi - lo});
  }
  return found;
}

}  // namespace

void routed_kron_add(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a,
                     const at::Tensor& b, const at::Tensor& tokens, const at::Tensor& tiles,
                     at::IntArrayRef offsets, at::IntArrayRef starts) {
  check_rows(kRoutedKron, y, x);
  TORCH_CHECK_VALUE(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0), kRoutedKron,
                    ": a and b must be (members, p, q) stacks of the same length, got ", a.sizes(),
                    " and ", b.sizes());
  check_like(kRoutedKron, "a", a, x.scalar_type());
  check_like(kRoutedKron, "b", b, x.scalar_type());
  const int64_t a1 = a.size(1), a2 = a.size(2), b1 = b.size(1), b2 = b.size(2);
  TORCH_CHECK_VALUE(x.size(1) == a2 * b2, kRoutedKron, ": x must have a2*b2 = ", a2 * b2,
                    " columns, got ", x.sizes());
  TORCH_CHECK_VALUE(y.size(1) == a1 * b1, kRoutedKron, ": y must have a1*b1 = ", a1 * b1,
                    " columns, got ", y.sizes());
  const Members found = member_rows(kRoutedKron, x, tokens, tiles, offsets, starts, a.size(0));
  for (const auto& [p, rows] : found) {
    const at::Tensor xs = rows.take(x).reshape({rows.count, a2, b2});
    rows.add(y, kron_rows(xs, a[p], b[p], std::nullopt, 1.0));
  }
}

void routed_sparse_add(const at::Tensor& y, const at::Tensor& x, const at::Tensor& values,
                       const at::Tensor& index, const at::Tensor& tokens, const at::Tensor& tiles,
                       at::IntArrayRef offsets, at::IntArrayRef starts, at::IntArrayRef widths,
                       bool cols) {
  check_rows(kRoutedSparse, y, x);
  const int64_t members = static_cast<int64_t>(widths.size());
  TORCH_CHECK_VALUE(members > 0, kRoutedSparse,
                    ": widths must have one entry per member, got none");
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) % members == 0, kRoutedSparse,
                    ": values must be (members * W, features), W rows for each of the ", members,
                    " members, got ", values.sizes());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == values.size(0), kRoutedSparse,
                    ": index must have values' ", values.size(0), " entries, got shape ",
                    index.sizes());
  const int64_t features = cols ? y.size(1) : x.size(1);  // values' rows: Δᵀ's or Δ's
  TORCH_CHECK_VALUE(values.size(1) == features, kRoutedSparse, ": values must have ", features,
                    cols ? " columns (y's width in cols mode)"
                         : " columns (x's width in rows mode)",
                    ", got ", values.sizes());
  check_like(kRoutedSparse, "values", values, x.scalar_type());
  const at::Tensor idx =
      checked_index(kRoutedSparse, "index", index, cols ? x.size(1) : y.size(1));
  const int64_t width = values.size(0) / members;
  for (int64_t p = 0; p < members; ++p)
    TORCH_CHECK_VALUE(widths[p] >= 0 && widths[p] <= width, kRoutedSparse, ": widths[", p,
                      "] = ", widths[p], " must lie in [0, ", width, "]");
  const at::ScalarType work = work_type(x.scalar_type());
  const Members found = member_rows(kRoutedSparse, x, tokens, tiles, offsets, starts, members);
  for (const auto& [p, rows] : found) {
    const at::Tensor v = values.narrow(0, p * width, widths[p]).to(work);
    const at::Tensor sel = idx.narrow(0, p * width, widths[p]);
    const at::Tensor xs = rows.take(x).to(work);
    if (cols) {  // y[t] += x[t, C] Δᵀ, values holding Δᵀ (|C|, out)
      rows.add(y, at::matmul(xs.index_select(1, sel), v));
      continue;
    }
    const at::Tensor part = at::matmul(xs, v.t()).to(y.scalar_type());  // (n, |R|)
    if (rows.index.defined()) {  // y[t, R] += x[t] Δᵀ
      y.index_put_({rows.index.unsqueeze(1), sel.unsqueeze(0)}, part, true);
    } else {
      y.narrow(0, rows.start, rows.count).index_add_(1, sel, part);
    }
  }
}

}  // namespace kronops::native
