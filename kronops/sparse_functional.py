"""Functional S²FT op ``sparse_linear`` (validate, flatten, dispatch) and its index checks."""
import torch

from . import sparse_ops
from .checks import check_same, check_tensor
from .dtypes import autocast_operands


def check_index(name: str, sel, size: int, device: torch.device
                ) -> tuple[torch.Tensor | None, int, int]:
    """Normalise a selection of ``size`` positions to (index tensor or None, start, count).

    ``sel``: a 1-D int64 tensor on ``device``, sorted, unique and in [0, size) (returned
    contiguous: the kernels read index k at ``idx_ptr + k``); or a slice/range with step 1
    inside [0, size] (the contiguous case: None and its start).
    Value checks need the indices on the host: skipped while torch.compile traces.
    """
    if isinstance(sel, (slice, range)):
        step = 1 if sel.step is None else sel.step
        start = 0 if sel.start is None else sel.start
        stop = size if sel.stop is None else sel.stop
        if step != 1:
            raise ValueError(f"{name} must have step 1, got {sel}")
        if not 0 <= start < stop <= size:
            raise ValueError(f"{name} must satisfy 0 <= start < stop <= {size}, got {sel}")
        return None, start, stop - start
    if not isinstance(sel, torch.Tensor):
        raise TypeError(f"{name} must be an int64 tensor, a slice or a range, "
                        f"got {type(sel).__name__}")
    if sel.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {sel.dtype}")
    if sel.dim() != 1 or sel.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(sel.shape)}")
    if sel.device != device:
        raise ValueError(f"{name} is on {sel.device} but weight is on {device}")
    if not torch.compiler.is_compiling():
        check_sorted_unique(name, sel, size)
    return sel.contiguous(), 0, sel.numel()


def check_sorted_unique(name: str, index: torch.Tensor, size: int) -> None:
    """``index`` (1-D int64, possibly empty) is strictly increasing and lies in [0, size).

    Reads the values on the host (not for torch.compile tracing).
    """
    if index.numel() == 0:
        return
    if bool((index[1:] <= index[:-1]).any()):
        raise ValueError(f"{name} must be sorted and unique (strictly increasing)")
    if int(index[0]) < 0 or int(index[-1]) >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got values from "
                         f"{int(index[0])} to {int(index[-1])}")


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, *,
                  rows=None, cols=None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W', bias)`` where W' is ``weight`` with ``delta`` added into rows or cols.

    x: (..., in); weight: (out, in), treated as frozen (it never gets a gradient and is
    never copied); bias: (out,) or None. Exactly one of:
      rows: R, output rows of W trained, delta (|R|, in):  y[..., R] += x Δᵀ
      cols: C, input columns of W trained, delta (out, |C|):  y += x[..., C] Δᵀ
    R/C: a sorted, unique int64 tensor on weight's device, or a slice/range (contiguous).
    Returns (..., out) in x's dtype (the autocast dtype inside an autocast region, where,
    as with F.linear, all operands are cast to it). Differentiable in x, delta and bias; in
    cols mode only x[..., C] is saved for backward.
    """
    check_tensor("x", x)
    check_tensor("weight", weight, dim=2)
    check_tensor("delta", delta, dim=2)
    if bias is not None:
        check_tensor("bias", bias, dim=1)
    # like F.linear under autocast: compute in the autocast dtype (this casts W too)
    x, weight, delta, bias = autocast_operands(x.device.type, x, weight, delta, bias)
    check_same("x", x, weight=weight, delta=delta, bias=bias)
    if (rows is None) == (cols is None):
        raise ValueError("exactly one of rows and cols must be given")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dim in_features = {in_features} for weight of shape "
                         f"{tuple(weight.shape)}, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(f"bias must have length out_features = {out_features}, "
                         f"got {bias.shape[0]}")
    is_cols = cols is not None
    name = "cols" if is_cols else "rows"
    index, start, count = check_index(name, cols if is_cols else rows,
                                      in_features if is_cols else out_features, weight.device)
    expected = (out_features, count) if is_cols else (count, in_features)
    if tuple(delta.shape) != expected:
        raise ValueError(f"delta must have shape {expected} for {count} selected {name} of a "
                         f"weight of shape {tuple(weight.shape)}, got {tuple(delta.shape)}")
    lead = x.shape[:-1]
    y = sparse_ops.sparse_linear(x.reshape(-1, in_features), weight, delta, index, start, bias,
                                 is_cols)
    return y.view(*lead, out_features)
