"""Fused Kronecker product applied to rows: Y_m = scale * A X_m B^T (+ bias), never forming A (x) B.

For a row x of length a2*b2 viewed as X (a2, b2), (A (x) B) x = vec(A X B^T). The kernel
reads each tile of rows once, keeps X B^T on chip, and writes Y once. With transposed
factors (strides swapped) the same kernel computes the input gradient A^T dY_m B.
"""
import itertools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...kron import dispatch
from ..launch import (ELEMENT_BYTES, PRECISIONS, TOKENS, CompileCase, autotuned,
                      dot_precision, live_words, viable_configs)
from . import rows_persistent
from .tiles import COMPILE_SHAPES, ROW_BLOCK_CONFIGS, int32_rows, kron_tile, tile_lengths


@triton.jit
def kron_rows_kernel(
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
    """x: (M, A2, B2) any strides; a: (A1, A2); b: (B1, B2); bias: (A1*B1,); y: (M, A1*B1).

    Grid: (cdiv(M, BLOCK_M) * cdiv(B1, BLOCK_N) * cdiv(A1, BLOCK_I),), the output tile of a
    row block fastest: the programs that read the same rows of x run together, so wide
    layers (several output tiles a row) read x from DRAM once, not once per tile.
    """
    tiles_n = tl.cdiv(B1, BLOCK_N)
    tiles_per_row = tiles_n * tl.cdiv(A1, BLOCK_I)
    pid = tl.program_id(0)
    pid_m = pid // tiles_per_row
    pid_n = pid % tiles_n
    pid_i = (pid % tiles_per_row) // tiles_n

    pair_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M * BLOCK_J) // BLOCK_J
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)

    acc = kron_tile(x_ptr, a_ptr, b_ptr, pair_m, offs_n, offs_i, M, A1, A2, B1, B2,
                    stride_xm, stride_xj, stride_xl, stride_ai, stride_aj, stride_bn, stride_bl,
                    BLOCK_M, BLOCK_I, BLOCK_J, BLOCK_N, BLOCK_L, DOT_PRECISION)
    acc = acc * scale
    cols = tl.arange(0, BLOCK_M * BLOCK_N)
    col_m = pid_m * BLOCK_M + cols // BLOCK_N
    col_n = pid_n * BLOCK_N + cols % BLOCK_N
    feature = offs_i[:, None] * B1 + col_n[None, :]
    mask = (offs_i[:, None] < A1) & (col_m[None, :] < M) & (col_n[None, :] < B1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + feature, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + col_m[None, :].to(tl.int64) * stride_ym + feature,
             acc.to(y_ptr.dtype.element_ty), mask=mask)


CONFIGS = ROW_BLOCK_CONFIGS


def footprint(config, tiles, element_bytes) -> int:
    """Words live per program: output and X B^T tiles; x, B and A tiles."""
    m, i, j, n, l = (config.kwargs["BLOCK_M"], tiles["BLOCK_I"], tiles["BLOCK_J"],
                     tiles["BLOCK_N"], tiles["BLOCK_L"])
    return live_words(m * n * (i + j), m * j * l + l * n + i * j, element_bytes,
                      tiles["DOT_PRECISION"])


tuned = autotuned(kron_rows_kernel, CONFIGS, key=["A1", "A2", "B1", "B2", "HAS_BIAS"],
                  footprint=footprint)


def tile_shape(a1: int, a2: int, b1: int, b2: int, precision: str) -> dict:
    """Shape-derived constexprs of ``kron_rows_kernel`` (the configs add BLOCK_M)."""
    return tile_lengths(precision, I=a1, J=a2, N=b1, L=b2)


def launch_ints(a1: int, a2: int, b1: int, b2: int, transposed: bool) -> dict:
    """Integer arguments of a launch on TOKENS contiguous (TOKENS, a2, b2) rows, with factors
    A (a1, a2) and B (b1, b2), or with the transposed views A.mT and B.mT of contiguous
    (a2, a1) and (b2, b1) factors (``kron_linear``'s dX)."""
    a_strides, b_strides = ((1, a1), (1, b1)) if transposed else ((a2, 1), (b2, 1))
    return dict(M=TOKENS, A1=a1, A2=a2, B1=b1, B2=b2,
                stride_xm=a2 * b2, stride_xj=b2, stride_xl=1,
                stride_ai=a_strides[0], stride_aj=a_strides[1],
                stride_bn=b_strides[0], stride_bl=b_strides[1], stride_ym=a1 * b1)


def compile_cases() -> list[CompileCase]:
    """What ``kron_linear`` launches: forward with and without bias, and dX = A^T dY B on
    transposed factor views, per factor shape and precision."""
    cases = []
    for (a1, a2, b1, b2), (element, precision) in itertools.product(COMPILE_SHAPES, PRECISIONS):
        for role, has_bias, dims in [("fwd", True, (a1, a2, b1, b2)),
                                     ("fwd", False, (a1, a2, b1, b2)),
                                     ("dx", False, (a2, a1, b2, b1))]:
            constexprs = dict(HAS_BIAS=has_bias, **tile_shape(*dims, precision))
            cases.append(CompileCase(
                f"kron_rows-{role}-bias{int(has_bias)}-{a1}x{a2}x{b1}x{b2}-{element}-{precision}",
                kron_rows_kernel, constexprs, element,
                viable_configs(CONFIGS, footprint, constexprs, ELEMENT_BYTES[element]),
                launch_ints(*dims, transposed=role == "dx")))
    return cases


def triton_kron_rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """CUDA kernel of ``kronops::kron_rows``: y[m] = scale * vec(a @ x[m] @ b.T) + bias, by the
    persistent kernel (``rows_persistent``) where ``dispatch.persistent_forward`` picks it,
    else by row blocks (``launch_kron_rows``). Shapes as ``launch_kron_rows``."""
    fits = rows_persistent.fits(*a.shape, *b.shape, x.dtype)
    if dispatch.persistent_forward(fits):
        return rows_persistent.triton_kron_rows_persistent(x, a, b, bias, scale)
    return launch_kron_rows(x, a, b, bias, scale)


def launch_kron_rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """y[m] = scale * vec(a @ x[m] @ b.T) + bias, one program per row block and output tile.

    x: (M, a2, b2), a: (a1, a2), b: (b1, b2), any strides; bias: (a1*b1,) or None.
    Returns a new contiguous (M, a1*b1) tensor of x's dtype.
    """
    m, a2, b2 = x.shape
    a1, b1 = a.shape[0], b.shape[0]
    x = int32_rows(x)
    bias = None if bias is None else bias.contiguous()
    y = torch.empty((m, a1 * b1), device=x.device, dtype=x.dtype)
    if m == 0 or y.numel() == 0:
        return y
    tiles = tile_shape(a1, a2, b1, b2, dot_precision(x.dtype))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(b1, meta["BLOCK_N"])
                * triton.cdiv(a1, meta["BLOCK_I"]),)

    wrap_triton(tuned)[grid](
        x, a, b, bias if bias is not None else y, y,
        m, a1, a2, b1, b2,
        *x.stride(), *a.stride(), *b.stride(), y.stride(0),
        float(scale),
        HAS_BIAS=bias is not None, **tiles)
    return y
