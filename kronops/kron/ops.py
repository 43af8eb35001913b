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
                              kernel: the PyTorch kernel's batched GEMM runs on CUDA)

Each is declared once, by its ``OpSpec`` below (``kronops.backends.define``): its PyTorch
kernel (``torch_kernels``) on every device, its Triton kernel (``kronops.kernels.kron``) for
CUDA and its native kernel (csrc/kron.cpp) for CPU. One autograd formula serves every
backend: dX_m = A^T dY_m B is ``kron_rows`` with transposed factors, dA and dB are
``kron_factor_grad``. A backward that builds no graph runs them as one ``kron_rows_grads``
call: the PyTorch kernel shares A^T dY between dX and dB and uses the intermediate the
forward kept, as autograd does on the composite forward; the native kernel recomputes X Bᵀ
per block of rows in cache, and on CUDA the Triton kernels recompute it on chip. Where the
PyTorch kernel runs, a forward whose factors need gradients is ``kron_rows_keep``
(``backends.run_keeping``). With ``create_graph`` the differentiable ops run instead: the
ops are twice differentiable. Tensors of any strides are taken.
"""
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import backends
from ..backends import OpSpec
from ..checks import check_same, check_scale, check_tensor
from ..dtypes import accumulation_dtype, autocast_off, autocast_operands, kept_dtype
from ..kernels import partial_sums
from ..kernels.kron import factor_grad, rows, rows_grads, rows_persistent
from . import dispatch, torch_kernels
from .torch_kernels import b_first, kron


def _rows_fake(x, a, b, bias, scale):
    return x.new_empty((x.shape[0], a.shape[0] * b.shape[0]))


def inner_shape(m, a, b):
    """The shape of the intermediate ``kron_rows_keep`` keeps: X Bᵀ or A X (``b_first``)."""
    (a1, a2), (b1, b2) = a.shape, b.shape
    return (m, a2, b1) if b_first(a1, a2, b1, b2) else (m, a1, b2)


def _keep_fake(x, a, b, bias, scale):
    return (_rows_fake(x, a, b, bias, scale),
            x.new_empty(inner_shape(x.shape[0], a, b), dtype=kept_dtype(x)))


def _factor_grad_fake(dy, f, x, scale):
    return dy.new_empty((dy.shape[1], x.shape[1]))


def _rows_grads_fake(dy, x, a, b, scale, need_x, need_a, need_b, inner=None):
    def grad(needed, shape):
        return dy.new_empty(shape if needed else (0,))
    return (grad(need_x, (x.shape[0], a.shape[1], b.shape[1])), grad(need_a, a.shape),
            grad(need_b, b.shape))


def _mode_fake(x, f):
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


FACTOR_GRAD_CASES = (factor_grad.compile_cases, partial_sums.compile_cases)

kron_rows = backends.define(OpSpec(
    "kronops::kron_rows(Tensor x, Tensor a, Tensor b, Tensor? bias, float scale) -> Tensor",
    torch_kernel=torch_kernels.kron_rows, fake=_rows_fake,
    backward=_backward, setup_context=_setup_context,
    triton=rows.triton_kron_rows,
    compile_cases=(rows.compile_cases, rows_persistent.compile_cases)))

kron_rows_keep = backends.define(OpSpec(
    "kronops::kron_rows_keep(Tensor x, Tensor a, Tensor b, Tensor? bias, float scale) -> (Tensor, Tensor)",
    torch_kernel=torch_kernels.kron_rows_keep, fake=_keep_fake,
    backward=_keep_backward, setup_context=_keep_setup_context))

kron_factor_grad = backends.define(OpSpec(
    "kronops::kron_factor_grad(Tensor dy, Tensor f, Tensor x, float scale) -> Tensor",
    torch_kernel=torch_kernels.kron_factor_grad, fake=_factor_grad_fake,
    backward=_factor_grad_backward, setup_context=_factor_grad_setup_context,
    triton=factor_grad.triton_kron_factor_grad, compile_cases=FACTOR_GRAD_CASES))

kron_rows_grads = backends.define(OpSpec(
    "kronops::kron_rows_grads(Tensor dy, Tensor x, Tensor a, Tensor b, float scale, bool need_x, bool need_a, bool need_b, Tensor? inner=None) -> (Tensor, Tensor, Tensor)",
    torch_kernel=torch_kernels.kron_rows_grads, fake=_rows_grads_fake,
    triton=rows_grads.triton_kron_rows_grads,
    compile_cases=(rows_grads.compile_cases, rows.compile_cases, *FACTOR_GRAD_CASES)))

kron_mode = backends.define(OpSpec(
    "kronops::kron_mode(Tensor x, Tensor f) -> Tensor",
    torch_kernel=torch_kernels.kron_mode, fake=_mode_fake,
    backward=_mode_backward, setup_context=_mode_setup_context))


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


def check_base_operands(x, weight, a, b, bias, scale):
    """``check_kron_operands`` and a base weight (a1*b1, a2*b2) beside the adapter's factors
    (any strides); returns (x, weight, a, b, bias, scale), cast to the autocast dtype."""
    check_tensor("weight", weight, dim=2)
    x, a, b, bias, scale = check_kron_operands(x, a, b, bias, scale)
    (weight,) = autocast_operands(x.device.type, weight)
    check_same("x", x, weight=weight)
    out_features, in_features = a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]
    if weight.shape != (out_features, in_features):
        raise ValueError(f"weight must have shape (a1*b1, a2*b2) = ({out_features}, "
                         f"{in_features}), got {tuple(weight.shape)}")
    return x, weight, a, b, bias, scale


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
    args = (x.reshape(-1, a2, b2), a, b, bias, scale)
    y = backends.run_keeping(kron_rows, kron_rows_keep, args, a.requires_grad or b.requires_grad)
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
