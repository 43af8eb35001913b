"""S²FT's ``sparse_linear`` as one GEMM on a merged weight: the route ``sparse_linear`` takes
where ``dispatch.sparse_merge_pays`` says so.

Forward: W' = W with Δ added into its rows R or columns C (``kronops::sparse_merged_weight``:
a copy of W in its layout and an indexed add; W' is not kept), then y = x W'ᵀ + b, one
GEMM. Backward: W' rebuilt, dX = dY W' (one GEMM); dΔ by the op's own kernel
(``kronops::sparse_delta_grad``: dY[:, R]ᵀ X or dYᵀ X[:, C]); dbias = Σ dY. It saves what
the op saves (x, or X[:, C] alone in cols mode) and is differentiable as the op is (twice,
except in cols mode through dΔ to x).

The same function as the op, rounded differently: W' is rounded once to W's dtype, which
is why the rule takes this route for fp32 and fp64 only (in bf16 a Δ under half of W's
rounding step would vanish from W'). The op's Δ products are passes over the activations,
growing with the rows of x; building W' is a fixed pass over the weight, so it pays from
some number of rows on.

A Δ that is zero by construction (``S2FTInPlaceLinear``'s expanded zero: its updates are
written into W itself) takes this route always, in every dtype, with W' = W: nothing is
built or rounded, the forward and dX are the frozen layer's GEMMs and only dΔ is added (the
op would run its Δ products on zeros). Under create_graph dX is built through W' as above,
so that its derivative in Δ is there.
"""
import torch
import torch.nn.functional as F

from .ops import linear_grads, save_linear_inputs, sparse_merged_weight


def _merged_input_grad(dy, weight, delta, index, start, cols):
    """dX = dY W' (M, in) for dY (M, out); under create_graph differentiable in dY and Δ,
    never in W (frozen, as in the op)."""
    return dy @ sparse_merged_weight(weight.detach(), delta, index, start, cols)


def _frozen_input_grad(dy, weight, *_):
    """dX = dY W (M, in) for a Δ that is zero: W' = W."""
    return dy @ weight


class _MergedSparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, delta, index, start, bias, cols, zero_delta):
        save_linear_inputs(ctx, x, weight, delta, index, start, cols)
        ctx.zero_delta = zero_delta
        merged = weight if zero_delta else sparse_merged_weight(weight, delta, index, start, cols)
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad):
        frozen = ctx.zero_delta and not torch.is_grad_enabled()
        return *linear_grads(ctx, grad, _frozen_input_grad if frozen else _merged_input_grad), None


def sparse_linear_merged(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor,
                         index: torch.Tensor | None, start: int, bias: torch.Tensor | None,
                         cols: bool, zero_delta: bool = False) -> torch.Tensor:
    """``torch.ops.kronops.sparse_linear``'s function, arguments as it takes them (checked by
    ``sparse_linear``): x (M, in) -> (M, out), as one GEMM on the merged weight (on W itself
    where ``zero_delta``: Δ is zero by construction)."""
    return _MergedSparseLinear.apply(x, weight, delta, index, start, bias, cols, zero_delta)
