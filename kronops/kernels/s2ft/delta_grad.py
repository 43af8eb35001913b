"""Gradient of an S²FT delta: G = d[:, I]ᵀ x[:, J] over all M rows, reduced deterministically.

  rows mode  dΔ = dY[:, R]ᵀ X        (I = R gathered from dY, J = all of X)
  cols mode  dΔ = dYᵀ X[:, C]        (J = C, or all columns of an already gathered X[:, C])
The gathers are indexed loads inside the GEMM. Each program walks a fixed, strided set of
row blocks and writes one fp32 partial; the partials are summed in a fixed order, so the
result does not depend on scheduling (no atomics).
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..launch import (ELEMENT_BYTES, PRECISIONS, TOKENS, CompileCase, autotuned,
                      dot_precision, tile_words, viable_configs)
from ..partial_sums import finish, new_partials, row_groups
from .matmul_add import (FEATURES, RANGE_START, SELECTED_COLS, SELECTED_COLS_STRIDE,
                         SELECTED_ROWS, gathered_positions, index_or_start, selection)


@triton.jit
def sparse_delta_grad_kernel(
    d_ptr, x_ptr, partial_ptr, d_idx_ptr, x_idx_ptr,
    M, P, Q, d_start, x_start, d_size, x_size,
    stride_dm, stride_dp,
    stride_xm, stride_xq,
    stride_pg, stride_pp,
    GATHER_D: tl.constexpr, GATHER_X: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """d: (M, d_size) with P columns read at I; x: (M, x_size) with Q columns at J;
    partial: (G, P, Q) fp32.

    I[p] = d_idx[p] when GATHER_D else d_start + p; J[q] likewise; positions outside
    [0, d_size) or [0, x_size) read as zeros (``gathered_positions``). Any strides.
    Grid: (G, cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q)); program g sums row blocks g, g+G, ...
    """
    pid_g = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_q = tl.program_id(2)
    num_groups = tl.num_programs(0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    d_cols, d_ok = gathered_positions(d_idx_ptr, d_start, offs_p, p_ok, d_size, GATHER_D)
    x_cols, x_ok = gathered_positions(x_idx_ptr, x_start, offs_q, q_ok, x_size, GATHER_X)
    d_base = d_ptr + d_cols[:, None] * stride_dp
    x_base = x_ptr + x_cols[None, :] * stride_xq

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for row_block in range(pid_g, tl.cdiv(M, BLOCK_M), num_groups):
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)
        d_t = tl.load(d_base + rows[None, :] * stride_dm, mask=d_ok[:, None] & m_ok[None, :],
                      other=0.0)
        x = tl.load(x_base + rows[:, None] * stride_xm, mask=m_ok[:, None] & x_ok[None, :],
                    other=0.0)
        acc = tl.dot(d_t, x, acc, input_precision=DOT_PRECISION)

    tl.store(partial_ptr + pid_g * stride_pg + offs_p[:, None] * stride_pp + offs_q[None, :],
             acc, mask=p_ok[:, None] & q_ok[None, :])


# Wide tiles (BLOCK_P or BLOCK_Q 256) cover a 5% selection in one tile, so the other
# operand (X in rows mode, dY in cols mode) is read once; 3-4 stages of BLOCK_M rows in flight.
CONFIGS = [
    triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_M": m}, num_warps=w, num_stages=s)
    for p, q, m, w, s in [(64, 64, 32, 4, 3), (256, 64, 32, 8, 4), (64, 256, 32, 8, 4),
                          (128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4),
                          (64, 64, 32, 8, 3), (32, 32, 32, 4, 2)]
]


def footprint(config, constexprs, element_bytes) -> int:
    """Words live per program: the gradient tile; for fp32 the dY and x tiles."""
    p, q, m = (config.kwargs[b] for b in ("BLOCK_P", "BLOCK_Q", "BLOCK_M"))
    return tile_words(p * q, (p + q) * m, 0, element_bytes, constexprs["DOT_PRECISION"])


tuned = autotuned(sparse_delta_grad_kernel, CONFIGS, key=["P", "Q", "GATHER_D", "GATHER_X"],
                  footprint=footprint)

def compile_cases() -> list[CompileCase]:
    """What ``sparse_delta_grad`` launches on the layer of ``matmul_add.compile_cases``: rows
    mode (dY gathered, or a range of 205 read as 208 columns), cols mode on the saved X[:, C]
    (rows 208 apart, read whole), and a gathered X."""
    f, r, c, padded, start = (FEATURES, SELECTED_ROWS, SELECTED_COLS, SELECTED_COLS_STRIDE,
                              RANGE_START)
    launches = [  # (GATHER_D, GATHER_X, P, Q, d_start, x's row stride)
        (True, False, r, f, 0, f),             # rows mode: dY[:, R]^T X
        (False, False, padded, f, start, f),   # rows mode, a range
        (False, False, f, padded, 0, padded),  # cols mode on the saved X[:, C]
        (False, True, f, c, 0, f)]             # cols mode gathering X[:, C]
    cases = []
    for element, precision in PRECISIONS:
        for gather_d, gather_x, p, q, d_start, x_stride in launches:
            constexprs = dict(GATHER_D=gather_d, GATHER_X=gather_x, DOT_PRECISION=precision)
            ints = dict(M=TOKENS, P=p, Q=q, d_start=d_start, x_start=0, d_size=f,
                        x_size=x_stride, stride_dm=f, stride_dp=1, stride_xm=x_stride,
                        stride_xq=1, stride_pg=p * q, stride_pp=q)
            cases.append(CompileCase(
                f"sparse_delta_grad-gd{int(gather_d)}-gx{int(gather_x)}-start{d_start}-"
                f"{element}-{precision}", sparse_delta_grad_kernel, constexprs, element,
                viable_configs(CONFIGS, footprint, constexprs, ELEMENT_BYTES[element]),
                ints, {"partial_ptr": "*fp32", "d_idx_ptr": "*i64", "x_idx_ptr": "*i64"}))
    return cases


# Partial sums per program group: enough groups to fill the GPU, at most this many rows each.
ROWS_PER_GROUP = 256


def readable_width(t: torch.Tensor, start: int, count: int) -> int:
    """How many columns of ``t`` (M, *) from ``start`` a range read takes: ``count`` rounded
    up to a multiple of 16 when those columns lie inside t's storage in every row (the extra
    ones are computed and dropped; a masked edge in the middle of a row stops the compiled
    loads from using vectors and cp.async), else ``count``."""
    wide = triton.cdiv(count, 16) * 16
    last = t.storage_offset() + (t.shape[0] - 1) * t.stride(0) + (start + wide - 1) * t.stride(1)
    return wide if t.stride(1) == 1 and last < t.untyped_storage().nbytes() // t.element_size() \
        else count


def triton_sparse_delta_grad(dy: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None,
                             start: int, cols: bool, rows_of_delta: int) -> torch.Tensor:
    """CUDA kernel of ``kronops::sparse_delta_grad``: rows dY[:, R]ᵀ X, cols dYᵀ X[:, C] (x is
    X[:, C] itself), the gathered, split-M reduced GEMM (``launch_sparse_delta_grad``)."""
    if cols:
        return launch_sparse_delta_grad(dy, x, p=dy.shape[1], q=x.shape[1])
    return launch_sparse_delta_grad(dy, x, d_cols=selection(index, start), p=rows_of_delta,
                                    q=x.shape[1])


def launch_sparse_delta_grad(d: torch.Tensor, x: torch.Tensor, *, d_cols=0, p: int,
                             x_cols=0, q: int) -> torch.Tensor:
    """d[:, d_cols].T @ x[:, x_cols] in fp32, summed over the M rows in a fixed order.

    d: (M, *), x: (M, *), one dtype, any strides. d_cols: an int64 (p,) index tensor or the
    int start of p contiguous columns (by default d's first p); x_cols: a (q,) tensor or the
    start of q columns (by default x's first q; a range is read ``readable_width`` wide).
    Returns a new contiguous (p, q) tensor of d's dtype, accumulated in fp32.
    """
    m = d.shape[0]
    if m == 0 or p * q == 0:
        return torch.zeros((p, q), device=d.device, dtype=d.dtype)
    d_idx, d_start = index_or_start(d_cols)
    x_idx, x_start = index_or_start(x_cols)
    p_read = p if d_idx is not None else readable_width(d, d_start, p)
    q_read = q if x_idx is not None else readable_width(x, x_start, q)
    groups = row_groups(m, triton.cdiv(p_read, 64) * triton.cdiv(q_read, 64), ROWS_PER_GROUP,
                        d.device)
    partial = new_partials(groups, p_read, q_read, d.device)
    constexprs = dict(GATHER_D=d_idx is not None, GATHER_X=x_idx is not None,
                      DOT_PRECISION=dot_precision(d.dtype))

    def grid(meta):
        return (groups, triton.cdiv(p_read, meta["BLOCK_P"]), triton.cdiv(q_read, meta["BLOCK_Q"]))

    wrap_triton(tuned)[grid](
        d, x, partial, d_idx if d_idx is not None else partial,
        x_idx if x_idx is not None else partial,
        m, p_read, q_read, d_start, x_start, d.shape[1], x.shape[1],
        *d.stride(), *x.stride(), partial.stride(0), partial.stride(1),
        **constexprs)
    return finish(partial[:, :p, :q], 1.0, d.dtype)
