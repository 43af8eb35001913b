"""The PyTorch kernels of the S²FT ops, named after them: the default kernel of each op on
every device (``kronops.s2ft.ops`` declares the ops). They never copy W, except
``sparse_merged_weight``, whose result is the copy W' with Δ added in.

Terms: a frozen weight W (out, in); rows mode trains output rows R with Δ (|R|, in), cols
mode trains input columns C with Δ (out, |C|). An index is either an int64 tensor or, for
a contiguous range, ``None`` plus its start (the length is Δ's). Each kernel takes its op's
arguments; ``kronops.backends`` runs it after the op's argument check, with autocast off.
"""
import torch
import torch.nn.functional as F

from ..dtypes import accumulation_dtype


def take(t: torch.Tensor, index: torch.Tensor | None, start: int, count: int) -> torch.Tensor:
    """Columns of a 2-D ``t``: ``t[:, index]``, or the view ``t[:, start:start+count]``.
    (A gather with the index broadcast over rows: on CPU ATen's index_select along columns
    took 3x as long in bf16, 0.32 against 0.10 ms at 1024 x 2048 -> 102 columns.)"""
    if index is None:
        return t.narrow(1, start, count)
    return t.gather(1, index.expand(t.shape[0], index.shape[0]))


def addmm_into(out: torch.Tensor, index: torch.Tensor | None, start: int, a: torch.Tensor,
               b: torch.Tensor) -> torch.Tensor:
    """``out[:, index] += a @ b`` in place (a range: one GEMM accumulating into the slice
    ``out[:, start:start+k]``, no (M, k) temporary); returns out."""
    if index is None:
        out.narrow(1, start, b.shape[1]).addmm_(a, b)
        return out
    return out.index_add_(1, index, a @ b)


def sparse_linear(x, weight, delta, index, start, bias, cols):
    """x (M, in) -> (M, out): x Wᵀ + b, plus x Δᵀ into columns R, or plus x[:, C] Δᵀ.

    Rows: the dense GEMM, then the Δ GEMM into columns R. Cols: the small Δ GEMM first (with
    the bias), then the dense GEMM accumulates onto it, reading y in its epilogue rather
    than in a second pass over y.
    """
    if cols:
        return F.linear(take(x, index, start, delta.shape[1]), delta, bias).addmm_(x, weight.mT)
    return addmm_into(F.linear(x, weight, bias), index, start, x, delta.mT)


def sparse_input_grad(dy, weight, delta, index, start, cols):
    """dX (M, in) for dY (M, out): rows dY[:, R] Δ, then the dense dY W accumulated onto it;
    cols dY W, then dY Δ into columns C (the order of ``sparse_linear``)."""
    if cols:
        return addmm_into(dy @ weight, index, start, dy, delta)
    return (take(dy, index, start, delta.shape[0]) @ delta).addmm_(dy, weight)


def sparse_delta_grad(dy, x, index, start, cols, rows_of_delta):
    """dΔ in dy's dtype (accumulated in fp32, fp64 for fp64): rows dY[:, R]ᵀ X, (|R|, in);
    cols dYᵀ X[:, C], (out, |C|), where ``x`` is the saved X[:, C] itself (index unused)."""
    acc = accumulation_dtype(dy.dtype)
    d = dy if cols else take(dy, index, start, rows_of_delta)
    return (d.mT.to(acc) @ x.to(acc)).to(dy.dtype)


def sparse_merged_weight(weight, delta, index, start, cols):
    """W' (out, in) in W's layout: ``weight`` with Δ added into rows R (or columns C), each
    element rounded once to W's dtype."""
    dim = 1 if cols else 0
    merged = weight.clone()
    if index is None:
        merged.narrow(dim, start, delta.shape[dim]).add_(delta)
        return merged
    return merged.index_add_(dim, index, delta)


def sparse_adamw(weight, grad, exp_avg, exp_avg_sq, master, index, start, cols, lr, beta1,
                       beta2, eps, weight_decay, step):
    """AdamW (torch.optim.AdamW's arithmetic) on the submatrix S = W[R] or W[:, C], in place.

    grad (P, Q) is S's gradient; exp_avg, exp_avg_sq (P, Q) the moments in fp32 (fp64 for
    fp64), updated in place; ``step`` counts from 1. ``master`` (or None): S's values in the
    moments' dtype, which the step updates and W receives rounded (fp16/bf16 weights keep
    updates smaller than their rounding step). S is computed in the moments' dtype:
      S *= 1 - lr*wd;  m = b1 m + (1-b1) G;  v = b2 v + (1-b2) G²;
      S -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
    """
    dim = 1 if cols else 0
    count = grad.shape[dim]
    part = weight.narrow(dim, start, count) if index is None else weight.index_select(dim, index)
    s = master if master is not None else part.to(exp_avg.dtype)
    g = grad.to(exp_avg.dtype)
    s.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    s.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
    if index is None:
        weight.narrow(dim, start, count).copy_(s)
    else:
        weight.index_copy_(dim, index, s.to(weight.dtype))
