"""Reference and composite implementations of the S²FT sparse linear op.

Terms: a frozen weight W (out, in); rows mode trains output rows R with Δ (|R|, in), cols
mode trains input columns C with Δ (out, |C|). An index is either an int64 tensor or, for
a contiguous range, ``None`` plus its start (the length is Δ's).

``sparse_linear_reference`` is full fine-tuning with a gradient mask: it materialises
W' = W + scatter(Δ) (an (out, in) copy; tests only). The ``*_composite`` functions are the
fast PyTorch paths every device runs; they never copy W.
"""
import torch
import torch.nn.functional as F

from .dtypes import accumulation_dtype


def take(t: torch.Tensor, index: torch.Tensor | None, start: int, count: int) -> torch.Tensor:
    """Columns of a 2-D ``t``: ``t[:, index]``, or the view ``t[:, start:start+count]``."""
    return t.narrow(1, start, count) if index is None else t.index_select(1, index)


def add_into(out: torch.Tensor, index: torch.Tensor | None, start: int,
             value: torch.Tensor) -> torch.Tensor:
    """``out[:, index] += value`` (or columns start:start+k) in place; returns out."""
    if index is None:
        out.narrow(1, start, value.shape[1]).add_(value)
        return out
    return out.index_add_(1, index, value)


def sparse_linear_reference(x, weight, delta, rows=None, cols=None, bias=None):
    """F.linear(x, W', bias) with W' = weight plus delta added into ``rows`` or ``cols``.

    rows/cols: an int64 index tensor, a slice or a range. Materialises W' (out, in).
    """
    sel = rows if rows is not None else cols
    if not isinstance(sel, torch.Tensor):
        dim = weight.shape[0] if rows is not None else weight.shape[1]
        sel = torch.arange(dim, device=weight.device)[sel]
    w = weight.index_add(0 if rows is not None else 1, sel, delta)
    return F.linear(x, w, bias)


def sparse_linear_composite(x, weight, delta, index, start, bias, cols):
    """x (M, in) -> (M, out): x Wᵀ + b, plus x Δᵀ into columns R, or plus x[:, C] Δᵀ."""
    y = F.linear(x, weight, bias)
    if cols:
        return y.addmm_(take(x, index, start, delta.shape[1]), delta.mT)
    return add_into(y, index, start, x @ delta.mT)


def sparse_input_grad_composite(dy, weight, delta, index, start, cols):
    """dX (M, in) for dY (M, out): rows dY W + dY[:, R] Δ; cols dY W, then dX[:, C] += dY Δ."""
    dx = dy @ weight
    if cols:
        return add_into(dx, index, start, dy @ delta)
    return dx.addmm_(take(dy, index, start, delta.shape[0]), delta)


def sparse_delta_grad_composite(dy, x, index, start, cols, shape):
    """dΔ of ``shape`` in fp32 (fp64 for fp64): rows dY[:, R]ᵀ X; cols dYᵀ X[:, C].

    In cols mode ``x`` is the saved X[:, C] itself (index unused).
    """
    acc = accumulation_dtype(dy.dtype)
    if cols:
        return (dy.mT @ x).to(acc)
    return (take(dy, index, start, shape[0]).mT @ x).to(acc)
