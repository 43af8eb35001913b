"""The S²FT custom ops (torch.library): schema, fake impls, autograd, dispatch.

``kronops::sparse_linear``      x (M, in) -> (M, out): x Wᵀ + b, Δ added into rows R or cols C
``kronops::sparse_input_grad``  dX (M, in) for dY (M, out)
``kronops::sparse_delta_grad``  dΔ in fp32: rows dY[:, R]ᵀ X, cols dYᵀ X[:, C] (X[:, C] given)

An index is an int64 tensor, or ``None`` and ``start`` for a contiguous range as long as
Δ's side; ``cols`` picks the mode. The dense x Wᵀ and dY W run as torch matmuls; on CUDA
the Δ products run the gathered Triton kernels (``kronops.kernels.sparse_*``), elsewhere
the composite path. Gradients go to x, delta and bias, never to weight: no (out, in)
gradient or copy of W is made, and cols mode saves only X[:, C] (not X) for backward.
All three are twice differentiable (the gradient ops' own backward is plain torch), except
that cols mode raises on a double backward that needs d(dΔ)/dx (X[:, C] is saved detached).
"""
import torch

from .backend import use_triton
from .dtypes import accumulation_dtype
from .sparse_reference import (add_into, sparse_delta_grad_composite,
                               sparse_input_grad_composite, sparse_linear_composite, take)


def _cols(index, start):
    return index if index is not None else start


@torch.library.custom_op("kronops::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor,
                  index: torch.Tensor | None, start: int, bias: torch.Tensor | None,
                  cols: bool) -> torch.Tensor:
    if not use_triton(x):
        return sparse_linear_composite(x, weight, delta, index, start, bias, cols)
    from .kernels.sparse_linear import sparse_matmul_add
    y = torch.nn.functional.linear(x, weight, bias)
    if cols:
        return sparse_matmul_add(y, x, delta, _cols(index, start), 0)
    return sparse_matmul_add(y, x, delta, 0, _cols(index, start))


@sparse_linear.register_fake
def _(x, weight, delta, index, start, bias, cols):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("kronops::sparse_input_grad", mutates_args=())
def sparse_input_grad(dy: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor,
                      index: torch.Tensor | None, start: int, cols: bool) -> torch.Tensor:
    if not use_triton(dy):
        return sparse_input_grad_composite(dy, weight, delta, index, start, cols)
    from .kernels.sparse_linear import sparse_matmul_add
    dx = dy @ weight
    if cols:
        return sparse_matmul_add(dx, dy, delta.mT, 0, _cols(index, start))
    return sparse_matmul_add(dx, dy, delta.mT, _cols(index, start), 0)


@sparse_input_grad.register_fake
def _(dy, weight, delta, index, start, cols):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


@torch.library.custom_op("kronops::sparse_delta_grad", mutates_args=())
def sparse_delta_grad(dy: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None,
                      start: int, cols: bool, rows_of_delta: int) -> torch.Tensor:
    shape = (dy.shape[1], x.shape[1]) if cols else (rows_of_delta, x.shape[1])
    if not use_triton(dy):
        return sparse_delta_grad_composite(dy, x, index, start, cols, shape)
    from .kernels.sparse_delta_grad import sparse_delta_grad as kernel
    if cols:
        return kernel(dy, x, 0, shape[0], 0, shape[1])
    return kernel(dy, x, _cols(index, start), shape[0], 0, shape[1])


@sparse_delta_grad.register_fake
def _(dy, x, index, start, cols, rows_of_delta):
    rows = dy.shape[1] if cols else rows_of_delta
    return dy.new_empty((rows, x.shape[1]), dtype=accumulation_dtype(dy.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, delta, index, start, bias, cols = inputs
    need_x, _, need_delta = ctx.needs_input_grad[:3]
    saved_x = None
    if need_delta:  # cols mode keeps only X[:, C], as its own (M, |C|) tensor
        saved_x = take(x, index, start, delta.shape[1]).contiguous() if cols else x
    ctx.save_for_backward(saved_x, weight if need_x else None, delta, index)
    ctx.start, ctx.cols = start, cols


def _backward(ctx, grad):
    saved_x, weight, delta, index = ctx.saved_tensors
    need_x, _, need_delta = ctx.needs_input_grad[:3]
    grad_x = grad_delta = grad_bias = None
    if need_x:
        grad_x = sparse_input_grad(grad, weight, delta, index, ctx.start, ctx.cols)
    if need_delta:
        if ctx.cols and need_x and torch.is_grad_enabled():
            raise RuntimeError("sparse_linear in cols mode saves X[:, C] detached from x, so it "
                               "has no double backward through delta's gradient to x; detach x "
                               "or use rows mode")
        grad_delta = sparse_delta_grad(grad, saved_x, index, ctx.start, ctx.cols,
                                       delta.shape[0]).to(delta.dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.sum(0)
    return grad_x, None, grad_delta, None, None, grad_bias, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


def _input_grad_setup_context(ctx, inputs, output):
    dy, weight, delta, index, start, cols = inputs
    ctx.save_for_backward(dy, weight, delta, index)
    ctx.start, ctx.cols = start, cols


def _input_grad_backward(ctx, grad):
    """dX = dY W' (W' = W with Δ added in): gdY = g W'ᵀ is the forward op; gΔ a delta grad."""
    dy, weight, delta, index = ctx.saved_tensors
    grad_dy = grad_delta = None
    if ctx.needs_input_grad[0]:
        grad_dy = sparse_linear(grad, weight, delta, index, ctx.start, None, ctx.cols)
    if ctx.needs_input_grad[2]:
        # rows: gΔ = dY[:, R]ᵀ g;  cols: gΔ = dYᵀ g[:, C]
        other = take(grad, index, ctx.start, delta.shape[1]) if ctx.cols else grad
        grad_delta = sparse_delta_grad(dy, other, index, ctx.start, ctx.cols,
                                       delta.shape[0]).to(delta.dtype)
    return grad_dy, None, grad_delta, None, None, None


sparse_input_grad.register_autograd(_input_grad_backward,
                                    setup_context=_input_grad_setup_context)


def _delta_grad_setup_context(ctx, inputs, output):
    dy, x, index, start, cols, rows_of_delta = inputs
    ctx.save_for_backward(dy, x, index)
    ctx.start, ctx.cols, ctx.rows_of_delta = start, cols, rows_of_delta


def _delta_grad_backward(ctx, grad):
    """G = dY[:, R]ᵀ X (rows) or dYᵀ X (cols): plain torch ops (second order is rare)."""
    dy, x, index = ctx.saved_tensors
    g = grad.to(dy.dtype)
    grad_dy = grad_x = None
    if ctx.needs_input_grad[0]:
        part = x @ g.mT
        grad_dy = part if ctx.cols else add_into(dy.new_zeros(dy.shape), index, ctx.start, part)
    if ctx.needs_input_grad[1]:
        grad_x = (dy if ctx.cols else take(dy, index, ctx.start, ctx.rows_of_delta)) @ g
    return grad_dy, grad_x, None, None, None, None


sparse_delta_grad.register_autograd(_delta_grad_backward, setup_context=_delta_grad_setup_context)
