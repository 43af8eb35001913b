"""What the Kronecker kernels share: their tuning configs, one factor applied to many
row-matrices, the second product with that fp32 intermediate, and the two together on a
tile of rows (``kron_tile``)."""
import torch
import triton
import triton.language as tl

from ..launch import block

# Rows per program (BLOCK_M) x warps x pipeline stages; the register budget prunes them
# per launch (kernels.launch.autotuned).
ROW_BLOCK_CONFIGS = [
    triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
    for m, w, s in [(1, 4, 2), (1, 8, 2), (2, 4, 3), (2, 8, 3), (4, 4, 3), (4, 8, 3), (8, 8, 2),
                    (16, 8, 2)]
]

# Factor shapes (a1, a2, b1, b2) compiled ahead of time: all-64 (LLaMA 4096 = 64x64),
# all-16 (small or odd factors), and a small A with a large B (LoKr's wide layers).
COMPILE_SHAPES = [(64, 64, 64, 64), (16, 16, 16, 16), (4, 4, 1024, 1024)]


def tile_lengths(precision: str, **dims: int) -> dict:
    """{"BLOCK_<name>": power-of-two tile covering each dim} and DOT_PRECISION: tiles up to
    64, or 32 for ieee fp32, whose FMA dots hold fp32 operands in registers."""
    hi = 32 if precision == "ieee" else 64
    return {**{f"BLOCK_{name}": block(n, hi=hi) for name, n in dims.items()},
            "DOT_PRECISION": precision}


def int32_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (M, R, Q), copied to contiguous only if offsets inside one of its R x Q
    matrices do not fit int32 (row offsets are int64 in the kernels)."""
    span = (t.shape[1] - 1) * abs(t.stride(1)) + (t.shape[2] - 1) * abs(t.stride(2))
    return t if span < 2 ** 31 else t.contiguous()


@triton.jit
def load_matrix(ptr, offs_r, offs_c, R, C, stride_r, stride_c):
    """The (len(offs_r), len(offs_c)) tile of an R x C matrix at ``ptr`` (any strides);
    rows and columns outside it read as zero."""
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                   mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)


@triton.jit
def rows_times_factor_t(
    x_ptr, f_ptr,
    row_m, row_r, offs_n,
    M, R, Q, N,
    stride_xm, stride_xr, stride_xq,
    stride_fn, stride_fq,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """T[k, n] = sum_q X[row_m[k], row_r[k], q] * F[offs_n[n], q], in fp32.

    X is a stack of (R, Q) matrices, F is (N, Q). ``row_m``/``row_r`` (length ROWS)
    pick which row of which matrix each tile row is, so a tile may span several
    matrices; rows and columns out of range read as zero.
    """
    row_ok = (row_m < M) & (row_r < R)
    x_rows = x_ptr + row_m.to(tl.int64) * stride_xm + row_r * stride_xr
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        x = tl.load(x_rows[:, None] + offs_q[None, :] * stride_xq,
                    mask=row_ok[:, None] & (offs_q[None, :] < Q), other=0.0)
        f_t = tl.load(f_ptr + offs_q[:, None] * stride_fq + offs_n[None, :] * stride_fn,
                      mask=(offs_q[:, None] < Q) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(x, f_t, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def times_fp32_tile(a, t, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ t, for a (P, K) tile of the input dtype and an fp32 (K, N) tile t (an
    X F^T from ``rows_times_factor_t``); acc: (P, N) fp32.

    t is rounded to a's dtype, except for fp16, whose range t can exceed where the whole
    product does not: then a and t go in as fp32 at tf32 precision (fp16's 10-bit mantissa,
    fp32's range), t rounded to nearest at 10 bits first (the tensor cores would truncate
    it; NaN kept). bf16 has fp32's range already and keeps its faster dot.
    """
    if a.dtype == tl.float16:
        bits = t.to(tl.int32, bitcast=True)
        t = tl.where(t == t, ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True), t)
        acc = tl.dot(a.to(tl.float32), t, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, t.to(a.dtype), acc, input_precision=DOT_PRECISION)
    return acc



@triton.jit
def kron_tile(
    x_ptr, a_ptr, b_ptr,
    pair_m, offs_n, offs_i,
    M, A1, A2, B1, B2,
    stride_xm, stride_xj, stride_xl,
    stride_ai, stride_aj,
    stride_bn, stride_bl,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc[i, (m, n)] = (A X_m B^T)[offs_i[i], offs_n[n]] in fp32 for a tile of BLOCK_M rows.

    x: (M, A2, B2), a: (A1, A2), b: (B1, B2), any strides. The tile's rows of X B^T are
    (row m, row j of X_m) pairs, m-major: ``pair_m`` (length BLOCK_M * BLOCK_J) is the row
    of x of each pair (each repeated BLOCK_J times; rows >= M read as zero).
    """
    pair_j = tl.arange(0, BLOCK_M * BLOCK_J) % BLOCK_J
    acc = tl.zeros((BLOCK_I, BLOCK_M * BLOCK_N), dtype=tl.float32)
    for j0 in range(0, A2, BLOCK_J):
        t = rows_times_factor_t(
            x_ptr, b_ptr, pair_m, j0 + pair_j, offs_n, M, A2, B2, B1,
            stride_xm, stride_xj, stride_xl, stride_bn, stride_bl,
            BLOCK_M * BLOCK_J, BLOCK_N, BLOCK_L, DOT_PRECISION)
        # (m, j) x n  ->  j x (m, n)
        t = tl.reshape(t, (BLOCK_M, BLOCK_J, BLOCK_N))
        t = tl.reshape(tl.permute(t, (1, 0, 2)), (BLOCK_J, BLOCK_M * BLOCK_N))
        offs_j = j0 + tl.arange(0, BLOCK_J)
        a = tl.load(a_ptr + offs_i[:, None] * stride_ai + offs_j[None, :] * stride_aj,
                    mask=(offs_i[:, None] < A1) & (offs_j[None, :] < A2), other=0.0)
        acc = times_fp32_tile(a, t, acc, DOT_PRECISION)
    return acc
