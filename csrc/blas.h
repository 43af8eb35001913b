// The BLAS shim of the native kernels: row-major GEMM on raw pointers through the Fortran
// BLAS that torch links (MKL's batch call where it has one), on strided matrix operands.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

extern "C" {
// Fortran BLAS, exported by libtorch_cpu (MKL or OpenBLAS, whichever torch was built with).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
// MKL's grouped batch GEMM: weak, so null where torch's BLAS has none (then one call a matrix).
void sgemm_batch_(const char* transa, const char* transb, const int* m, const int* n,
                  const int* k, const float* alpha, const float** a, const int* lda,
                  const float** b, const int* ldb, const float* beta, float** c, const int* ldc,
                  const int* groups, const int* group_size) __attribute__((weak));
void dgemm_batch_(const char* transa, const char* transb, const int* m, const int* n,
                  const int* k, const double* alpha, const double** a, const int* lda,
                  const double** b, const int* ldb, const double* beta, double** c,
                  const int* ldc, const int* groups, const int* group_size) __attribute__((weak));
}

namespace kronops::native {

// A read-only matrix operand: element (r, c) at p[r * ld + c], or p[c * ld + r] when trans.
template <class T>
struct Mat {
  const T* p;
  int64_t ld;
  bool trans;
};

// The matrices of a 3-D tensor (batch, rows, cols) as GEMM operands: one inner layout for
// all of them (unit column stride, or unit row stride = transposed), batch stride `step`.
template <class T>
struct Batch {
  const T* p;
  int64_t step, ld;
  bool trans;
  Mat<T> at(int64_t i) const { return {p + i * step, ld, trans}; }
};

inline int blas_int(int64_t v) {
  TORCH_CHECK(v <= INT32_MAX, "kronops native: a matrix dimension of ", v, " exceeds the BLAS int range");
  return static_cast<int>(v);
}

// Tall-skinny products (at least kTall rows of A, at most kSkinny columns of A and B) go to our
// FMA kernel: the BLAS's blocking is made for large K and N and ran them at ~2/3 of its rate
// (bench/NOTES.md).
constexpr int64_t kSkinny = 64, kTall = 64;

// fp32 row-major C (m x n) = alpha * A B + beta * C for A's rows read in place and a small
// B (repeated_gemm.cpp). Returns false, doing nothing, where it does not apply: level below
// avx2 (cpu_isa.h), A transposed, n not a multiple of 8, n or k above kSkinny, m below kTall.
bool tall_skinny_gemm(int64_t m, int64_t n, int64_t k, float alpha, Mat<float> a, Mat<float> b,
                      float beta, float* c, int64_t ldc);

// Row-major C (m x n, leading dim ldc) = alpha * A (m x k) * B (k x n) + beta * C.
template <class T>
void gemm(int64_t m, int64_t n, int64_t k, T alpha, Mat<T> a, Mat<T> b, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (k > 0 && tall_skinny_gemm(m, n, k, alpha, a, b, beta, c, ldc)) return;
  }
  if (k == 0) {  // BLAS leaves C * beta; make it explicit (and skip the call)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  // Column-major BLAS sees row-major C as C^T = B^T A^T.
  const char ta = b.trans ? 'T' : 'N', tb = a.trans ? 'T' : 'N';
  const int M = blas_int(n), N = blas_int(m), K = blas_int(k);
  const int lda = blas_int(std::max<int64_t>(b.ld, 1)), ldb = blas_int(std::max<int64_t>(a.ld, 1));
  const int ldcc = blas_int(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &M, &N, &K, &alpha, b.p, &lda, a.p, &ldb, &beta, c, &ldcc);
  } else {
    dgemm_(&ta, &tb, &M, &N, &K, &alpha, b.p, &lda, a.p, &ldb, &beta, c, &ldcc);
  }
}

// The products of `count` matrices A_i = a.at(i) (m x k) and B_i = b.at(i) (k x n):
//   c_step > 0: C_i (at c + i * c_step) = alpha * A_i B + beta * C_i, one B (b.step = 0);
//   c_step = 0: C = alpha * sum_i A_i B_i + beta * C.
// Rows fold (one GEMM) where the storage rows of every operand that changes with i follow
// each other at its ld: stacked, (count * m) x n x k with A_i and C_i row-major, a.step =
// m * a.ld and c_step = m * ldc; summed, m x n x (count * k) with A_i transposed (its columns
// stored as rows), a.step = k * a.ld, and B_i row-major, b.step = k * b.ld. Folded: one call's
// overhead, B packed once (stacked) or C read and written once (summed). Else one GEMM a
// matrix (summed: beta = 1 after the first), each paying a call and packing B again (stacked)
// or reading and writing C again (summed). Stacked, each element of C is the same k-term sum
// either way; summed, folding sums the count * k terms in the BLAS's order.
template <class T>
void row_gemm(int64_t count, int64_t m, int64_t n, int64_t k, T alpha, Batch<T> a, Batch<T> b,
              T beta, T* c, int64_t c_step, int64_t ldc) {
  const bool fold =
      count <= 1 ||
      (c_step > 0 ? !a.trans && a.step == m * a.ld && b.step == 0 && c_step == m * ldc
                  : a.trans && a.step == k * a.ld && !b.trans && b.step == k * b.ld);
  if (fold) {
    const int64_t rows = c_step > 0 ? count * m : m, inner = c_step > 0 ? k : count * k;
    gemm<T>(rows, n, inner, alpha, a.at(0), b.at(0), beta, c, ldc);
    return;
  }
  for (int64_t i = 0; i < count; ++i)
    gemm<T>(m, n, k, alpha, a.at(i), b.at(i), c_step > 0 || i == 0 ? beta : T(1), c + i * c_step,
            ldc);
}

// A GEMM of at most this many multiply-adds costs more in a BLAS call's overhead (argument
// checks, packing both operands, zeroing C for beta = 0) than in its flops: measured on 2 cores
// with MKL, one call per 16x24x16 row product loses to a batch call or to one GEMM on a
// mode-major block (bench/NOTES.md), one per 32x32x32 product does not.
constexpr int64_t kSmallGemm = 16384;

// fp32 C_i (m x n at c + i * c_step) = alpha * A B_i + beta * C_i for i < count, one A, B_i
// row-major (k x n at b + i * b_step): our FMA kernel (repeated_gemm.cpp). Returns false,
// doing nothing, where it does not apply (level below avx2, cpu_isa.h; n < 8).
bool repeated_left_gemm(int64_t count, int64_t m, int64_t n, int64_t k, float alpha, Mat<float> a,
                        const float* b, int64_t b_step, int64_t ldb, float beta, float* c,
                        int64_t c_step, int64_t ldc);

// C_i (m x n, row-major, at c + i * c_step) = alpha * A_i B_i + beta * C_i for i < count, with
// A_i = a.at(i), B_i = b.at(i) (a step of 0 repeats one matrix); the C_i must not overlap.
// fp32 with one A and row-major B_i: our FMA kernel where the CPU has it; otherwise small
// products as one batch call where the BLAS has one (MKL), else row_gemm.
template <class T>
void gemm_batch(int64_t count, int64_t m, int64_t n, int64_t k, T alpha, Batch<T> a, Batch<T> b,
                T beta, T* c, int64_t c_step, int64_t ldc) {
  constexpr bool is_float = std::is_same_v<T, float>;
  if constexpr (is_float) {
    if (a.step == 0 && !b.trans && count > 1 && m > 0 && k > 0 &&
        repeated_left_gemm(count, m, n, k, alpha, a.at(0), b.p, b.step, b.ld, beta, c, c_step,
                           ldc))
      return;
  }
  const bool batched = is_float ? sgemm_batch_ != nullptr : dgemm_batch_ != nullptr;
  if (!batched || count <= 1 || m * n * k > kSmallGemm || m == 0 || n == 0 || k == 0) {
    row_gemm<T>(count, m, n, k, alpha, a, b, beta, c, c_step, ldc);
    return;
  }
  // One group of `count` products; column-major BLAS sees row-major C as C^T = B^T A^T.
  std::vector<const T*> bp(count), ap(count);
  std::vector<T*> cp(count);
  for (int64_t i = 0; i < count; ++i) {
    bp[i] = b.p + i * b.step;
    ap[i] = a.p + i * a.step;
    cp[i] = c + i * c_step;
  }
  const char ta = b.trans ? 'T' : 'N', tb = a.trans ? 'T' : 'N';
  const int M = blas_int(n), N = blas_int(m), K = blas_int(k), groups = 1, size = blas_int(count);
  const int lda = blas_int(std::max<int64_t>(b.ld, 1)), ldb = blas_int(std::max<int64_t>(a.ld, 1));
  const int ldcc = blas_int(std::max<int64_t>(ldc, 1));
  if constexpr (is_float) {
    sgemm_batch_(&ta, &tb, &M, &N, &K, &alpha, bp.data(), &lda, ap.data(), &ldb, &beta,
                 cp.data(), &ldcc, &groups, &size);
  } else {
    dgemm_batch_(&ta, &tb, &M, &N, &K, &alpha, bp.data(), &lda, ap.data(), &ldb, &beta,
                 cp.data(), &ldcc, &groups, &size);
  }
}

// Whether strides (s_row, s_col) of a rows x cols matrix are a BLAS layout; sets ld, trans.
inline bool blas_layout(int64_t rows, int64_t cols, int64_t s_row, int64_t s_col, int64_t& ld,
                        bool& trans) {
  if (cols <= 1 && rows <= 1) { ld = std::max<int64_t>(cols, 1); trans = false; return true; }
  if ((s_col == 1 || cols <= 1) && (rows <= 1 || s_row >= cols)) {
    ld = rows <= 1 ? std::max<int64_t>(cols, 1) : s_row;
    trans = false;
    return true;
  }
  if ((s_row == 1 || rows <= 1) && (cols <= 1 || s_col >= rows)) {
    ld = cols <= 1 ? std::max<int64_t>(rows, 1) : s_col;
    trans = true;
    return true;
  }
  return false;
}

// The matrix in the last two dims of `t` (2-D, or 3-D: its first matrix) as an operand; `t`
// is copied contiguous only when their strides are no BLAS layout.
template <class T>
Mat<T> as_mat(at::Tensor& t) {
  const int64_t r = t.dim() - 2, c = t.dim() - 1;
  int64_t ld = 0;
  bool trans = false;
  if (!blas_layout(t.size(r), t.size(c), t.stride(r), t.stride(c), ld, trans)) {
    t = t.contiguous();
    blas_layout(t.size(r), t.size(c), t.stride(r), t.stride(c), ld, trans);
  }
  return {t.const_data_ptr<T>(), ld, trans};
}

// `t` (3-D) as a Batch, copied contiguous only when its inner strides are no BLAS layout.
template <class T>
Batch<T> as_batch(at::Tensor& t) {
  const Mat<T> first = as_mat<T>(t);
  return {first.p, t.stride(0), first.ld, first.trans};
}

}  // namespace kronops::native
