"""The adapter beside its base in one autograd node: ``kron_linear_summed(x, weight, a, b,
bias, scale=s)`` = x Wᵀ + bias + s·x (A⊗B)ᵀ, the same function as ``F.linear(x, W, bias) +
kron_linear(x, a, b, scale=s)``, with the base's GEMMs accumulating into the adapter's
outputs instead of writing their own.

Forward: y = the adapter's output (bias added by its kernel), then y += x Wᵀ in place (one
GEMM with β = 1). Backward: dX = the adapter's dX (``kron_grads``), then dX += dY W in place;
dA, dB from the same call; dbias = Σ dY; dW = dYᵀ X only when W needs a gradient. The base's
output and its dX are never tensors of their own and no pass sums them: two activation-sized
temporaries and two passes fewer a step than the two layers summed (the difference shows
where fresh allocations page-fault: bench/NOTES.md). Each sum is the GEMM's, rounded once.
Unlike the merged weight (``kron_linear_merged``) nothing is rounded into W, so it serves
every dtype; what it saves is fixed per token, so it serves every size.
"""
import torch

from .. import backends
from ..dtypes import autocast_off
from .ops import check_base_operands, kron_grads, kron_rows, kron_rows_keep


class _SummedKronLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, a, b, bias, scale):
        (_, a2), (_, b2) = a.shape, b.shape
        args = (x2.view(-1, a2, b2), a, b, bias, scale)
        keep = (a.requires_grad or b.requires_grad) and backends.keeps_intermediate(kron_rows,
                                                                                     x2)
        y, inner = kron_rows_keep(*args) if keep else (kron_rows(*args), None)
        ctx.save_for_backward(x2, weight, a, b, inner)
        ctx.scale = scale
        # y (M, a1*b1) itself, not a view of it: callers may add into the output in place
        # (transformers' Falcon does), which autograd refuses on a view made in a Function
        return y.addmm_(x2, weight.mT)

    @staticmethod
    def backward(ctx, grad):
        x2, weight, a, b, inner = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        (a1, a2), (b1, b2) = a.shape, b.shape
        grad2 = grad.reshape(x2.shape[0], a1 * b1)
        grad_x, grad_a, grad_b = kron_grads(grad2.view(-1, a1, b1), x2.view(-1, a2, b2), a, b,
                                            ctx.scale, need_x, need_a, need_b, inner)
        if need_x:  # out of place under create_graph, where the sum is part of the graph
            grad_x = grad_x.view(x2.shape)
            grad_x = (torch.addmm(grad_x, grad2, weight) if torch.is_grad_enabled()
                      else grad_x.addmm_(grad2, weight))
        grad_w = grad2.mT @ x2 if need_w else None
        grad_bias = grad2.sum(0) if need_bias else None
        return grad_x, grad_w, grad_a, grad_b, grad_bias, None


def kron_linear_summed(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       bias: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
    """``x @ weight.T + bias + scale * x @ torch.kron(a, b).T``: a linear layer and its
    Kronecker adapter in one autograd node, the base's GEMMs added into the adapter's outputs.

    x: (..., a2*b2); weight: (a1*b1, a2*b2), any strides; a: (a1, a2); b: (b1, b2); bias:
    (a1*b1,) or None. Returns (..., a1*b1); inside autocast every operand is cast to the
    autocast dtype first. Differentiable in all tensors (twice, too).
    """
    x, weight, a, b, bias, scale = check_base_operands(x, weight, a, b, bias, scale)
    lead = x.shape[:-1]
    with autocast_off(x.device.type):
        y = _SummedKronLinear.apply(x.reshape(-1, x.shape[-1]), weight, a, b, bias, scale)
    return y.view(*lead, y.shape[-1])
