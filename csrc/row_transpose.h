// Each row of a batch of small matrices transposed in place of a strided copy: the layout
// change of the bf16 backward on rows transposed (kron_bf16.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace kronops::native {

// t (M, p, q) of a 16-bit dtype (bf16, fp16) as a contiguous (M, q, p): row m is t[m]^T.
// Rows stored row-major (strides (any, q, 1)) go through 8x8 SSE2 tiles, rows in parallel;
// other strides through ATen's strided copy. Written into `into` when it is given (a
// contiguous buffer of t's dtype with at least M*p*q elements, not overlapping t; see
// buffer_of), else into a new tensor: never a view of t.
at::Tensor rows_transposed(const at::Tensor& t, const at::Tensor& into = {});

// A contiguous tensor of `shape` in `spare`'s storage when it is defined, contiguous, of
// `like`'s dtype and large enough, else a new one like `like`: a dead buffer used again
// (each fresh buffer of megabytes page-faults where freed memory goes back to the OS).
at::Tensor buffer_of(const at::Tensor& spare, at::IntArrayRef shape, const at::Tensor& like);

}  // namespace kronops::native
