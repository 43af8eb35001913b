// How the native kernels cut their rows: blocks sized for the cache, contiguous chunks (one
// per thread at most), and per-chunk partial sums added in a fixed order.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace kronops::native {

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

}  // namespace kronops::native
