"""The adapter step as one GEMM: ``kron_linear_merged(x, weight, a, b, bias, scale=s)``
= x (W + s·A⊗B)ᵀ + bias, the frozen base linear and its Kronecker adapter in one product.

Forward: W' = W + s·A⊗B by one broadcast elementwise kernel (``merged_weight``; W' is not
kept), then one GEMM. Backward: W' rebuilt, dX = dY W' (one GEMM); dA and dB from x and dY
(``kron_grads``: one ``kron_rows_grads`` call without dX); dbias = Σ dY; dW = dYᵀ X only when
W needs a gradient. The same function as ``F.linear(x, W, bias) + kron_linear(x, a, b,
scale=s)``, rounded differently: W' is rounded once to W's dtype (in bf16 or fp16 an update
under half of W's rounding step vanishes from W', so the rule merges fp32 and fp64 only).
Building W' is a fixed pass over the weight while the separate adapter's passes grow with
the tokens, so it pays from some number of tokens on (``dispatch.merge_weight_pays``).
"""
import torch
import torch.nn.functional as F

from ..dtypes import autocast_off
from .ops import check_base_operands, kron_grads


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """W + s·kron(A, B) for weight (a1*b1, a2*b2), a (a1, a2), b (b1, b2): one pass (addcmul
    over broadcast views; half precision is computed in fp32 and rounded once on CUDA)."""
    (a1, a2), (b1, b2) = a.shape, b.shape
    w4 = weight.view(a1, b1, a2, b2)
    merged = torch.addcmul(w4, a.view(a1, 1, a2, 1), b.view(1, b1, 1, b2), value=scale)
    return merged.reshape(a1 * b1, a2 * b2)


class _MergedKronLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, a, b, bias, scale):
        ctx.save_for_backward(x, weight, a, b)
        ctx.scale = scale
        return F.linear(x, merged_weight(weight, a, b, scale), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        (a1, a2), (b1, b2) = a.shape, b.shape
        grad2, x2 = grad.reshape(-1, a1 * b1), x.reshape(-1, a2 * b2)
        grad_x = grad2 @ merged_weight(weight, a, b, ctx.scale) if need_x else None
        grad_w = grad2.mT @ x2 if need_w else None
        _, grad_a, grad_b = kron_grads(grad2.view(-1, a1, b1), x2.view(-1, a2, b2), a, b,
                                       ctx.scale, False, need_a, need_b)
        grad_bias = grad2.sum(0) if need_bias else None
        return (None if grad_x is None else grad_x.view(x.shape)), grad_w, grad_a, grad_b, \
            grad_bias, None


def kron_linear_merged(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       bias: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
    """``x @ (weight + scale * torch.kron(a, b)).T + bias``: a linear layer and its Kronecker
    adapter as one GEMM on a weight rebuilt each call (and again in backward).

    x: (..., a2*b2); weight: (a1*b1, a2*b2), any strides; a: (a1, a2); b: (b1, b2); bias:
    (a1*b1,) or None. Returns (..., a1*b1); inside autocast every operand is cast to the
    autocast dtype first. Differentiable in all tensors (twice, too).
    """
    x, weight, a, b, bias, scale = check_base_operands(x, weight, a, b, bias, scale)
    with autocast_off(x.device.type):
        return _MergedKronLinear.apply(x, weight, a, b, bias, scale)

