"""The Kronecker backward in one pass: dX, dA and dB of Y_m = scale * A X_m B^T from a
persistent kernel that reads each x_m and dY_m once.

Per row: dT = A^T dY_m feeds dX_m = dT B and dB += dT^T X_m; T = X_m B^T feeds
dA += dY_m T^T (five products). A and B are loaded once per program; every factor fits one
tile, so dA and dB stay in registers across the program's rows and are written once as fp32
partials, summed in program order (``partial_sums.finish``): bitwise reproducible for a
given grid. ``launches`` plans the passes: one where the live tiles fit the register budget
(factors up to about 32×32), else dX with dB and then dA (64⁴ in 16-bit: one pass spilled);
where a factor exceeds a tile (64, or 32 for ieee fp32) or neither plan fits (fp32 at 64⁴),
``kron_rows_grads`` runs the three-kernel path (``rows.py``, ``factor_grad.py``).
"""
import itertools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...kron import dispatch
from ..launch import (ELEMENT_BYTES, PRECISIONS, REGISTER_BUDGET, TOKENS, CompileCase,
                      autotuned, dot_precision, num_programs_cap, tile_words, viable_configs)
from ..partial_sums import finish, new_partials
from .factor_grad import triton_kron_factor_grad
from .rows import launch_kron_rows
from .tiles import int32_rows, load_matrix, tile_lengths, times_fp32_tile


@triton.jit
def kron_rows_grads_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, dx_ptr, da_ptr, db_ptr,
    M, A1, A2, B1, B2,
    stride_dym, stride_dyi, stride_dyn,
    stride_xm, stride_xj, stride_xl,
    stride_ai, stride_aj,
    stride_bn, stride_bl,
    stride_dxm, stride_dag, stride_dbg,
    scale,
    NEED_X: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dy: (M, A1, B1), x: (M, A2, B2), a: (A1, A2), b: (B1, B2), any strides; dx: (M, A2*B2)
    rows of unit inner stride; da: (G, A1, A2) and db: (G, B1, B2) fp32 partials, unscaled.

    Grid: (G,); program g takes rows g, g+G, g+2G, ...
    """
    g = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_i = tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, BLOCK_J)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    a = load_matrix(a_ptr, offs_i, offs_j, A1, A2, stride_ai, stride_aj)
    b = load_matrix(b_ptr, offs_n, offs_l, B1, B2, stride_bn, stride_bl)
    da = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    db_t = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)   # dB^T, as times_fp32_tile forms it
    row = g.to(tl.int64)
    for _ in range(g, M, programs):
        dy = load_matrix(dy_ptr + row * stride_dym, offs_i, offs_n, A1, B1, stride_dyi,
                         stride_dyn)
        x = load_matrix(x_ptr + row * stride_xm, offs_j, offs_l, A2, B2, stride_xj, stride_xl)
        if NEED_X or NEED_B:
            dt = tl.dot(tl.trans(a), dy, input_precision=DOT_PRECISION)      # (J, N) fp32
            if NEED_X:   # dX_m^T = B^T dT^T
                dx_t = times_fp32_tile(tl.trans(b), tl.trans(dt),
                                       tl.zeros((BLOCK_L, BLOCK_J), dtype=tl.float32),
                                       DOT_PRECISION)
                dx = tl.trans(dx_t) * scale
                tl.store(dx_ptr + row * stride_dxm + offs_j[:, None] * B2 + offs_l[None, :],
                         dx.to(dx_ptr.dtype.element_ty),
                         mask=(offs_j[:, None] < A2) & (offs_l[None, :] < B2))
            if NEED_B:   # dB^T += X_m^T dT
                db_t = times_fp32_tile(tl.trans(x), dt, db_t, DOT_PRECISION)
        if NEED_A:       # dA += dY_m (X_m B^T)^T
            t = tl.dot(x, tl.trans(b), input_precision=DOT_PRECISION)        # (J, N) fp32
            da = times_fp32_tile(dy, tl.trans(t), da, DOT_PRECISION)
        row += programs
    if NEED_A:
        tl.store(da_ptr + g.to(tl.int64) * stride_dag + offs_i[:, None] * A2 + offs_j[None, :],
                 da, mask=(offs_i[:, None] < A1) & (offs_j[None, :] < A2))
    if NEED_B:
        db = tl.trans(db_t)
        tl.store(db_ptr + g.to(tl.int64) * stride_dbg + offs_n[:, None] * B2 + offs_l[None, :],
                 db, mask=(offs_n[:, None] < B1) & (offs_l[None, :] < B2))


# Warps x pipeline stages (the row loop's loads of x_m and dY_m are what the stages overlap).
CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in [(4, 2), (8, 2), (8, 3)]]
# Factor shapes compiled ahead of time: all-16, all-32 (1024-wide layers, one launch),
# all-64 (4096-wide: two launches) and MiniLM's 32×16 ⊗ 48×24 (tiles padded to 64 and 32).
COMPILE_SHAPES = [(16, 16, 16, 16), (32, 32, 32, 32), (64, 64, 64, 64), (32, 16, 48, 24)]


def footprint(config, constexprs, element_bytes) -> int:
    """Words live per program for the gradients a launch computes: the fp32 accumulators
    (dA, dB^T) and one row's fp32 intermediates (dT, T, dX^T); the A, B, x_m and dY_m tiles
    only for 4-byte elements: 16-bit tensor-core dots stage their operands in shared memory
    (compiled at 64⁴: 76-104 registers on sm_90 where this model counts 48-80 words)."""
    i, j, n, l = (constexprs[f"BLOCK_{k}"] for k in "IJNL")
    x, a, b = constexprs["NEED_X"], constexprs["NEED_A"], constexprs["NEED_B"]
    accumulators = (x or b) * j * n + x * l * j + b * l * n + a * (i * j + j * n)
    return tile_words(accumulators, i * j + n * l + i * n + j * l, 0, element_bytes,
                      constexprs["DOT_PRECISION"])


tuned = autotuned(kron_rows_grads_kernel, CONFIGS,
                  key=["A1", "A2", "B1", "B2", "NEED_X", "NEED_A", "NEED_B"],
                  footprint=footprint)


def tile_shape(a1: int, a2: int, b1: int, b2: int, precision: str) -> dict:
    """The kernel's tile constexprs: one tile per factor side."""
    return tile_lengths(precision, I=a1, J=a2, N=b1, L=b2)


def launches(a1: int, a2: int, b1: int, b2: int, element_bytes: int, precision: str,
             need_x: bool, need_a: bool, need_b: bool) -> list[dict] | None:
    """The launches (their NEED_* flags) that compute the asked gradients: one where its live
    tiles fit the register budget, else dX with dB and then dA (each pass reads x and dY
    once); None where a factor does not fit one tile or neither plan fits the budget."""
    tiles = tile_shape(a1, a2, b1, b2, precision)
    if any(tiles[f"BLOCK_{k}"] < n for k, n in zip("IJNL", (a1, a2, b1, b2))):
        return None
    together = [dict(NEED_X=need_x, NEED_A=need_a, NEED_B=need_b)]
    apart = [dict(NEED_X=need_x, NEED_A=False, NEED_B=need_b),
             dict(NEED_X=False, NEED_A=need_a, NEED_B=False)]
    for plan in (together, apart):
        plan = [flags for flags in plan if any(flags.values())]
        if all(any(footprint(c, {**tiles, **flags}, element_bytes)
                   <= REGISTER_BUDGET * 32 * c.num_warps for c in CONFIGS) for flags in plan):
            return plan
    return None


def fits(a1: int, a2: int, b1: int, b2: int, dtype: torch.dtype) -> bool:
    """Whether this kernel computes the backward of these factors (``launches``)."""
    element_bytes = torch.empty(0, dtype=dtype).element_size()
    return launches(a1, a2, b1, b2, element_bytes, dot_precision(dtype), True, True,
                    True) is not None


def launch_ints(a1: int, a2: int, b1: int, b2: int) -> dict:
    """Integer arguments of a launch on TOKENS contiguous rows and contiguous factors."""
    return dict(M=TOKENS, A1=a1, A2=a2, B1=b1, B2=b2,
                stride_dym=a1 * b1, stride_dyi=b1, stride_dyn=1,
                stride_xm=a2 * b2, stride_xj=b2, stride_xl=1,
                stride_ai=a2, stride_aj=1, stride_bn=b2, stride_bl=1,
                stride_dxm=a2 * b2, stride_dag=a1 * a2, stride_dbg=b1 * b2)


def compile_cases() -> list[CompileCase]:
    """What ``kron_linear``'s backward launches where the factors fit: all three gradients,
    and the factor gradients alone (a frozen input), per factor shape and precision."""
    cases = []
    for (a1, a2, b1, b2), (element, precision) in itertools.product(COMPILE_SHAPES, PRECISIONS):
        tiles = tile_shape(a1, a2, b1, b2, precision)
        for need_x in (True, False):
            for flags in launches(a1, a2, b1, b2, ELEMENT_BYTES[element], precision, need_x,
                                  True, True) or []:
                constexprs = {**flags, **tiles}
                which = "".join(k[-1].lower() for k, v in flags.items() if v)
                cases.append(CompileCase(
                    f"kron_rows_grads-{which}-{a1}x{a2}x{b1}x{b2}-{element}-{precision}",
                    kron_rows_grads_kernel, constexprs, element,
                    viable_configs(CONFIGS, footprint, constexprs, ELEMENT_BYTES[element]),
                    launch_ints(a1, a2, b1, b2), {"da_ptr": "*fp32", "db_ptr": "*fp32"}))
    return list({case.name: case for case in cases}.values())  # a dA launch serves both


def triton_kron_rows_grads_one_pass(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                                    b: torch.Tensor, scale: float, need_x: bool, need_a: bool,
                                    need_b: bool):
    """(dX, dA, dB) of y[m] = scale * vec(a @ x[m] @ b.T), each pass reading x and dY once
    (``launches``: one pass, or two); a gradient not needed is an empty tensor. dy:
    (M, a1, b1), x: (M, a2, b2), a: (a1, a2), b: (b1, b2), any strides, one dtype, factors
    that ``fits``. Returns dX (M, a2, b2) contiguous, dA and dB in dy's dtype (each a tensor
    of its own: custom ops may not return aliases)."""
    m, a1, b1 = dy.shape
    a2, b2 = x.shape[1], x.shape[2]
    dx = torch.empty((m, a2, b2), device=dy.device, dtype=dy.dtype) if need_x else dy.new_empty(0)
    if m == 0:
        return (dx, dy.new_zeros(a1, a2) if need_a else dy.new_empty(0),
                dy.new_zeros(b1, b2) if need_b else dy.new_empty(0))
    dy, x = int32_rows(dy), int32_rows(x)
    precision = dot_precision(dy.dtype)
    # A persistent grid: about two programs per SM, each holding its rows' dA and dB.
    groups = max(1, min(m, num_programs_cap(dy.device) // 2))
    da_partial = new_partials(groups, a1, a2, dy.device) if need_a else None
    db_partial = new_partials(groups, b1, b2, dy.device) if need_b else None
    for flags in launches(a1, a2, b1, b2, dy.element_size(), precision, need_x, need_a, need_b):
        wrap_triton(tuned)[(groups,)](
            dy, x, a, b, dx if need_x else dy, da_partial if need_a else dy,
            db_partial if need_b else dy,
            m, a1, a2, b1, b2,
            *dy.stride(), *x.stride(), *a.stride(), *b.stride(),
            dx.stride(0) if need_x else 0, da_partial.stride(0) if need_a else 0,
            db_partial.stride(0) if need_b else 0,
            float(scale), **flags, **tile_shape(a1, a2, b1, b2, precision))
    return (dx, finish(da_partial, scale, dy.dtype) if need_a else dy.new_empty(0),
            finish(db_partial, scale, dy.dtype) if need_b else dy.new_empty(0))


def triton_kron_rows_grads(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                           b: torch.Tensor, scale: float, need_x: bool, need_a: bool,
                           need_b: bool, inner: torch.Tensor | None = None):
    """CUDA kernel of ``kronops::kron_rows_grads``: one pass over x and dY where the factors
    fit it (``dispatch.one_pass_backward``), else the dX, dA and dB kernels. ``inner`` is not
    used: both recompute X Bᵀ on chip. Shapes as ``triton_kron_rows_grads_one_pass``."""
    if dispatch.one_pass_backward(fits(*a.shape, *b.shape, dy.dtype)):
        return triton_kron_rows_grads_one_pass(dy, x, a, b, scale, need_x, need_a, need_b)
    dx = launch_kron_rows(dy, a.mT, b.mT, None, scale) if need_x else dy.new_empty(0)
    da = triton_kron_factor_grad(dy, b, x, scale) if need_a else dy.new_empty(0)
    db = triton_kron_factor_grad(dy.mT, a, x.mT, scale) if need_b else dy.new_empty(0)
    return dx, da, db
