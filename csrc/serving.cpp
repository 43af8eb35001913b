// CPU kernels of the serving ops: the adapters of one layer applied to a mixed batch and added
// into its output y in place (kronops/serving/ops.py has the layout of every argument).
// Members are computed in parallel (one member a task), each on raw pointers: its rows of x
// (x itself where its tokens are consecutive rows, starts[p] >= 0, else gathered into a
// buffer), its products as BLAS calls (blas.h) into its rows of one work buffer; then every
// member's part is added into y, in token order, on one thread (so rows listed twice add up
// as index_add_ does). At decode each member holds a token or two, so what a member costs is
// its two small GEMMs and no tensor bookkeeping. A Kronecker member is y_t += vec(A X_t B^T)
// (X_t B^T first or A X_t first, the cheaper, as kron_rows); an S²FT member one GEMM on its Δ.
// Products run in fp32 for fp16/bf16 (fp64 for fp64) and are rounded once into y, as the
// PyTorch kernels do. Every argument is checked before y is written, as the PyTorch and
// Triton kernels check them (kronops/serving/ops.py): keep them alike.
#include "kronops_kernels.h"  // generated: the kernels' declarations

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "blas.h"
#include "checks.h"

namespace kronops::native {
namespace {

constexpr const char* kRoutedKron = "kronops::routed_kron_add";
constexpr const char* kRoutedSparse = "kronops::routed_sparse_add";

// A member with tokens: tokens[lo:hi] are its rows of x and y, consecutive from `start`
// where start >= 0.
struct Member {
  int64_t p, lo, hi, start;
  int64_t count() const { return hi - lo; }
};

// y and x: 2-D floating-point CPU tensors with the same rows.
void check_rows(const char* op, const at::Tensor& y, const at::Tensor& x) {
  TORCH_CHECK_VALUE(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0), op,
                    ": y and x must be 2-D with the same rows, got ", y.sizes(), " and ",
                    x.sizes());
  check_floating(op, "y", y);
  check_floating(op, "x", x);
}

// The checked routing arguments: the rows of every token (int64, contiguous) and every
// member with tokens.
struct Routing {
  at::Tensor rows;
  std::vector<Member> members;
  const int64_t* row() const { return rows.const_data_ptr<int64_t>(); }
};

// Checks the routing arguments against x (M rows) and `members`, so that nothing is written
// before all checks passed.
Routing member_rows(const char* op, const at::Tensor& x, const at::Tensor& tokens,
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
  Routing found{checked_index(op, "tokens", tokens, x.size(0)), {}};
  const int64_t* row = found.row();
  TORCH_CHECK_VALUE(offsets.front() == 0 && offsets.back() == found.rows.numel(), op,
                    ": offsets must run from 0 to the number of tokens ", found.rows.numel(),
                    ", got ", offsets);
  for (int64_t p = 0; p < members; ++p)
    TORCH_CHECK_VALUE(offsets[p] <= offsets[p + 1], op, ": offsets must not decrease, got ",
                      offsets);
  for (int64_t p = 0; p < members; ++p) {
    const int64_t lo = offsets[p], hi = offsets[p + 1], start = starts[p];
    TORCH_CHECK_VALUE(start == -1 || (start >= 0 && start <= x.size(0) - (hi - lo)), op,
                      ": starts[", p, "] = ", start, " must be -1 or a row of x with ", hi - lo,
                      " rows after it");
    for (int64_t t = lo; start >= 0 && t < hi; ++t)
      TORCH_CHECK_VALUE(row[t] == start + t - lo, op, ": starts[", p, "] = ", start,
                        " but tokens[", lo, ":", hi, "] are not the rows ", start, " to ",
                        start + hi - lo - 1);
    if (hi > lo) found.members.push_back({p, lo, hi, start});
  }
  return found;
}

// x in the work dtype with unit column stride, copied only where it is not.
at::Tensor work_rows(const at::Tensor& x) {
  at::Tensor w = x.to(float_type(x.scalar_type()));
  return w.size(1) > 1 && w.stride(1) != 1 ? w.contiguous() : w;
}

// A member's rows of x (`xw`: work dtype, unit column stride, row stride `sx`, `cols`
// columns) as a matrix of row stride `ld`: x itself where they are consecutive, else
// gathered into `buf`. `pick` (|pick| entries), if given, keeps only those columns (always
// gathered).
template <class T>
const T* member_x(const T* xw, int64_t sx, int64_t cols, const Member& m, const int64_t* row,
                  const int64_t* pick, int64_t picked, std::vector<T>& buf, int64_t& ld) {
  if (!pick && m.start >= 0) {
    ld = sx;
    return xw + m.start * sx;
  }
  ld = pick ? picked : cols;
  buf.resize(m.count() * ld);
  for (int64_t t = 0; t < m.count(); ++t) {
    const T* from = xw + row[m.lo + t] * sx;
    T* to = buf.data() + t * ld;
    if (pick) {
      for (int64_t j = 0; j < picked; ++j) to[j] = from[pick[j]];
    } else {
      std::copy_n(from, cols, to);
    }
  }
  return buf.data();
}

// Runs compute(member, T* part) for every member in parallel (one member a task), each
// writing its tokens' rows of one (tokens, ld) work buffer, then adds each member's part into
// y in token order on this thread: y[row[t], col(j)] += part[t, j] for j < width(member),
// col(j) = cols(member)[j] where cols gives a pointer, else j. Rounded once into y's dtype.
template <class T, class Compute, class Width, class Cols>
void add_members(const at::Tensor& y, const Routing& routing, int64_t ld, const Compute& compute,
                 const Width& width, const Cols& cols) {
  std::vector<T> part(routing.rows.numel() * ld);
  const auto& members = routing.members;
  at::parallel_for(0, static_cast<int64_t>(members.size()), 1, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0; i < m1; ++i) compute(members[i], part.data() + members[i].lo * ld);
  });
  const int64_t* row = routing.row();
  const int64_t sy0 = y.stride(0), sy1 = y.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "routed_add", [&] {
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for (const Member& m : members) {
      const int64_t n = width(m);
      const int64_t* c = cols(m);
      for (int64_t t = m.lo; t < m.hi; ++t) {
        scalar_t* yr = yp + row[t] * sy0;
        const T* src = part.data() + t * ld;
        for (int64_t j = 0; j < n; ++j) {
          scalar_t& out = yr[(c ? c[j] : j) * sy1];
          out = static_cast<scalar_t>(static_cast<T>(out) + src[j]);
        }
      }
    }
  });
}

// One member's y_t = vec(A X_t B^T) for its n rows X_t (a2 x b2, ld b2, row step `sx`) into
// out (n, a1*b1): X_t B^T first or A X_t first, whichever has fewer flops (kron_rows' rule).
template <class T>
void kron_member(int64_t n, int64_t a1, int64_t a2, int64_t b1, int64_t b2, const T* x,
                 int64_t sx, Mat<T> a, Mat<T> b, std::vector<T>& inner, T* out) {
  const Batch<T> xs{x, sx, b2, false}, rep_a{a.p, 0, a.ld, a.trans};
  const Batch<T> rep_bt{b.p, 0, b.ld, !b.trans};
  if (b1 * a2 * (b2 + a1) <= a1 * b2 * (a2 + b1)) {  // T_t = X_t B^T, then A T_t
    inner.resize(n * a2 * b1);
    row_gemm<T>(n, a2, b1, b2, 1, xs, rep_bt, 0, inner.data(), a2 * b1, b1);
    gemm_batch<T>(n, a1, b1, a2, 1, rep_a, {inner.data(), a2 * b1, b1, false}, 0, out, a1 * b1,
                  b1);
  } else {  // Z_t = A X_t, then every row's Z_t B^T as one GEMM
    inner.resize(n * a1 * b2);
    gemm_batch<T>(n, a1, b2, a2, 1, rep_a, xs, 0, inner.data(), a1 * b2, b2);
    gemm<T>(n * a1, b1, b2, 1, {inner.data(), b2, false}, {b.p, b.ld, !b.trans}, 0, out, b1);
  }
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
  const Routing routing = member_rows(kRoutedKron, x, tokens, tiles, offsets, starts, a.size(0));
  if (routing.members.empty()) return;
  const at::ScalarType work = float_type(x.scalar_type());
  at::Tensor xw = work_rows(x), aw = a.to(work).contiguous(), bw = b.to(work).contiguous();
  AT_DISPATCH_FLOATING_TYPES(work, "routed_kron_add", [&] {
    using T = scalar_t;
    const T *xp = xw.const_data_ptr<T>(), *ap = aw.const_data_ptr<T>(),
            *bp = bw.const_data_ptr<T>();
    const int64_t* row = routing.row();
    auto compute = [&](const Member& m, T* out) {
      std::vector<T> gathered, inner;
      int64_t ld = 0;
      const T* xs = member_x<T>(xp, xw.stride(0), x.size(1), m, row, nullptr, 0, gathered, ld);
      kron_member<T>(m.count(), a1, a2, b1, b2, xs, ld, {ap + m.p * a1 * a2, a2, false},
                     {bp + m.p * b1 * b2, b2, false}, inner, out);
    };
    add_members<T>(y, routing, a1 * b1, compute, [&](const Member&) { return a1 * b1; },
                   [](const Member&) -> const int64_t* { return nullptr; });
  });
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
  const Routing routing = member_rows(kRoutedSparse, x, tokens, tiles, offsets, starts, members);
  if (routing.members.empty()) return;
  const at::ScalarType work = float_type(x.scalar_type());
  at::Tensor xw = work_rows(x), vw = values.to(work).contiguous();
  const int64_t* sel = idx.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(work, "routed_sparse_add", [&] {
    using T = scalar_t;
    const T *xp = xw.const_data_ptr<T>(), *vp = vw.const_data_ptr<T>();
    const int64_t* row = routing.row();
    auto compute = [&](const Member& m, T* out) {
      const int64_t w = widths[m.p];
      const T* v = vp + m.p * width * features;  // its W rows, the first w of them used
      std::vector<T> gathered;
      int64_t ld = 0;
      if (cols) {  // y[t] += x[t, C] Δᵀ, values holding Δᵀ (|C|, out)
        const T* xs = member_x<T>(xp, xw.stride(0), x.size(1), m, row, sel + m.p * width, w,
                                  gathered, ld);
        gemm<T>(m.count(), features, w, 1, {xs, ld, false}, {v, features, false}, 0, out,
                features);
      } else {  // y[t, R] += x[t] Δᵀ, values holding Δ (|R|, in)
        const T* xs = member_x<T>(xp, xw.stride(0), x.size(1), m, row, nullptr, 0, gathered, ld);
        gemm<T>(m.count(), w, features, 1, {xs, ld, false}, {v, features, true}, 0, out, width);
      }
    };
    const int64_t ld = cols ? features : width;
    add_members<T>(
        y, routing, ld, compute,
        [&](const Member& m) { return cols ? features : widths[m.p]; },
        [&](const Member& m) -> const int64_t* { return cols ? nullptr : sel + m.p * width; });
  });
}

}  // namespace kronops::native
