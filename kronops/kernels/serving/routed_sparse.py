"""Many S²FT adapters in one launch: each token's row adds its adapter's Δ into the selected
rows or columns of the output (the serving bank's mixed batches).

The adapters of one layer and mode are concatenated: rows mode Δ (S, in) with the output
rows R it adds into, ``index`` (S,); cols mode Δ (out, S) with the input columns C it
reads. Adapter p owns segment [lo_p, hi_p) of that concatenation. Tokens arrive grouped by
adapter: ``tokens`` lists rows of x, and each row of the tile table ``tiles`` names a run
tokens[start:stop] (at most one serving tile long) and its adapter's segment:
  rows  y[t, R[s]] += x[t, :] . Δ[s, :]        for s in [lo, hi)
  cols  y[t, :]    += sum_s x[t, C[s]] Δ[:, s]  for s in [lo, hi)
A program takes one tile and one output tile and loops over the tile BLOCK_M tokens at a
time: a gathered GEMM with an indexed scatter-add, as ``kernels.s2ft.matmul_add``. Tokens
and, within a segment, indices are unique, so programs never write the same element.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..launch import (ELEMENT_BYTES, PRECISIONS, TOKENS, CompileCase, autotuned,
                      dot_precision, viable_configs)
from ..s2ft.matmul_add import add_tile, footprint, gathered_positions
from .routed_kron import routed_tokens


@triton.jit
def routed_sparse_add_kernel(
    x_ptr, delta_ptr, y_ptr, index_ptr, tokens_ptr, tiles_ptr,
    M, IN, OUT, WIDEST,
    stride_xm, stride_xk,
    stride_dr, stride_dc,
    stride_ym, stride_yn,
    COLS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x: (M, IN); y: (M, OUT); delta: rows (S, IN), cols (OUT, S); index: (S,) int64;
    tokens: int64 rows of x; tiles: (n_tiles, 4) int64 rows [start, stop, lo, hi].

    Grid: (n_tiles * cdiv(WIDEST, BLOCK_N),), the output-column tile fastest; WIDEST is the
    widest segment (rows) or OUT (cols). fp32 accumulation.
    """
    tiles_n = tl.cdiv(WIDEST, BLOCK_N)
    tile = tiles_ptr + (tl.program_id(0) // tiles_n) * 4
    pid_n = tl.program_id(0) % tiles_n
    start = tl.load(tile)
    stop = tl.load(tile + 1)
    lo = tl.load(tile + 2)
    hi = tl.load(tile + 3)
    if COLS:
        N, K, row0, col0 = OUT, hi - lo, 0, lo
    else:
        N, K, row0, col0 = hi - lo, IN, lo, 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if COLS:
        out_cols, out_ok = offs_n.to(tl.int64), n_ok
    else:
        out_cols, out_ok = gathered_positions(index_ptr + lo, 0, offs_n, n_ok, OUT, True)
    if pid_n * BLOCK_N < N:  # a narrower segment has no work for this output tile
        for m0 in range(start, stop, BLOCK_M):
            rows = routed_tokens(tokens_ptr, m0 + tl.arange(0, BLOCK_M), stop, M)
            m_ok = rows < M
            x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                cols, cols_ok = gathered_positions(index_ptr + lo, 0, offs_k, k_ok, IN, COLS)
                a = tl.load(x_rows + cols[None, :] * stride_xk,
                            mask=m_ok[:, None] & cols_ok[None, :], other=0.0)
                b_t = tl.load(delta_ptr + (col0 + offs_k)[:, None] * stride_dc
                              + (row0 + offs_n)[None, :] * stride_dr,
                              mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, b_t, acc, input_precision=DOT_PRECISION)
            add_tile(y_ptr, rows, out_cols, m_ok, out_ok, stride_ym, stride_yn, acc)


# Decode steps route a few tokens per adapter: small BLOCK_M first. The register model is
# matmul_add's (the same tiles: accumulator, x and Δ tiles, the output tile added into).
CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for m, n, k, w, s in [(16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (32, 64, 32, 4, 3),
                          (64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (16, 32, 32, 4, 2)]
]


tuned = autotuned(routed_sparse_add_kernel, CONFIGS, key=["IN", "OUT", "COLS"],
                  footprint=footprint, restore_value=["y_ptr"])

# A 4096 x 4096 layer, adapters of 256 rows (two 128-wide heads) each.
FEATURES, SEGMENT_ROWS = 4096, 256


def compile_cases() -> list[CompileCase]:
    """Rows and cols mode on TOKENS contiguous rows, per precision."""
    cases = []
    for element, precision in PRECISIONS:
        # Δ as the bank stores it: rows mode (S, in) row-major; cols mode the transposed
        # view of Δᵀ's (S, out) rows.
        for cols, widest, delta_strides in [(False, SEGMENT_ROWS, (FEATURES, 1)),
                                            (True, FEATURES, (1, FEATURES))]:
            constexprs = dict(COLS=cols, DOT_PRECISION=precision)
            ints = dict(M=TOKENS, IN=FEATURES, OUT=FEATURES, WIDEST=widest,
                        stride_xm=FEATURES, stride_xk=1, stride_dr=delta_strides[0],
                        stride_dc=delta_strides[1], stride_ym=FEATURES, stride_yn=1)
            cases.append(CompileCase(
                f"routed_sparse_add-{'cols' if cols else 'rows'}-{element}-{precision}",
                routed_sparse_add_kernel, constexprs, element,
                viable_configs(CONFIGS, footprint, constexprs, ELEMENT_BYTES[element]), ints,
                {"index_ptr": "*i64", "tokens_ptr": "*i64", "tiles_ptr": "*i64"}))
    return cases


def triton_routed_sparse_add(y, x, values, index, tokens, tiles, offsets, starts, widths,
                             cols) -> None:
    """CUDA kernel of ``kronops::routed_sparse_add``: every member in one launch
    (``launch_routed_sparse_add``; Δ of cols mode is the transposed view of ``values``)."""
    launch_routed_sparse_add(y, x, values.T if cols else values, index, tokens, tiles,
                             max(widths, default=0), cols)


def launch_routed_sparse_add(y: torch.Tensor, x: torch.Tensor, delta: torch.Tensor,
                             index: torch.Tensor, tokens: torch.Tensor, tiles: torch.Tensor,
                             widest: int, cols: bool) -> torch.Tensor:
    """Each tile's tokens add their adapter's Δ segment into y in place; returns y.

    y: (M, out); x: (M, in); delta: rows (S, in) or cols (out, S); all one dtype, any
    strides. index: (S,) int64; tokens: (T,) int64; tiles: (n_tiles, 4) int64 (the three
    read contiguous); widest: the widest segment hi - lo (rows mode).
    """
    n_tiles = tiles.shape[0]
    n = y.shape[1] if cols else widest
    if n_tiles == 0 or n == 0:
        return y

    def grid(meta):
        return (n_tiles * triton.cdiv(n, meta["BLOCK_N"]),)

    wrap_triton(tuned)[grid](
        x, delta, y, index.contiguous(), tokens.contiguous(), tiles.contiguous(),
        x.shape[0], x.shape[1], y.shape[1], n,
        *x.stride(), *delta.stride(), *y.stride(),
        COLS=cols, DOT_PRECISION=dot_precision(x.dtype))
    return y
