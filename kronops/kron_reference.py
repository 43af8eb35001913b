"""Reference and composite implementations of the Kronecker ops.

``*_reference`` materialise torch.kron (obviously right, O(out*in) memory: tests and
benchmarks only). ``*_composite`` are the fast PyTorch paths every device runs.
"""
import functools

import torch

from .dtypes import accumulation_dtype


def kron_linear_reference(x, a, b, bias=None, scale=1.0):
    """scale * x @ kron(a, b).T + bias, materialising the Kronecker product."""
    y = scale * (x @ torch.kron(a, b).T)
    return y if bias is None else y + bias


def kron_matmul_reference(x, factors, scale=1.0):
    """scale * x @ kron(f1, ..., fN).T, materialising the Kronecker product."""
    return scale * (x @ functools.reduce(torch.kron, factors).T)


def kron_rows_composite(x, a, b, bias=None, scale=1.0):
    """y[m] = scale * vec(a @ x[m] @ b.T) + bias for x (M, a2, b2); returns (M, a1*b1).

    Contracts the cheaper side first: 2*b1*a2*(b2+a1) flops (B first) or 2*a1*b2*(a2+b1).
    """
    m, a2, b2 = x.shape
    a1, b1 = a.shape[0], b.shape[0]
    if b1 * a2 * (b2 + a1) <= a1 * b2 * (a2 + b1):
        y = torch.matmul(a, torch.matmul(x, b.mT))
    else:
        y = torch.matmul(torch.matmul(a, x), b.mT)
    y = y.reshape(m, a1 * b1)
    if scale != 1.0:
        y = y * scale
    return y if bias is None else y + bias


def kron_factor_grad_composite(dy, f, x):
    """sum_m dy[m] @ f @ x[m].T in fp32 (fp64 for fp64 inputs); dy (M, P, N), f (N, Q), x (M, R, Q).

    Batched matmuls (which take transposed views without copies) and a sum over M,
    contracting the cheaper side first. Returns (P, R).
    """
    m, p, n = dy.shape
    r, q = x.shape[1], x.shape[2]
    acc = accumulation_dtype(dy.dtype)
    if p * n * q + p * q * r <= r * q * n + p * n * r:
        return torch.matmul(torch.matmul(dy, f).to(acc), x.mT.to(acc)).sum(0)
    return torch.matmul(dy.to(acc), torch.matmul(x, f.mT).mT.to(acc)).sum(0)


def kron_rows_backward_composite(grad, x, a, b, needs=(True, True, True)):
    """(dX, dA, dB) of y[m] = vec(a @ x[m] @ b.T) for grad (M, a1, b1), x (M, a2, b2);
    None where ``needs`` says a gradient is not wanted.

    Shares dT_m = A^T dY_m between dX_m = dT_m B and dB = sum_m dT_m^T X_m (one GEMM over
    the folded (m, j) rows); dA = sum_m dY_m (X_m B^T)^T as batched matmuls and a sum.
    """
    need_x, need_a, need_b = needs
    dt = torch.matmul(a.mT, grad) if need_x or need_b else None
    grad_x = torch.matmul(dt, b) if need_x else None
    grad_a = torch.matmul(grad, torch.matmul(x, b.mT).mT).sum(0) if need_a else None
    grad_b = dt.reshape(-1, dt.shape[-1]).mT @ x.reshape(-1, x.shape[-1]) if need_b else None
    return grad_x, grad_a, grad_b
