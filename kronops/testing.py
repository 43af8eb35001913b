"""What the tests, the benchmark and the selftest compare against: the materialising
references of the ops (``naive_*``: they build the full weight, O(out*in) memory, obviously
right), and one error rule, the norm-wise relative error against an fp64 reference with a
tolerance per dtype of the result.

The tolerances cover the rounding of the result to its dtype plus fp32 accumulation over
the op's reductions (fp32: ~1e-7 per rounding, summed in norm over up to thousands of
terms; fp16/bf16: the result's own rounding, 2^-11 and 2^-8).
"""
import functools

import torch
import torch.nn.functional as F


def naive_kron(a, b):
    """torch.kron(a, b) of copies with row-major strides: torch 2.13's torch.kron refuses some
    strided operands (a transposed factor beside a contiguous one), also where a size-1
    dimension's stride is all that differs, which ``.contiguous()`` keeps as it is."""
    return torch.kron(a.clone(memory_format=torch.contiguous_format),
                      b.clone(memory_format=torch.contiguous_format))


def naive_kron_linear(x, a, b, bias=None, scale=1.0):
    """scale * x @ kron(a, b).T + bias, materialising the Kronecker product."""
    y = scale * (x @ naive_kron(a, b).T)
    return y if bias is None else y + bias


def naive_kron_matmul(x, factors, scale=1.0):
    """scale * x @ kron(f1, ..., fN).T, materialising the Kronecker product."""
    return scale * (x @ functools.reduce(naive_kron, factors).T)


def naive_sparse_linear(x, weight, delta, rows=None, cols=None, bias=None):
    """F.linear(x, W', bias) with W' = weight plus delta added into ``rows`` (delta (|R|, in))
    or ``cols`` (delta (out, |C|)): full fine-tuning with a gradient mask.

    rows/cols: an int64 index tensor, a slice or a range. Materialises W' (out, in).
    """
    sel = rows if rows is not None else cols
    if not isinstance(sel, torch.Tensor):
        dim = weight.shape[0] if rows is not None else weight.shape[1]
        sel = torch.arange(dim, device=weight.device)[sel]
    w = weight.index_add(0 if rows is not None else 1, sel, delta)
    return F.linear(x, w, bias)


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2,
             torch.bfloat16: 1e-2}


def relative_error(out, ref, magnitude: float | None = None) -> float:
    """||out - ref|| / ||ref|| in fp64, the worst over paired sequences of tensors; NaN or
    Inf anywhere in ``out`` gives inf (never passes).

    ``magnitude`` replaces ||ref|| where terms of the result may cancel (a product plus a
    bias), to measure the error against the size of the terms.
    """
    if isinstance(out, (tuple, list)):
        return max((relative_error(o, r, magnitude) for o, r in zip(out, ref, strict=True)),
                   default=0.0)
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, ref {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item() if magnitude is None else magnitude
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype: torch.dtype, what: str = "",
                 magnitude: float | None = None) -> None:
    """``relative_error(out, ref)`` within ``TOLERANCE[dtype]``, else AssertionError."""
    err = relative_error(out, ref, magnitude)
    assert err <= TOLERANCE[dtype], \
        f"{what} relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"
