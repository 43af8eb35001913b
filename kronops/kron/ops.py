"""The Kronecker ops: ``kron_linear`` and ``kron_matmul``, and the custom ops under them.

``kronops::kron_rows``        y[m] = scale * vec(a @ x[m] @ b.T) + bias;  x (M, a2, b2) -> (M, a1*b1)
``kronops::kron_rows_keep``   the same y, and the intermediate it formed (X Bᵀ or A X, unscaled)
``kronops::kron_factor_grad`` scale * sum_m dy[m] @ f @ x[m].T;  dy (M, P, N), f (N, Q),
                              x (M, R, Q) -> (P, R) in dy's dtype (fp32 accumulation)
``kronops::kron_rows_grads``  (dX, dA, dB) of ``kron_rows`` for dy (M, a1, b1) in one call
                              (a gradient not asked for: an empty tensor); ``inner``: the
                              intermediate ``kron_rows_keep`` kept, or None
``kronops::kron_mode``        y[m] = f @ x[m];  x (M, q, r), f (p, q) -> (M, p, r): one factor
                              on one mode, ``kron_matmul``'s leading factors (no Triton
                              kernel: the default kernel's batched GEMM runs on CUDA)

Each is defined once (schemas: ``kronops.native.schemas``): its default kernel is the
PyTorch implementation (``reference.py``) on every device, the Triton launcher is
registered for CUDA and the native kernel for CPU (``kronops.backends``). One autograd
formula serves every backend: dX_m = A^T dY_m B is ``kron_rows`` with transposed factors,
dA and dB are ``kron_factor_grad``. A backward that builds no graph runs them as one
``kron_rows_grads`` call: the PyTorch kernel shares A^T dY between dX and dB and uses the
intermediate the forward kept, as autograd does on the composite forward; the native
kernel recomputes X Bᵀ per block of rows in cache, and on CUDA the three Triton kernels
run. Where the PyTorch kernels run, a forward whose factors need gradients is
``kron_rows_keep`` (``backends.recomputes_intermediate``). With ``create_graph`` the
differentiable ops run instead: the ops are twice differentiable. Tensors of any strides
are taken.
"""
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import backends
from . import dispatch
from ..checks import check_same, check_scale, check_tensor
from ..dtypes import accumulation_dtype, autocast_off, autocast_operands, composite_dtype
from .reference import (b_first, kron, torch_kron_factor_grad, torch_kron_rows,
                        torch_kron_rows_grads)

kernels = backends.import_kernels()


def default_kron_rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The default kernel, on every device (autocast off: the dtype the fake impl promises)."""
    with autocast_off(x.device.type):
        return torch_kron_rows(x, a, b, bias, scale).contiguous()


kron_rows = backends.custom_op("kron_rows", default_kron_rows)


@kron_rows.register_fake
def _(x, a, b, bias, scale):
    return x.new_empty((x.shape[0], a.shape[0] * b.shape[0]))


def default_kron_rows_keep(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           bias: torch.Tensor | None, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The default kernel, on every device (autocast off)."""
    with autocast_off(x.device.type):
        y, inner = torch_kron_rows(x, a, b, bias, scale, keep=True)
        return y.contiguous(), inner.contiguous()


kron_rows_keep = backends.custom_op("kron_rows_keep", default_kron_rows_keep)


def inner_shape(m, a, b):
    """The shape of the intermediate ``kron_rows_keep`` keeps: X Bᵀ or A X (``b_first``)."""
    (a1, a2), (b1, b2) = a.shape, b.shape
    return (m, a2, b1) if b_first(a1, a2, b1, b2) else (m, a1, b2)


@kron_rows_keep.register_fake
def _(x, a, b, bias, scale):
    return (x.new_empty((x.shape[0], a.shape[0] * b.shape[0])),
            x.new_empty(inner_shape(x.shape[0], a, b), dtype=composite_dtype(x)))


def default_kron_factor_grad(dy: torch.Tensor, f: torch.Tensor, x: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """The default kernel, on every device (autocast off)."""
    with autocast_off(dy.device.type):
        return torch_kron_factor_grad(dy, f, x, scale)


kron_factor_grad = backends.custom_op("kron_factor_grad", default_kron_factor_grad)


@kron_factor_grad.register_fake
def _(dy, f, x, scale):
    return dy.new_empty((dy.shape[1], x.shape[1]))


def default_kron_rows_grads(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                            b: torch.Tensor, scale: float, need_x: bool, need_a: bool,
                            need_b: bool, inner: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The default kernel, on every device (autocast off)."""
    with autocast_off(dy.device.type):
        return torch_kron_rows_grads(dy, x, a, b, scale, need_x, need_a, need_b, inner)


kron_rows_grads = backends.custom_op("kron_rows_grads", default_kron_rows_grads)


@kron_rows_grads.register_fake
def _(dy, x, a, b, scale, need_x, need_a, need_b, inner=None):
    def grad(needed, shape):
        return dy.new_empty(shape if needed else (0,))
    return (grad(need_x, (x.shape[0], a.shape[1], b.shape[1])), grad(need_a, a.shape),
            grad(need_b, b.shape))


def default_kron_mode(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """The default kernel, on every device: one batched product in ``composite_dtype``."""
    with autocast_off(x.device.type):
        work = composite_dtype(x)
        return torch.matmul(f.to(work), x.to(work)).to(x.dtype).contiguous()


kron_mode = backends.custom_op("kron_mode", default_kron_mode)


@kron_mode.register_fake
def _(x, f):
    return x.new_empty((x.shape[0], f.shape[0], x.shape[2]))


def _mode_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mode_backward(ctx, grad):
    """dX_m = fᵀ dY_m (the op again), df = Σ_m dY_m X_mᵀ (accumulated in fp32, fp64 for fp64)."""
    x, f = ctx.saved_tensors
    grad_x = kron_mode(grad, f.mT) if ctx.needs_input_grad[0] else None
    grad_f = None
    if ctx.needs_input_grad[1]:
        acc = accumulation_dtype(grad.dtype)
        grad_f = torch.einsum("mpr,mqr->pq", grad.to(acc), x.to(acc)).to(f.dtype)
    return grad_x, grad_f


kron_mode.register_autograd(_mode_backward, setup_context=_mode_setup_context)


def triton_kron_rows(x, a, b, bias, scale):
    """CUDA kernel of ``kron_rows``: the persistent kernel where ``dispatch`` picks it, else
    one program per row block."""
    if dispatch.persistent_forward(kernels.kron_rows_persistent_fits(*a.shape, *b.shape, x.dtype)):
        return kernels.triton_kron_rows_persistent(x, a, b, bias, scale)
    return kernels.triton_kron_rows(x, a, b, bias, scale)


def triton_kron_rows_grads(dy, x, a, b, scale, need_x, need_a, need_b, inner=None):
    """CUDA kernel of ``kron_rows_grads``: one pass over x and dY where every factor fits a
    tile, else the dX, dA and dB Triton kernels (``inner`` is not used: they recompute
    X Bᵀ on chip)."""
    if dispatch.one_pass_backward(kernels.kron_rows_grads_fits(*a.shape, *b.shape, dy.dtype)):
        return kernels.triton_kron_rows_grads_one_pass(dy, x, a, b, scale, need_x, need_a,
                                                       need_b)
    dx = kernels.triton_kron_rows(dy, a.mT, b.mT, None, scale) if need_x else dy.new_empty(0)
    da = kernels.triton_kron_factor_grad(dy, b, x, scale) if need_a else dy.new_empty(0)
    db = kernels.triton_kron_factor_grad(dy.mT, a, x.mT, scale) if need_b else dy.new_empty(0)
    return dx, da, db


def _setup_context(ctx, inputs, output):
    x, a, b, bias, scale = inputs
    ctx.save_for_backward(x, a, b, None)
    ctx.scale = scale


def _keep_setup_context(ctx, inputs, output):
    x, a, b, bias, scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the kept intermediate
    ctx.save_for_backward(x, a, b, output[1])
    ctx.scale = scale


def _keep_backward(ctx, grad, _):
    if grad is None:  # the node reached without a gradient for y (gradcheck does this)
        return None, None, None, None, None
    return _backward(ctx, grad)


def kron_grads(grad3, x, a, b, scale, need_x, need_a, need_b, inner=None):
    """(dX, dA, dB) of y_m = s A X_m Bᵀ for grad3 (M, a1, b1), x (M, a2, b2); None where not
    needed. dX_m = s Aᵀ dY_m B, dA = s Σ_m dY_m B X_mᵀ, dB = s Σ_m dY_mᵀ A X_m. Under
    ``create_graph`` (grad mode on) through the ops that are differentiable themselves,
    otherwise as one ``kron_rows_grads`` call (``inner``: the intermediate the forward kept)."""
    if torch.is_grad_enabled():
        grad_x = kron_rows(grad3, a.mT, b.mT, None, scale).view(x.shape) if need_x else None
        grad_a = kron_factor_grad(grad3, b, x, scale) if need_a else None
        grad_b = kron_factor_grad(grad3.mT, a, x.mT, scale) if need_b else None
        return grad_x, grad_a, grad_b
    grad_x, grad_a, grad_b = kron_rows_grads(grad3, x, a, b, scale, need_x, need_a, need_b,
                                             inner)
    return (grad_x.view(x.shape) if need_x else None, grad_a if need_a else None,
            grad_b if need_b else None)


def _backward(ctx, grad):
    """dX, dA, dB (``kron_grads``) and dbias = Σ dY."""
    x, a, b, inner = ctx.saved_tensors
    need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
    grad3 = grad.reshape(x.shape[0], a.shape[0], b.shape[0])
    grad_x, grad_a, grad_b = kron_grads(grad3, x, a, b, ctx.scale, need_x, need_a, need_b, inner)
    grad_bias = grad.sum(0) if need_bias else None
    return grad_x, grad_a, grad_b, grad_bias, None


kron_rows.register_autograd(_backward, setup_context=_setup_context)
kron_rows_keep.register_autograd(_keep_backward, setup_context=_keep_setup_context)


def _factor_grad_setup_context(ctx, inputs, output):
    dy, f, x, scale = inputs
    ctx.save_for_backward(dy, f, x)
    ctx.scale = scale


def _factor_grad_backward(ctx, grad):
    """G = s sum_m dy_m f x_m^T: gdy_m = s gG x_m f^T, gx_m = s gG^T dy_m f, gf = s sum dy_m^T gG x_m."""
    dy, f, x = ctx.saved_tensors
    need_dy, need_f, need_x = ctx.needs_input_grad[:3]
    s = ctx.scale
    grad_dy = kron_rows(x, grad, f, None, s).view(dy.shape) if need_dy else None
    grad_f = kron_factor_grad(dy.mT, grad, x.mT, s) if need_f else None
    grad_x = kron_rows(dy, grad.mT, f.mT, None, s).view(x.shape) if need_x else None
    return grad_dy, grad_f, grad_x, None


kron_factor_grad.register_autograd(_factor_grad_backward, setup_context=_factor_grad_setup_context)


def check_kron_operands(x, a, b, bias, scale):
    """Validate kron_linear's operands (errors name the argument); returns (x, a, b, bias,
    scale) cast to the autocast dtype when autocast is on, scale as a float."""
    check_tensor("x", x)
    check_tensor("a", a, dim=2, nonempty=True)
    check_tensor("b", b, dim=2, nonempty=True)
    scale = check_scale(scale)
    if bias is not None:
        check_tensor("bias", bias, dim=1)
    x, a, b, bias = autocast_operands(x.device.type, x, a, b, bias)
    check_same("x", x, a=a, b=b, bias=bias)
    (a1, a2), (b1, b2) = a.shape, b.shape
    if x.dim() == 0 or x.shape[-1] != a2 * b2:
        raise ValueError(f"x must have last dim a2*b2 = {a2 * b2} for a of shape {tuple(a.shape)} "
                         f"and b of shape {tuple(b.shape)}, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape[0] != a1 * b1:
        raise ValueError(f"bias must have length a1*b1 = {a1 * b1}, got {bias.shape[0]}")
    return x, a, b, bias, scale


def kron_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                bias: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
    """``scale * x @ torch.kron(a, b).T + bias``, fused: ``kron(a, b)`` is not formed, except
    for small products where one GEMM on it is cheaper (``dispatch.materialise_pays``).

    x: (..., a2*b2); a: (a1, a2); b: (b1, b2); bias: (a1*b1,) or None; all of any strides.
    scale: a finite number. Returns (..., a1*b1) in x's dtype (inside an autocast region, all
    operands are cast to the autocast dtype, as for F.linear). Differentiable in x, a, b and
    bias.
    """
    x, a, b, bias, scale = check_kron_operands(x, a, b, bias, scale)
    (a1, a2), (b1, b2) = a.shape, b.shape
    if dispatch.materialise_pays(x.device.type, a2 * b2, a1 * b1):
        with autocast_off(x.device.type):
            return F.linear(x, kron(a, b) * scale, bias)
    lead = x.shape[:-1]
    rows = x.reshape(-1, a2, b2)
    if (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
            and not backends.recomputes_intermediate(x.device.type, x.dtype)):
        y = kron_rows_keep(rows, a, b, bias, scale)[0]
    else:
        y = kron_rows(rows, a, b, bias, scale)
    return y.view(*lead, a1 * b1)


def kron_matmul(x: torch.Tensor, factors: Sequence[torch.Tensor], *,
                scale: float = 1.0) -> torch.Tensor:
    """``scale * x @ kron(f1, ..., fN).T`` for N >= 1 factors fi of shape (pi, qi).

    x: (..., q1*...*qN); x and the factors of any strides; scale: a finite number. Returns
    (..., p1*...*pN), in the autocast dtype inside an autocast region. With three or more
    factors, small groups of them are multiplied out into two factors for one ``kron_linear``
    where that pays (``dispatch.factor_split``); otherwise the leading factors are applied one
    mode at a time (``kron_mode``) and the last two run fused in ``kron_linear``.
    Differentiable in x and every factor.
    """
    check_tensor("x", x)
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence) or not factors:
        raise TypeError("factors must be a non-empty list or tuple of 2-D tensors")
    for i, f in enumerate(factors):
        check_tensor(f"factors[{i}]", f, dim=2, nonempty=True)
    scale = check_scale(scale)
    x, *factors = autocast_operands(x.device.type, x, *factors)
    check_same("x", x, **{f"factors[{i}]": f for i, f in enumerate(factors)})
    q = [f.shape[1] for f in factors]
    if x.dim() == 0 or x.shape[-1] != math.prod(q):
        raise ValueError(f"x must have last dim q1*...*qN = {math.prod(q)} for factor column "
                         f"counts {q}, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    p = [f.shape[0] for f in factors]
    split = dispatch.factor_split(x.device.type, [tuple(f.shape) for f in factors])
    if split is not None:
        a, b = (functools.reduce(kron, fs) for fs in (factors[:split], factors[split:]))
        return kron_linear(x, a, b, scale=scale)
    if len(factors) == 1:
        y = F.linear(x, factors[0])
        return y * scale if scale != 1.0 else y
    # Mode k: (rows * p1..p(k-1), qk, q(k+1)..qN) -> (rows * p1..p(k-1), pk, q(k+1)..qN).
    t = x.reshape(-1, math.prod(q))
    for k, f in enumerate(factors[:-2]):
        t = kron_mode(t.reshape(-1, q[k], math.prod(q[k + 1:])), f)
    y = kron_linear(t.reshape(-1, q[-2] * q[-1]), factors[-2], factors[-1], scale=scale)
    return y.reshape(*lead, math.prod(p))


backends.defined(kron_rows, kron_rows_keep, kron_factor_grad, kron_rows_grads, kron_mode)
if kernels is not None:
    backends.register_triton(kron_rows, triton_kron_rows, default_kron_rows)
    backends.register_triton(kron_factor_grad, kernels.triton_kron_factor_grad,
                             default_kron_factor_grad)
    backends.register_triton(kron_rows_grads, triton_kron_rows_grads, default_kron_rows_grads)
