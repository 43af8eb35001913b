// Each row of a batch of small matrices transposed in place of a strided copy: the layout
// change of the bf16 backward on rows transposed (kron_bf16.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace kronops::native {

// t (M, p, q) of a 16-bit dtype (bf16, fp16) as a new contiguous (M, q, p): row m is t[m]^T.
// Rows stored row-major (strides (any, q, 1)) go through 8x8 SSE2 tiles, rows in parallel;
// other strides through ATen's strided copy.
at::Tensor rows_transposed(const at::Tensor& t);

}  // namespace kronops::native
