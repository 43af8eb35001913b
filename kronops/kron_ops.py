"""The Kronecker custom ops (torch.library): schema, fake impls, autograd, dispatch.

``kronops::kron_rows``        y[m] = scale * vec(a @ x[m] @ b.T) + bias, x (M, a2, b2) -> (M, a1*b1)
``kronops::kron_factor_grad`` sum_m dy[m] @ f @ x[m].T in fp32, dy (M, P, N), f (N, Q), x (M, R, Q)

Both take tensors of any strides and are twice differentiable. CUDA tensors run the Triton kernels, everything else the
composite PyTorch path (see ``kronops.backend``). On the Triton path backward reuses the
two ops: dX_m = A^T dY_m B is ``kron_rows`` with transposed factors, dA and dB are
``kron_factor_grad``; the composite backward is plain batched matmuls.
"""
import torch

from .dtypes import accumulation_dtype, autocast_off
from .backend import use_triton
from .kron_reference import (kron_factor_grad_composite, kron_rows_backward_composite,
                             kron_rows_composite)


@torch.library.custom_op("kronops::kron_rows", mutates_args=())
def kron_rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    if use_triton(x):
        from .kernels import kron_rows as kernel
        return kernel(x, a, b, bias, scale)
    with autocast_off(x.device.type):
        return kron_rows_composite(x, a, b, bias, scale).contiguous()


@kron_rows.register_fake
def _(x, a, b, bias, scale):
    return x.new_empty((x.shape[0], a.shape[0] * b.shape[0]))


@torch.library.custom_op("kronops::kron_factor_grad", mutates_args=())
def kron_factor_grad(dy: torch.Tensor, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if use_triton(dy):
        from .kernels import kron_factor_grad as kernel
        return kernel(dy, f, x)
    with autocast_off(dy.device.type):
        return kron_factor_grad_composite(dy, f, x)


@kron_factor_grad.register_fake
def _(dy, f, x):
    return dy.new_empty((dy.shape[1], x.shape[1]), dtype=accumulation_dtype(dy.dtype))


def _setup_context(ctx, inputs, output):
    x, a, b, bias, scale = inputs
    ctx.save_for_backward(x, a, b)
    ctx.scale = scale


def _backward(ctx, grad):
    x, a, b = ctx.saved_tensors
    scale = ctx.scale
    grad3 = grad.reshape(x.shape[0], a.shape[0], b.shape[0])
    grad_bias = grad.sum(0) if ctx.needs_input_grad[3] else None
    if not use_triton(grad):  # plain torch ops, sharing intermediates (and differentiable)
        with autocast_off(grad.device.type):
            grads = kron_rows_backward_composite(grad3 * scale, x, a, b, ctx.needs_input_grad[:3])
        grad_x, grad_a, grad_b = (None if g is None else g.to(t.dtype)
                                  for g, t in zip(grads, (x, a, b)))
        return grad_x, grad_a, grad_b, grad_bias, None
    grad_x = grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = kron_rows(grad3, a.mT, b.mT, None, scale).view(x.shape)
    if ctx.needs_input_grad[1]:
        grad_a = (kron_factor_grad(grad3, b, x) * scale).to(a.dtype)
    if ctx.needs_input_grad[2]:
        grad_b = (kron_factor_grad(grad3.mT, a, x.mT) * scale).to(b.dtype)
    return grad_x, grad_a, grad_b, grad_bias, None


kron_rows.register_autograd(_backward, setup_context=_setup_context)


def _factor_grad_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _factor_grad_backward(ctx, grad):
    """G = sum_m dy_m f x_m^T: gdy_m = gG x_m f^T, gx_m = gG^T dy_m f, gf = sum_m dy_m^T gG x_m."""
    dy, f, x = ctx.saved_tensors
    g = grad.to(dy.dtype)
    grad_dy = grad_f = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_dy = kron_rows(x, g, f, None, 1.0).view(dy.shape)
    if ctx.needs_input_grad[1]:
        grad_f = kron_factor_grad(dy.mT, g, x.mT).to(f.dtype)
    if ctx.needs_input_grad[2]:
        grad_x = kron_rows(dy, g.mT, f.mT, None, 1.0).view(x.shape)
    return grad_dy, grad_f, grad_x


kron_factor_grad.register_autograd(_factor_grad_backward, setup_context=_factor_grad_setup_context)
