"""The Kronecker forward as a persistent kernel: Y_m = scale * A X_m B^T (+ bias) where A and
B each fit one tile, loaded once per program, over a grid of about two programs per SM.

Each program walks blocks of BLOCK_M rows (g, g+G, ...): T = X_blk B^T in one dot over the
block's BLOCK_M*J rows, then Y = A T for all BLOCK_M rows in one dot; the loop's loads of
the next block overlap this block's dots (num_stages). Against ``rows.py`` (one program
per row block, A and B fetched from L2 for each) it saves the factor traffic and the grid's
tail. Opt-in until measured on a GPU: ``dispatch.override(persistent=True)`` (the earlier
persistent attempt did not beat ``rows.py``; bench/NOTES.md has the prediction).
"""
import itertools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..launch import (ELEMENT_BYTES, PRECISIONS, REGISTER_BUDGET, TOKENS, CompileCase,
                      autotuned, dot_precision, num_programs_cap, tile_words, viable_configs)
from .tiles import int32_rows, load_matrix, tile_lengths, times_fp32_tile


@triton.jit
def kron_rows_persistent_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
    M, A1, A2, B1, B2,
    stride_xm, stride_xj, stride_xl,
    stride_ai, stride_aj,
    stride_bn, stride_bl,
    stride_ym,
    scale,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """x: (M, A2, B2) any strides; a: (A1, A2); b: (B1, B2); bias: (A1*B1,); y: (M, A1*B1)
    rows of unit inner stride. Each factor fits its tile. Grid: (G,)."""
    g = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_i = tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, BLOCK_J)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    a = load_matrix(a_ptr, offs_i, offs_j, A1, A2, stride_ai, stride_aj)
    b = load_matrix(b_ptr, offs_n, offs_l, B1, B2, stride_bn, stride_bl)
    pairs = tl.arange(0, BLOCK_M * BLOCK_J)          # (m, j) rows of X_blk, m-major
    cols = tl.arange(0, BLOCK_M * BLOCK_N)           # (m, n) columns of Y_blk, m-major
    pair_j = pairs % BLOCK_J
    col_n = cols % BLOCK_N
    feature = offs_i[:, None] * B1 + col_n[None, :]
    feature_ok = (offs_i[:, None] < A1) & (col_n[None, :] < B1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + feature, mask=feature_ok, other=0.0).to(tl.float32)
    first = g.to(tl.int64) * BLOCK_M
    for _ in range(g, tl.cdiv(M, BLOCK_M), programs):
        pair_m = first + pairs // BLOCK_J
        x = tl.load(x_ptr + pair_m[:, None] * stride_xm + pair_j[:, None] * stride_xj
                    + offs_l[None, :] * stride_xl,
                    mask=(pair_m[:, None] < M) & (pair_j[:, None] < A2)
                    & (offs_l[None, :] < B2), other=0.0)
        t = tl.dot(x, tl.trans(b), input_precision=DOT_PRECISION)   # (m, j) x n, fp32
        t = tl.reshape(t, (BLOCK_M, BLOCK_J, BLOCK_N))
        t = tl.reshape(tl.permute(t, (1, 0, 2)), (BLOCK_J, BLOCK_M * BLOCK_N))
        y = times_fp32_tile(a, t, tl.zeros((BLOCK_I, BLOCK_M * BLOCK_N), dtype=tl.float32),
                            DOT_PRECISION) * scale
        if HAS_BIAS:
            y += bias
        col_m = first + cols // BLOCK_N
        tl.store(y_ptr + col_m[None, :] * stride_ym + feature, y.to(y_ptr.dtype.element_ty),
                 mask=feature_ok & (col_m[None, :] < M))
        first += programs * BLOCK_M


# Rows per block x warps x stages.
CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
           for m, w, s in [(1, 4, 3), (1, 8, 3), (2, 8, 3), (4, 8, 3)]]
# Factor shapes compiled ahead of time: all-64 (4096-wide layers), all-32, all-16.
COMPILE_SHAPES = [(64, 64, 64, 64), (32, 32, 32, 32), (16, 16, 16, 16)]


def footprint(config, constexprs, element_bytes) -> int:
    """Words live per program: the fp32 T and Y tiles of a row block, and the bias tile kept
    across blocks; the A, B and x tiles only for 4-byte elements (16-bit tensor-core
    operands sit in shared memory)."""
    m, i, j, n, l = (config.kwargs["BLOCK_M"], *(constexprs[f"BLOCK_{k}"] for k in "IJNL"))
    accumulators = m * n * (j + i * (2 if constexprs.get("HAS_BIAS", True) else 1))
    return tile_words(accumulators, i * j + n * l + m * j * l, 0, element_bytes,
                      constexprs["DOT_PRECISION"])


tuned = autotuned(kron_rows_persistent_kernel, CONFIGS,
                  key=["A1", "A2", "B1", "B2", "HAS_BIAS"], footprint=footprint)


def tile_shape(a1: int, a2: int, b1: int, b2: int, precision: str) -> dict:
    """The kernel's tile constexprs: one tile per factor side (the configs add BLOCK_M)."""
    return tile_lengths(precision, I=a1, J=a2, N=b1, L=b2)


def runnable(tiles: dict, element_bytes: int, a1: int, a2: int, b1: int, b2: int) -> bool:
    """Whether ``tiles`` hold each factor whole and some config fits the register budget."""
    return all(tiles[f"BLOCK_{k}"] >= n for k, n in zip("IJNL", (a1, a2, b1, b2))) and any(
        footprint(c, tiles, element_bytes) <= REGISTER_BUDGET * 32 * c.num_warps for c in CONFIGS)


def fits(a1: int, a2: int, b1: int, b2: int, dtype: torch.dtype) -> bool:
    """Whether this kernel runs the forward of these factors in this dtype."""
    return runnable(tile_shape(a1, a2, b1, b2, dot_precision(dtype)),
                    torch.empty(0, dtype=dtype).element_size(), a1, a2, b1, b2)


def compile_cases() -> list[CompileCase]:
    """The forward with and without bias, per factor shape and precision where it runs."""
    cases = []
    for (a1, a2, b1, b2), (element, precision) in itertools.product(COMPILE_SHAPES, PRECISIONS):
        tiles = tile_shape(a1, a2, b1, b2, precision)
        if not runnable(tiles, ELEMENT_BYTES[element], a1, a2, b1, b2):
            continue
        for has_bias in (True, False):
            constexprs = dict(HAS_BIAS=has_bias, **tiles)
            cases.append(CompileCase(
                f"kron_rows_persistent-bias{int(has_bias)}-{a1}x{a2}x{b1}x{b2}-{element}-"
                f"{precision}",
                kron_rows_persistent_kernel, constexprs, element,
                viable_configs(CONFIGS, footprint, constexprs, ELEMENT_BYTES[element]),
                dict(M=TOKENS, A1=a1, A2=a2, B1=b1, B2=b2, stride_xm=a2 * b2, stride_xj=b2,
                     stride_xl=1, stride_ai=a2, stride_aj=1, stride_bn=b2, stride_bl=1,
                     stride_ym=a1 * b1)))
    return cases


def triton_kron_rows_persistent(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                bias: torch.Tensor | None = None,
                                scale: float = 1.0) -> torch.Tensor:
    """y[m] = scale * vec(a @ x[m] @ b.T) + bias, for factors that ``fits``.

    x: (M, a2, b2), a: (a1, a2), b: (b1, b2), any strides; bias: (a1*b1,) or None.
    Returns a new contiguous (M, a1*b1) tensor of x's dtype.
    """
    m, a2, b2 = x.shape
    a1, b1 = a.shape[0], b.shape[0]
    x = int32_rows(x)
    bias = None if bias is None else bias.contiguous()
    y = torch.empty((m, a1 * b1), device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    groups = max(1, min(m, num_programs_cap(x.device) // 2))
    wrap_triton(tuned)[(groups,)](
        x, a, b, bias if bias is not None else y, y,
        m, a1, a2, b1, b2,
        *x.stride(), *a.stride(), *b.stride(), y.stride(0),
        float(scale),
        HAS_BIAS=bias is not None, **tile_shape(a1, a2, b1, b2, dot_precision(x.dtype)))
    return y
