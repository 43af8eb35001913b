"""Functional Kronecker ops: ``kron_linear`` and ``kron_matmul`` (validate, reshape, dispatch)."""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import kron_ops
from .dtypes import autocast_operands
from .checks import check_same, check_scale, check_tensor


def kron_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                bias: torch.Tensor | None = None, *, scale: float = 1.0) -> torch.Tensor:
    """``scale * x @ torch.kron(a, b).T + bias`` without ever forming ``kron(a, b)``.

    x: (..., a2*b2); a: (a1, a2); b: (b1, b2); bias: (a1*b1,) or None.
    Returns (..., a1*b1) in x's dtype (inside an autocast region, all operands are cast to
    the autocast dtype, as for F.linear). Differentiable in x, a, b and bias.
    """
    check_tensor("x", x)
    check_tensor("a", a, dim=2)
    check_tensor("b", b, dim=2)
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
    lead = x.shape[:-1]
    y = kron_ops.kron_rows(x.reshape(-1, a2, b2), a, b, bias, scale)
    return y.view(*lead, a1 * b1)


def kron_matmul(x: torch.Tensor, factors: Sequence[torch.Tensor], *,
                scale: float = 1.0) -> torch.Tensor:
    """``scale * x @ kron(f1, ..., fN).T`` for N >= 1 factors fi of shape (pi, qi).

    x: (..., q1*...*qN). Returns (..., p1*...*pN), in the autocast dtype inside an
    autocast region. The leading factors are applied one mode at a time (batched
    matmuls); the last two run fused in ``kron_linear``. Differentiable in x and every factor.
    """
    check_tensor("x", x)
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence) or not factors:
        raise TypeError("factors must be a non-empty list or tuple of 2-D tensors")
    for i, f in enumerate(factors):
        check_tensor(f"factors[{i}]", f, dim=2)
    x, *factors = autocast_operands(x.device.type, x, *factors)
    check_same("x", x, **{f"factors[{i}]": f for i, f in enumerate(factors)})
    scale = check_scale(scale)
    q = [f.shape[1] for f in factors]
    if x.dim() == 0 or x.shape[-1] != math.prod(q):
        raise ValueError(f"x must have last dim q1*...*qN = {math.prod(q)} for factor column "
                         f"counts {q}, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    p = [f.shape[0] for f in factors]
    if len(factors) == 1:
        y = F.linear(x, factors[0])
        return y * scale if scale != 1.0 else y
    # Mode k: (rows * p1..p(k-1), qk, q(k+1)..qN) -> (rows * p1..p(k-1), pk, q(k+1)..qN).
    t = x.reshape(-1, math.prod(q))
    for k, f in enumerate(factors[:-2]):
        t = torch.matmul(f, t.reshape(-1, q[k], math.prod(q[k + 1:])))
    y = kron_linear(t.reshape(-1, q[-2] * q[-1]), factors[-2], factors[-1], scale=scale)
    return y.reshape(*lead, math.prod(p))
