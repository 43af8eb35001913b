"""The PyTorch kernels of the Kronecker ops, named after them: the default kernel of each op
on every device (``kronops.kron.ops`` declares the ops), batched matmuls that never form the
Kronecker product. ``kron`` is the product the ops build where building it pays (``dispatch``).

Each kernel takes its op's arguments; ``kronops.backends`` runs it after the op's argument
check, with autocast off.
"""
import torch

from ..dtypes import accumulation_dtype, composite_dtype, kept_dtype


def kron(a, b):
    """kron(a, b) (a1*b1, a2*b2) for a (a1, a2) and b (b1, b2) of any strides: one broadcast
    product, no copy of either factor; differentiable (twice)."""
    (a1, a2), (b1, b2) = a.shape, b.shape
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a1 * b1, a2 * b2)


def b_first(a1, a2, b1, b2) -> bool:
    """Whether y_m = A X_m Bᵀ is cheaper with X_m Bᵀ first (2*b1*a2*(b2+a1) flops a row) than
    with A X_m first (2*a1*b2*(a2+b1)); the native kernels follow the same rule."""
    return b1 * a2 * (b2 + a1) <= a1 * b2 * (a2 + b1)


def kron_rows_keep(x, a, b, bias=None, scale=1.0):
    """(y, inner): y[m] = scale * vec(a @ x[m] @ b.T) + bias for x (M, a2, b2), (M, a1*b1) in
    x's dtype, and the intermediate the product formed, unscaled, in ``kept_dtype`` (bf16
    for bf16, else ``composite_dtype``): X_m Bᵀ (M, a2, b1) or A X_m (M, a1, b2), whichever
    side is cheaper first (``b_first``).

    ``a`` multiplies every row-matrix as a broadcast batch (no copies); the scale goes into
    the factor of the second product. Computed in ``composite_dtype`` (fp32 for fp16).
    """
    m, a2, b2 = x.shape
    a1, b1 = a.shape[0], b.shape[0]
    out_dtype, work, kept = x.dtype, composite_dtype(x), kept_dtype(x)
    x, a, b = x.to(work), a.to(work), b.to(work)
    bias = None if bias is None else bias.to(work)
    if b_first(a1, a2, b1, b2):
        inner = torch.matmul(x, b.mT)
        y = torch.matmul((a * scale if scale != 1.0 else a).expand(m, a1, a2), inner)
    else:
        inner = torch.matmul(a.expand(m, a1, a2), x)
        y = torch.matmul(inner, (b * scale if scale != 1.0 else b).mT)
    y = y.reshape(m, a1 * b1)
    return (y if bias is None else y + bias).to(out_dtype).contiguous(), inner.to(kept).contiguous()


def kron_rows(x, a, b, bias=None, scale=1.0):
    """y[m] = scale * vec(a @ x[m] @ b.T) + bias for x (M, a2, b2): (M, a1*b1) in x's dtype
    (``kron_rows_keep`` without the intermediate)."""
    return kron_rows_keep(x, a, b, bias, scale)[0]


def kron_mode(x, f):
    """y[m] = f @ x[m] for x (M, q, r), f (p, q): (M, p, r), one batched product in
    ``composite_dtype``, returned in x's dtype."""
    work = composite_dtype(x)
    return torch.matmul(f.to(work), x.to(work)).to(x.dtype).contiguous()


def kron_factor_grad(dy, f, x, scale=1.0):
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


# Rows per chunk of a batched product summed over rows: its (chunk, P, R) result stays near
# 1M elements (4 MiB in fp32), a size caches and the allocator reuse.
SUM_CHUNK_ELEMENTS = 1 << 20


def batched_sum(left, right_t):
    """sum_m left[m] @ right_t[m].T for left (M, P, N), right_t (M, R, N) -> (P, R), by chunks
    of rows: the (M, P, R) products are never all in memory at once (one batched product
    summed over m writes and reads them all; bench/NOTES.md has the timing)."""
    m, p, _ = left.shape
    r = right_t.shape[1]
    step = max(1, SUM_CHUNK_ELEMENTS // max(1, p * r))
    total = left.new_zeros(p, r)
    for i in range(0, m, step):
        total += torch.matmul(left[i:i + step], right_t[i:i + step].mT).sum(0)
    return total


def kron_rows_grads(dy, x, a, b, scale=1.0, need_x=True, need_a=True, need_b=True,
                          inner=None):
    """(dX, dA, dB) of y[m] = scale * vec(a @ x[m] @ b.T), for dy (M, a1, b1) and x
    (M, a2, b2); a gradient not needed is an empty tensor. Returned in dy's dtype.

    ``inner``: the intermediate ``kron_rows_keep`` kept, or None. The work
    is shared as autograd shares it on the composite forward. With X_m Bᵀ kept or none kept:
    U = s Aᵀ dY_m serves dX = U B and dB = Σ_m U_mᵀ X_m (one GEMM, the rows folded into its
    inner dimension), and dA = s Σ_m dY_m T_mᵀ with T = X Bᵀ kept (else recomputed, or dY B
    against X, whichever is cheaper). With A X_m kept: dZ = s dY B (one folded GEMM) serves
    dX = Aᵀ dZ_m and dA = Σ_m dZ_m X_mᵀ, and dB = s Σ_m dY_mᵀ Z_m is one folded GEMM. Sums
    over rows of batched products go by chunks (``batched_sum``). Factor gradients
    accumulate in fp32 (fp64 for fp64); products in ``composite_dtype``.
    """
    m, a2, b2 = x.shape
    a1, b1 = a.shape[0], b.shape[0]
    out_dtype, acc, work = dy.dtype, accumulation_dtype(dy.dtype), composite_dtype(dy)
    dy, x, a, b = dy.to(work), x.to(work), a.to(work), b.to(work)
    inner = None if inner is None else inner.to(work)
    kept_t = inner is not None and b_first(a1, a2, b1, b2)
    dx, da, db = (dy.new_empty(0, dtype=out_dtype) for _ in range(3))
    if inner is not None and not kept_t:  # A X_m kept
        if need_x or need_a:
            dz = torch.matmul(dy, b * scale if scale != 1.0 else b)       # (M, a1, b2)
            if need_x:
                dx = torch.matmul(a.mT.expand(m, a2, a1), dz).to(out_dtype)
            if need_a:
                da = batched_sum(dz.to(acc), x.to(acc)).to(out_dtype)
        if need_b:
            db = dy.reshape(m * a1, b1).mT.to(acc) @ inner.reshape(m * a1, b2).to(acc)
            db = (db * scale if scale != 1.0 else db).to(out_dtype)
        return dx, da, db
    if need_x or need_b:
        a_s = a * scale if scale != 1.0 else a
        u = torch.matmul(a_s.mT.expand(m, a2, a1), dy)                   # (M, a2, b1)
        if need_x:
            dx = torch.matmul(u, b).to(out_dtype)                         # (M, a2, b2)
        if need_b:
            db = (u.reshape(m * a2, b1).mT.to(acc) @ x.reshape(m * a2, b2).to(acc)).to(out_dtype)
    if need_a:
        b_s = b * scale if scale != 1.0 else b
        if kept_t:  # Σ_m dY_m T_mᵀ, scaled as a whole
            left, right = dy, inner
        # the sum over (m, k): dY_m (a1, b1) against X_m B_sᵀ (a2, b1), or dY_m B_s (a1, b2)
        # against X_m (a2, b2), whichever product is cheaper
        elif a2 * b2 * b1 <= a1 * b1 * b2:
            left, right = dy, torch.matmul(x, b_s.mT)
        else:
            left, right = torch.matmul(dy, b_s), x
        da = batched_sum(left.to(acc), right.to(acc))
        da = (da * scale if kept_t and scale != 1.0 else da).to(out_dtype)
    return dx, da, db
