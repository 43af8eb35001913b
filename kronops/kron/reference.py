"""The Kronecker ops in plain PyTorch: naive references and the composite implementations.

``naive_*`` materialise torch.kron (obviously right, O(out*in) memory: tests and benchmarks
only). ``torch_*`` are the ops' default kernels, on every device: batched matmuls that never
form the Kronecker product.
"""
import functools

import torch

from ..dtypes import accumulation_dtype, composite_dtype


def naive_kron_linear(x, a, b, bias=None, scale=1.0):
    """scale * x @ kron(a, b).T + bias, materialising the Kronecker product."""
    y = scale * (x @ torch.kron(a, b).T)
    return y if bias is None else y + bias


def naive_kron_matmul(x, factors, scale=1.0):
    """scale * x @ kron(f1, ..., fN).T, materialising the Kronecker product."""
    return scale * (x @ functools.reduce(torch.kron, factors).T)


def torch_kron_rows(x, a, b, bias=None, scale=1.0):
    """y[m] = scale * vec(a @ x[m] @ b.T) + bias for x (M, a2, b2); returns (M, a1*b1).

    Contracts the cheaper side first: 2*b1*a2*(b2+a1) flops (B first) or 2*a1*b2*(a2+b1).
    ``a`` multiplies every row-matrix as a broadcast batch (no copies); the scale goes
    into the smaller factor. Computed in ``composite_dtype`` (fp32 for fp16), returned in
    x's dtype.
    """
    m, a2, b2 = x.shape
    a1, b1 = a.shape[0], b.shape[0]
    out_dtype, work = x.dtype, composite_dtype(x)
    x, a, b = x.to(work), a.to(work), b.to(work)
    bias = None if bias is None else bias.to(work)
    if scale != 1.0:
        a, b = (a * scale, b) if a.numel() <= b.numel() else (a, b * scale)
    if b1 * a2 * (b2 + a1) <= a1 * b2 * (a2 + b1):
        y = torch.matmul(a.expand(m, a1, a2), torch.matmul(x, b.mT))
    else:
        y = torch.matmul(torch.matmul(a.expand(m, a1, a2), x), b.mT)
    y = y.reshape(m, a1 * b1)
    return (y if bias is None else y + bias).to(out_dtype)


def torch_kron_factor_grad(dy, f, x, scale=1.0):
    """scale * sum_m dy[m] @ f @ x[m].T for dy (M, P, N), f (N, Q), x (M, R, Q) -> (P, R).

    V_m = f x_m^T (a broadcast batch, laid out (m, n, r)), then the sum over (m, n): one
    GEMM when dy's (m, n) axes fold into one (dB's transposed views do), else a batched
    product summed over m. Computed in ``composite_dtype``, accumulated in fp32 (fp64 for
    fp64); returns dy's dtype.
    """
    m, p, n = dy.shape
    r = x.shape[1]
    out_dtype, acc, work = dy.dtype, accumulation_dtype(dy.dtype), composite_dtype(dy)
    dy, f, x = dy.to(work), f.to(work), x.to(work)
    if scale != 1.0:
        f = f * scale
    v = torch.matmul(f.expand(m, n, f.shape[1]), x.mT).to(acc)
    if dy.stride(0) == dy.stride(2) * n:  # (m, n) is one axis of stride dy.stride(2)
        g = dy.as_strided((p, m * n), (dy.stride(1), dy.stride(2))).to(acc) @ v.reshape(m * n, r)
    else:
        g = torch.matmul(dy.to(acc), v).sum(0)
    return g.to(out_dtype)


def torch_kron_rows_grads(dy, x, a, b, scale=1.0, need_x=True, need_a=True, need_b=True):
    """(dX, dA, dB) of y[m] = scale * vec(a @ x[m] @ b.T), for dy (M, a1, b1) and x
    (M, a2, b2); a gradient not needed is an empty tensor. Returned in dy's dtype.

    The intermediates are shared as autograd shares them on the composite forward:
    U = s Aᵀ dY_m serves dX = U B and dB = Σ_m U_mᵀ X_m (one GEMM, the rows folded into
    its inner dimension); dA = s Σ_m dY_m B X_mᵀ goes through X Bᵀ or dY B, whichever is
    cheaper (X Bᵀ is recomputed: the forward does not keep it). Factor gradients
    accumulate in fp32 (fp64 for fp64); products in ``composite_dtype``; the scale goes
    into a factor.
    """
    m, a2, b2 = x.shape
    a1, b1 = a.shape[0], b.shape[0]
    out_dtype, acc, work = dy.dtype, accumulation_dtype(dy.dtype), composite_dtype(dy)
    dy, x, a, b = dy.to(work), x.to(work), a.to(work), b.to(work)
    dx, da, db = (dy.new_empty(0, dtype=out_dtype) for _ in range(3))
    if need_x or need_b:
        a_s = a * scale if scale != 1.0 else a
        u = torch.matmul(a_s.mT.expand(m, a2, a1), dy)                   # (M, a2, b1)
        if need_x:
            dx = torch.matmul(u, b).to(out_dtype)                         # (M, a2, b2)
        if need_b:
            db = (u.reshape(m * a2, b1).mT.to(acc) @ x.reshape(m * a2, b2).to(acc)).to(out_dtype)
    if need_a:
        b_s = b * scale if scale != 1.0 else b
        # the sum over (m, k): dY_m (a1, b1) against X_m B_sᵀ (a2, b1), or dY_m B_s (a1, b2)
        # against X_m (a2, b2), whichever product is cheaper
        if a2 * b2 * b1 <= a1 * b1 * b2:
            left, right = dy, torch.matmul(x, b_s.mT)
        else:
            left, right = torch.matmul(dy, b_s), x
        # a batched product summed over m: on these CPUs ~2x faster than folding (m, k)
        # into one GEMM, whose operands would need transposed copies
        da = torch.matmul(left.to(acc), right.mT.to(acc)).sum(0).to(out_dtype)
    return dx, da, db
