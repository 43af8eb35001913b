"""Many Kronecker adapters in one launch: y[t] += vec(A_p X_t B_p^T) for each token t, with
p the adapter its batch row is routed to (the serving bank's mixed batches).

Tokens arrive grouped by adapter: ``tokens`` lists rows of x, and each row of the tile
table ``tiles`` names a run tokens[start:stop] (at most one serving tile long) and its
adapter p, whose factors are a[p] and b[p] (one factor shape per launch). A program takes
one tile (and one output tile), loops over it BLOCK_M tokens at a time with the fused
Kronecker product of ``kron_tile`` (X B^T kept on chip), and adds into y in place.
Tokens are unique, so programs never write the same element.
"""
import itertools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..kron.rows import footprint, tile_shape
from ..kron.tiles import COMPILE_SHAPES, ROW_BLOCK_CONFIGS, int32_rows, kron_tile
from ..launch import (ELEMENT_BYTES, PRECISIONS, TOKENS, CompileCase, autotuned,
                      dot_precision, viable_configs)


@triton.jit
def routed_tokens(tokens_ptr, positions, stop, M):
    """tokens[positions] for positions < stop; M (a row that reads and writes nothing) for
    the others and for any token outside [0, M), whatever the table holds."""
    rows = tl.load(tokens_ptr + positions, mask=positions < stop, other=M)
    return tl.where((rows >= 0) & (rows < M), rows, M)


@triton.jit
def routed_kron_add_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, tokens_ptr, tiles_ptr,
    M, A1, A2, B1, B2,
    stride_xm, stride_xj, stride_xl,
    stride_ap, stride_ai, stride_aj,
    stride_bp, stride_bn, stride_bl,
    stride_ym, stride_yf,
    DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """x: (M, A2, B2); a: (P, A1, A2); b: (P, B1, B2); y: (M, A1*B1); any strides.
    tokens: int64 rows of x; tiles: (n_tiles, 4) int64 rows [start, stop, p, unused].

    Grid: (n_tiles, cdiv(B1, BLOCK_N), cdiv(A1, BLOCK_I)).
    """
    tile = tiles_ptr + tl.program_id(0) * 4
    start = tl.load(tile)
    stop = tl.load(tile + 1)
    member = tl.load(tile + 2)
    a_ptr += member * stride_ap
    b_ptr += member * stride_bp
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = tl.arange(0, BLOCK_M * BLOCK_N)
    col_n = tl.program_id(1) * BLOCK_N + cols % BLOCK_N
    feature = (offs_i[:, None] * B1 + col_n[None, :]).to(tl.int64) * stride_yf
    for m0 in range(start, stop, BLOCK_M):
        pair_m = routed_tokens(tokens_ptr, m0 + tl.arange(0, BLOCK_M * BLOCK_J) // BLOCK_J,
                               stop, M)
        acc = kron_tile(x_ptr, a_ptr, b_ptr, pair_m, offs_n, offs_i, M, A1, A2, B1, B2,
                        stride_xm, stride_xj, stride_xl, stride_ai, stride_aj, stride_bn,
                        stride_bl, BLOCK_M, BLOCK_I, BLOCK_J, BLOCK_N, BLOCK_L, DOT_PRECISION)
        col_m = routed_tokens(tokens_ptr, m0 + cols // BLOCK_N, stop, M)
        mask = (offs_i[:, None] < A1) & (col_m[None, :] < M) & (col_n[None, :] < B1)
        ptrs = y_ptr + col_m[None, :].to(tl.int64) * stride_ym + feature
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# The Kronecker kernels' configs and register model: the tile is kron_rows_kernel's.
tuned = autotuned(routed_kron_add_kernel, ROW_BLOCK_CONFIGS, key=["A1", "A2", "B1", "B2"],
                  footprint=footprint, restore_value=["y_ptr"])


def compile_cases() -> list[CompileCase]:
    """A mixed batch of TOKENS contiguous rows through each compiled factor shape, factors
    stacked contiguously, per precision."""
    cases = []
    for (a1, a2, b1, b2), (element, precision) in itertools.product(COMPILE_SHAPES, PRECISIONS):
        constexprs = tile_shape(a1, a2, b1, b2, precision)
        ints = dict(M=TOKENS, A1=a1, A2=a2, B1=b1, B2=b2, stride_xm=a2 * b2, stride_xj=b2,
                    stride_xl=1, stride_ap=a1 * a2, stride_ai=a2, stride_aj=1,
                    stride_bp=b1 * b2, stride_bn=b2, stride_bl=1, stride_ym=a1 * b1,
                    stride_yf=1)
        cases.append(CompileCase(
            f"routed_kron_add-{a1}x{a2}x{b1}x{b2}-{element}-{precision}",
            routed_kron_add_kernel, constexprs, element,
            viable_configs(ROW_BLOCK_CONFIGS, footprint, constexprs, ELEMENT_BYTES[element]),
            ints, {"tokens_ptr": "*i64", "tiles_ptr": "*i64"}))
    return cases


def triton_routed_kron_add(y, x, a, b, tokens, tiles, offsets, starts) -> None:
    """CUDA kernel of ``kronops::routed_kron_add`` (x: (M, a2*b2)): every member in one
    launch (``launch_routed_kron_add``)."""
    launch_routed_kron_add(y, x.reshape(x.shape[0], a.shape[2], b.shape[2]), a, b, tokens,
                           tiles)


def launch_routed_kron_add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                           tokens: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """y[t] += vec(a[p] @ x[t] @ b[p].T) in place for the tokens t of each tile; returns y.

    y: (M, a1*b1); x: (M, a2, b2); a: (P, a1, a2); b: (P, b1, b2); all one dtype, any
    strides. tokens: (T,) int64; tiles: (n_tiles, 4) int64 (both read contiguous).
    """
    p, a1, a2 = a.shape
    b1 = b.shape[1]
    n_tiles = tiles.shape[0]
    if n_tiles == 0 or y.shape[1] == 0 or p == 0:
        return y
    x = int32_rows(x)
    tiles_const = tile_shape(a1, a2, b1, b.shape[2], dot_precision(x.dtype))

    def grid(meta):
        return (n_tiles, triton.cdiv(b1, meta["BLOCK_N"]), triton.cdiv(a1, meta["BLOCK_I"]))

    wrap_triton(tuned)[grid](
        x, a, b, y, tokens.contiguous(), tiles.contiguous(),
        x.shape[0], a1, a2, b1, b.shape[2],
        *x.stride(), *a.stride(), *b.stride(), *y.stride(),
        **tiles_const)
    return y
