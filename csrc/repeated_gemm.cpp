// C_i = alpha * A B_i + beta * C_i for many small B_i and one A (fp32): the per-row products
// of the Kronecker kernels (A T_m, s A^T dY_m), where a BLAS call per row repacks A and pays
// its call overhead each time. A is packed once, in panels of kRows rows; each product is
// then a register-blocked FMA kernel (kRows x 16 accumulators, B_i's rows read in place,
// B_i and C_i staying in L1). The same kernel runs tall-skinny products C = A B (a block's
// rows folded against one small factor, X B^T), A's rows read in place. Compiled for AVX2 +
// FMA and used from level avx2 on (cpu_isa.h; an AVX-512 variant ran no faster on the CPUs
// measured: bench/NOTES.md).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "blas.h"
#include "cpu_isa.h"

namespace kronops::native {
namespace {

constexpr int64_t kRows = 6;  // 6 x 16 accumulators: 12 of the 16 ymm registers

typedef float f8 __attribute__((vector_size(32)));

[[gnu::target("avx2,fma"), gnu::always_inline]] inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

[[gnu::target("avx2,fma"), gnu::always_inline]] inline void store8(float* p, f8 v) {
  std::memcpy(p, &v, sizeof(v));
}

// C rows [0, kRows) x columns [j, j + 8 * W) = A's kRows rows (element (r, l) at
// a[r * rs + l * cs]: a packed panel, rs = 1 and cs = kRows, or rows read in place, rs = lda
// and cs = 1) times B's columns [j, j + 8 * W); beta == 0 leaves C unread. Every loop over r
// and w has a constant trip count and is unrolled, so the accumulators stay in registers.
template <int W>
[[gnu::target("avx2,fma")]] void panel_kernel(const float* panel, int64_t rs, int64_t cs,
                                              int64_t k, const float* b, int64_t ldb,
                                              float beta, float* c, int64_t ldc) {
  f8 acc[kRows][W];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int w = 0; w < W; ++w) acc[r][w] = f8{};
  for (int64_t l = 0; l < k; ++l) {
    f8 bv[W];
#pragma GCC unroll 2
    for (int w = 0; w < W; ++w) bv[w] = load8(b + l * ldb + 8 * w);
    const float* a = panel + l * cs;
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
      for (int w = 0; w < W; ++w) acc[r][w] += a[r * rs] * bv[w];
  }
  if (beta == 0.0f) {
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
      for (int w = 0; w < W; ++w) store8(c + r * ldc + 8 * w, acc[r][w]);
    return;
  }
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int w = 0; w < W; ++w) {
      float* p = c + r * ldc + 8 * w;
      store8(p, acc[r][w] + beta * load8(p));
    }
}

// The same for a panel of `rows` < kRows rows of C: computed into a buffer, then copied.
template <int W>
[[gnu::target("avx2,fma")]] void partial_panel_kernel(const float* panel, int64_t k,
                                                      const float* b, int64_t ldb, float beta,
                                                      float* c, int64_t ldc, int64_t rows) {
  float part[kRows * 8 * W];
  panel_kernel<W>(panel, 1, kRows, k, b, ldb, 0.0f, part, 8 * W);
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < 8 * W; ++j) {
      float* p = c + r * ldc + j;
      *p = beta == 0.0f ? part[r * 8 * W + j] : part[r * 8 * W + j] + beta * *p;
    }
}

// The columns after the last full 8: one at a time.
[[gnu::target("avx2,fma")]] void panel_columns(const float* panel, int64_t k, const float* b,
                                               int64_t ldb, float beta, float* c, int64_t ldc,
                                               int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) {
    float acc[kRows] = {};
    for (int64_t l = 0; l < k; ++l)
      for (int r = 0; r < kRows; ++r) acc[r] += panel[l * kRows + r] * b[l * ldb + j];
    for (int64_t r = 0; r < rows; ++r) {
      float* p = c + r * ldc + j;
      *p = beta == 0.0f ? acc[r] : acc[r] + beta * *p;
    }
  }
}

[[gnu::target("avx2,fma")]] void products(int64_t count, int64_t m, int64_t n, int64_t k,
                                          const float* packed, const float* b, int64_t b_step,
                                          int64_t ldb, float beta, float* c, int64_t c_step,
                                          int64_t ldc) {
  const int64_t panels = at::divup(m, kRows);
  for (int64_t i = 0; i < count; ++i) {
    const float* bi = b + i * b_step;
    float* ci = c + i * c_step;
    for (int64_t p = 0; p < panels; ++p) {
      const float* panel = packed + p * k * kRows;
      const int64_t rows = std::min(kRows, m - p * kRows);
      float* cp = ci + p * kRows * ldc;
      int64_t j = 0;
      if (rows == kRows) {
        for (; j + 16 <= n; j += 16)
          panel_kernel<2>(panel, 1, kRows, k, bi + j, ldb, beta, cp + j, ldc);
        for (; j + 8 <= n; j += 8)
          panel_kernel<1>(panel, 1, kRows, k, bi + j, ldb, beta, cp + j, ldc);
      } else {
        for (; j + 16 <= n; j += 16)
          partial_panel_kernel<2>(panel, k, bi + j, ldb, beta, cp + j, ldc, rows);
        for (; j + 8 <= n; j += 8)
          partial_panel_kernel<1>(panel, k, bi + j, ldb, beta, cp + j, ldc, rows);
      }
      if (j < n) panel_columns(panel, k, bi + j, ldb, beta, cp + j, ldc, rows, n - j);
    }
  }
}

// C (m x n) = A B + beta * C, A's rows read in place (row-major, lda), B (k x n) row-major
// with n a multiple of 8: the panel kernels over kRows rows of A at a time, the last m % kRows
// rows packed into a zero-padded panel first. Rows are split over threads (inline where the
// caller is already in a parallel region).
[[gnu::target("avx2,fma")]] void tall_products(int64_t m, int64_t n, int64_t k, const float* a,
                                               int64_t lda, const float* b, float beta,
                                               float* c, int64_t ldc) {
  // C's `count` (<= kRows) rows from A's rows at `rows` (strides rs, cs; packed when partial).
  const auto columns = [&](const float* rows, int64_t rs, int64_t cs, float* cp, int64_t count) {
    int64_t j = 0;
    if (count == kRows) {
      for (; j + 16 <= n; j += 16) panel_kernel<2>(rows, rs, cs, k, b + j, n, beta, cp + j, ldc);
      for (; j < n; j += 8) panel_kernel<1>(rows, rs, cs, k, b + j, n, beta, cp + j, ldc);
      return;
    }
    for (; j + 16 <= n; j += 16)
      partial_panel_kernel<2>(rows, k, b + j, n, beta, cp + j, ldc, count);
    for (; j < n; j += 8) partial_panel_kernel<1>(rows, k, b + j, n, beta, cp + j, ldc, count);
  };
  const int64_t full = m / kRows, tail = m - full * kRows;
  at::parallel_for(0, full, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      columns(a + p * kRows * lda, lda, 1, c + p * kRows * ldc, kRows);
  });
  if (tail == 0) return;
  std::vector<float> panel(k * kRows, 0.0f);
  for (int64_t r = 0; r < tail; ++r)
    for (int64_t l = 0; l < k; ++l) panel[l * kRows + r] = a[(full * kRows + r) * lda + l];
  columns(panel.data(), 1, kRows, c + full * kRows * ldc, tail);
}

}  // namespace

bool tall_skinny_gemm(int64_t m, int64_t n, int64_t k, float alpha, Mat<float> a, Mat<float> b,
                      float beta, float* c, int64_t ldc) {
  if (cpu_isa() < Isa::avx2 || a.trans || n % 8 != 0 || n > kSkinny || k > kSkinny ||
      m < kTall)
    return false;
  std::vector<float> scaled(k * n);  // alpha * B, row-major
  for (int64_t l = 0; l < k; ++l)
    for (int64_t j = 0; j < n; ++j)
      scaled[l * n + j] = alpha * (b.trans ? b.p[j * b.ld + l] : b.p[l * b.ld + j]);
  tall_products(m, n, k, a.p, a.ld, scaled.data(), beta, c, ldc);
  return true;
}

bool repeated_left_gemm(int64_t count, int64_t m, int64_t n, int64_t k, float alpha, Mat<float> a,
                        const float* b, int64_t b_step, int64_t ldb, float beta, float* c,
                        int64_t c_step, int64_t ldc) {
  if (cpu_isa() < Isa::avx2 || n < 8) return false;
  // Panel p holds rows p*kRows .. of alpha * A, column by column: panel[l * kRows + r].
  std::vector<float> packed(at::divup(m, kRows) * kRows * k, 0.0f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t l = 0; l < k; ++l)
      packed[(i / kRows) * k * kRows + l * kRows + i % kRows] =
          alpha * (a.trans ? a.p[l * a.ld + i] : a.p[i * a.ld + l]);
  products(count, m, n, k, packed.data(), b, b_step, ldb, beta, c, c_step, ldc);
  return true;
}

}  // namespace kronops::native
