// What the native kernels share: row-major GEMM on raw pointers (the BLAS that torch links),
// strided matrix operands, row blocks sized for the cache, and argument checks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
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

inline int blas_int(int64_t v) {
  TORCH_CHECK(v <= INT32_MAX, "kronops native: a matrix dimension of ", v, " exceeds the BLAS int range");
  return static_cast<int>(v);
}

// Row-major C (m x n, leading dim ldc) = alpha * A (m x k) * B (k x n) + beta * C.
template <class T>
void gemm(int64_t m, int64_t n, int64_t k, T alpha, Mat<T> a, Mat<T> b, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
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

// The matrices of a 3-D tensor (batch, rows, cols) as GEMM operands: one inner layout for
// all of them (unit column stride, or unit row stride = transposed), batch stride `step`.
// `fold` is true when rows of consecutive matrices follow each other at stride ld, so a
// run of matrices is one (count * rows) x cols operand.
template <class T>
struct Batch {
  const T* p;
  int64_t step, ld;
  bool trans, fold;
  Mat<T> at(int64_t i) const { return {p + i * step, ld, trans}; }
};

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

// A GEMM of at most this many multiply-adds costs more in a BLAS call's overhead (argument
// checks, packing both operands, zeroing C for beta = 0) than in its flops: measured on 2 cores
// with MKL, one call per 16x24x16 row product loses to a batch call or to one GEMM on a
// mode-major block (bench/NOTES.md), one per 32x32x32 product does not.
constexpr int64_t kSmallGemm = 16384;

// fp32 C_i (m x n at c + i * c_step) = alpha * A B_i + beta * C_i for i < count, one A, B_i
// row-major (k x n at b + i * b_step): our FMA kernel (repeated_gemm.cpp). Returns false,
// doing nothing, where it does not apply (no AVX2/FMA, n < 8).
bool repeated_left_gemm(int64_t count, int64_t m, int64_t n, int64_t k, float alpha, Mat<float> a,
                        const float* b, int64_t b_step, int64_t ldb, float beta, float* c,
                        int64_t c_step, int64_t ldc);

// C_i (m x n, row-major, at c + i * c_step) = alpha * A_i B_i + beta * C_i for i < count, with
// A_i = a.at(i), B_i = b.at(i) (a step of 0 repeats one matrix); the C_i must not overlap.
// fp32 with one A and row-major B_i: our FMA kernel where the CPU has it; otherwise small
// products as one batch call where the BLAS has one (MKL), else one GEMM a matrix.
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
    for (int64_t i = 0; i < count; ++i)
      gemm<T>(m, n, k, alpha, a.at(i), b.at(i), beta, c + i * c_step, ldc);
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

// `t` (3-D) as a Batch; copies it contiguous only when its inner strides are no BLAS layout.
template <class T>
Batch<T> as_batch(at::Tensor& t) {
  int64_t ld = 0;
  bool trans = false;
  if (!blas_layout(t.size(1), t.size(2), t.stride(1), t.stride(2), ld, trans)) {
    t = t.contiguous();
    blas_layout(t.size(1), t.size(2), t.stride(1), t.stride(2), ld, trans);
  }
  const bool fold = !trans && (t.size(0) <= 1 || t.stride(0) == t.size(1) * ld);
  return {t.const_data_ptr<T>(), t.stride(0), ld, trans, fold};
}

// `t` (2-D) as a matrix operand, copied contiguous only when its strides are no BLAS layout.
template <class T>
Mat<T> as_mat(at::Tensor& t) {
  int64_t ld = 0;
  bool trans = false;
  if (!blas_layout(t.size(0), t.size(1), t.stride(0), t.stride(1), ld, trans)) {
    t = t.contiguous();
    blas_layout(t.size(0), t.size(1), t.stride(0), t.stride(1), ld, trans);
  }
  return {t.const_data_ptr<T>(), ld, trans};
}

// Rows per block so that a block's working set (`row_bytes` a row) fills about half of a
// core's L2 (256 KiB), at least one row.
inline int64_t rows_per_block(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{256} << 10) / std::max<int64_t>(row_bytes, 1));
}

// Runs fn(chunk, begin, end) over `rows` rows cut into `chunks` contiguous chunks (one per
// thread at most), in parallel. A chunk's rows and its index depend only on `rows` and
// `chunks`, so per-chunk partial sums added in chunk order are reproducible.
template <class F>
void for_chunks(int64_t rows, int64_t chunks, const F& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c, rows * c / chunks, rows * (c + 1) / chunks);
  });
}

// How many chunks a reduction over `rows` rows in blocks of `block` rows uses.
inline int64_t chunk_count(int64_t rows, int64_t block) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), at::divup(rows, block)));
}

// out (n) = the sum of `chunks` partials of n elements each (parts, chunk-major), added in
// chunk order, so the result does not depend on which thread ran which chunk.
template <class T>
void sum_chunks(const std::vector<T>& parts, int64_t chunks, T* out, int64_t n) {
  std::fill(out, out + n, T(0));
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < n; ++i) out[i] += parts[c * n + i];
}

// The dtype products are computed in: fp64 for fp64, else fp32 (fp16/bf16 rounded once).
inline at::ScalarType work_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Refuses a tensor that is not a floating-point CPU tensor.
void check_floating(const char* op, const char* name, const at::Tensor& t);

// Refuses a tensor that is not a CPU tensor of dtype `dtype`.
void check_like(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype);

// Refuses an index tensor (1-D int64, CPU) with a value outside [0, size); returns it contiguous.
at::Tensor checked_index(const char* op, const char* name, const at::Tensor& index, int64_t size);

}  // namespace kronops::native
