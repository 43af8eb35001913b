"""Reference and composite implementations of the Kronecker ops.

``*_reference`` materialise torch.kron (obviously right, O(out*in) memory: tests and
benchmarks only). ``*_composite`` are the fast PyTorch paths every device runs.
"""
import functools

import torch


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
    """sum_m dy[m] @ f @ x[m].T in fp32 (fp64 for fp64 inputs) for dy (M, P, N), f (N, Q), x (M, R, Q); returns (P, R)."""
    t = torch.matmul(x, f.mT)  # (M, R, N)
    p, r = dy.shape[1], x.shape[1]
    dy2 = dy.transpose(0, 1).reshape(p, -1)        # (P, M*N)
    t2 = t.transpose(1, 2).reshape(-1, r)          # (M*N, R)
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy2.to(acc) @ t2.to(acc)
