"""Gradient of a Kronecker factor: G = sum_m dY_m F X_m^T, reduced deterministically.

For Y_m = A X_m B^T:  dA = sum_m dY_m B X_m^T  and  dB = sum_m dY_m^T A X_m, the second
being the first with every per-row matrix transposed (strides swapped). Each program
walks a fixed, strided set of row blocks and writes one fp32 partial; the partials are
summed in a fixed order, so the result does not depend on scheduling (no atomics).
"""
import itertools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..launch import (ELEMENT_BYTES, PRECISIONS, TOKENS, CompileCase, autotuned,
                      dot_precision, live_words, viable_configs)
from .tiles import (COMPILE_SHAPES, ROW_BLOCK_CONFIGS, int32_rows, rows_times_factor_t,
                    tile_lengths, times_fp32_tile)
from ..partial_sums import finish, new_partials, row_groups


@triton.jit
def kron_factor_grad_kernel(
    dy_ptr, f_ptr, x_ptr, partial_ptr,
    M, P, N, R, Q,
    stride_dym, stride_dyp, stride_dyn,
    stride_fn, stride_fq,
    stride_xm, stride_xr, stride_xq,
    stride_pg, stride_pp,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dy: (M, P, N), f: (N, Q), x: (M, R, Q), any strides; partial: (G, P, R) fp32.

    Grid: (G, cdiv(P, BLOCK_P), cdiv(R, BLOCK_R)); program g sums row blocks g, g+G, ...
    """
    pid_g = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_r = tl.program_id(2)
    num_groups = tl.num_programs(0)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.arange(0, BLOCK_M * BLOCK_R)   # (m, r) pairs, m-major
    cols = tl.arange(0, BLOCK_M * BLOCK_N)    # (m, n) pairs, m-major

    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for row_block in range(pid_g, tl.cdiv(M, BLOCK_M), num_groups):
        pair_m = row_block * BLOCK_M + pairs // BLOCK_R
        pair_r = pid_r * BLOCK_R + pairs % BLOCK_R
        col_m = row_block * BLOCK_M + cols // BLOCK_N
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            t = rows_times_factor_t(
                x_ptr, f_ptr, pair_m, pair_r, offs_n, M, R, Q, N,
                stride_xm, stride_xr, stride_xq, stride_fn, stride_fq,
                BLOCK_M * BLOCK_R, BLOCK_N, BLOCK_Q, DOT_PRECISION)
            # (m, r) x n  ->  (m, n) x r
            t = tl.reshape(t, (BLOCK_M, BLOCK_R, BLOCK_N))
            t = tl.reshape(tl.permute(t, (0, 2, 1)), (BLOCK_M * BLOCK_N, BLOCK_R))
            col_n = n0 + cols % BLOCK_N
            dy = tl.load(dy_ptr + col_m[None, :].to(tl.int64) * stride_dym
                         + offs_p[:, None] * stride_dyp + col_n[None, :] * stride_dyn,
                         mask=(offs_p[:, None] < P) & (col_m[None, :] < M) & (col_n[None, :] < N),
                         other=0.0)
            acc = times_fp32_tile(dy, t, acc, DOT_PRECISION)

    tl.store(partial_ptr + pid_g.to(tl.int64) * stride_pg + offs_p[:, None] * stride_pp
             + offs_r[None, :],
             acc, mask=(offs_p[:, None] < P) & (offs_r[None, :] < R))


CONFIGS = ROW_BLOCK_CONFIGS


def footprint(config, tiles, element_bytes) -> int:
    """Words live per program: gradient and X F^T tiles; x, F and dY tiles."""
    m, p, r, n, q = (config.kwargs["BLOCK_M"], tiles["BLOCK_P"], tiles["BLOCK_R"],
                     tiles["BLOCK_N"], tiles["BLOCK_Q"])
    return live_words(p * r + m * r * n, m * r * q + q * n + p * m * n, element_bytes,
                      tiles["DOT_PRECISION"])


tuned = autotuned(kron_factor_grad_kernel, CONFIGS, key=["P", "N", "R", "Q"],
                  footprint=footprint)


def tile_shape(p: int, n: int, r: int, q: int, precision: str) -> dict:
    """Shape-derived constexprs of ``kron_factor_grad_kernel`` (the configs add BLOCK_M)."""
    return tile_lengths(precision, P=p, R=r, N=n, Q=q)


def launch_ints(p: int, n: int, r: int, q: int, transposed: bool) -> dict:
    """Integer arguments of a launch over TOKENS rows: dY (TOKENS, p, n) and x (TOKENS, r, q)
    contiguous, or (``transposed``, dB) the views dY.mT and x.mT of contiguous (TOKENS, n, p)
    and (TOKENS, q, r); F (n, q) and the (G, p, r) partial contiguous."""
    dy_strides, x_strides = ((1, p), (1, r)) if transposed else ((n, 1), (q, 1))
    return dict(M=TOKENS, P=p, N=n, R=r, Q=q,
                stride_dym=p * n, stride_dyp=dy_strides[0], stride_dyn=dy_strides[1],
                stride_fn=q, stride_fq=1,
                stride_xm=r * q, stride_xr=x_strides[0], stride_xq=x_strides[1],
                stride_pg=p * r, stride_pp=r)


def compile_cases() -> list[CompileCase]:
    """What ``kron_linear``'s backward launches: dA, and dB with dY and X per-row transposed."""
    cases = []
    for (a1, a2, b1, b2), (element, precision) in itertools.product(COMPILE_SHAPES, PRECISIONS):
        for role, dims in [("da", (a1, b1, a2, b2)), ("db", (b1, a1, b2, a2))]:
            tiles = tile_shape(*dims, precision)
            cases.append(CompileCase(
                f"kron_factor_grad-{role}-{a1}x{a2}x{b1}x{b2}-{element}-{precision}",
                kron_factor_grad_kernel, tiles, element,
                viable_configs(CONFIGS, footprint, tiles, ELEMENT_BYTES[element]),
                launch_ints(*dims, transposed=role == "db"), {"partial_ptr": "*fp32"}))
    return cases


def triton_kron_factor_grad(dy: torch.Tensor, f: torch.Tensor, x: torch.Tensor,
                            scale: float = 1.0) -> torch.Tensor:
    """scale * sum_m dy[m] @ f @ x[m].T, accumulated in fp32.

    dy: (M, P, N), f: (N, Q), x: (M, R, Q), all any strides and one dtype.
    Returns a new (P, R) tensor of dy's dtype.
    """
    m, p, n = dy.shape
    r, q = x.shape[1], x.shape[2]
    dy, x = int32_rows(dy), int32_rows(x)
    tiles = tile_shape(p, n, r, q, dot_precision(dy.dtype))
    # Enough row groups to fill the GPU together with the output tiles, each group
    # summing at least 8 rows; each group writes one fp32 (P, R) partial.
    out_tiles = triton.cdiv(p, tiles["BLOCK_P"]) * triton.cdiv(r, tiles["BLOCK_R"])
    groups = row_groups(m, out_tiles, 8, dy.device)
    partial = new_partials(groups, p, r, dy.device)
    if partial.numel() == 0:
        return torch.zeros((p, r), device=dy.device, dtype=dy.dtype)

    def grid(meta):
        return (groups, triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(r, meta["BLOCK_R"]))

    wrap_triton(tuned)[grid](
        dy, f, x, partial,
        m, p, n, r, q,
        *dy.stride(), *f.stride(), *x.stride(), partial.stride(0), partial.stride(1),
        **tiles)
    return finish(partial, scale, dy.dtype)
