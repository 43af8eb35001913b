"""Gathered GEMM with an indexed scatter-add: out[:, J] += a[:, I] @ b.T, in place.

The S²FT products, all through one kernel (I: columns of a read, J: columns of out written;
each is a sorted, unique index tensor or a contiguous range given by its start):
  rows forward  y[:, R] += x Δᵀ          (Δ: (|R|, in))
  cols forward  y += x[:, C] Δᵀ          (Δ: (out, |C|))
  rows dX       dX += dY[:, R] Δ         (b = Δᵀ, a strided view)
  cols dX       dX[:, C] += dY Δ         (b = Δᵀ)
The gather and the scatter are indexed loads and stores inside the GEMM: no index_select
copy of a or out is made. Indices are unique, so programs never write the same element.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...s2ft import torch_kernels

from ..launch import (ELEMENT_BYTES, PRECISIONS, TOKENS, CompileCase, autotuned,
                      dot_precision, tile_words, viable_configs)


@triton.jit
def gathered_positions(idx_ptr, start, offs, mask, size, GATHER: tl.constexpr):
    """(positions I[offs] as int64, ``mask`` narrowed to the valid ones).

    I = idx[offs] (masked loads) when GATHER, else start + offs. Positions outside [0, size)
    are masked out, so whatever values an index tensor or a range start holds (a compiled
    graph skips the host checks; the kernels are also called directly), no load or store
    leaves the tensor it indexes. The one gather-or-range rule of the S²FT kernels (idx
    contiguous, see index_or_start).
    """
    if GATHER:
        positions = tl.load(idx_ptr + offs, mask=mask, other=0).to(tl.int64)
    else:
        positions = (start + offs).to(tl.int64)
    return positions, mask & (positions >= 0) & (positions < size)


@triton.jit
def add_tile(out_ptr, rows, cols, rows_ok, cols_ok, stride_r, stride_c, acc):
    """out[rows, cols] += acc (an fp32 tile) in place, where rows_ok and cols_ok."""
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_r + cols[None, :] * stride_c
    mask = rows_ok[:, None] & cols_ok[None, :]
    acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sparse_matmul_add_kernel(
    a_ptr, b_ptr, out_ptr, a_idx_ptr, out_idx_ptr,
    M, N, K, a_start, out_start, a_size, out_size,
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_om, stride_on,
    GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """a: (M, a_size) with K columns read at I; b: (N, K); out: (M, out_size) with N columns
    at J.

    I[k] = a_idx[k] when GATHER_A else a_start + k; J[n] likewise. Any strides.
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), the output-column tile fastest: programs
    running together share a's row tile (read from DRAM once, then from L2) and sweep b,
    which is small. fp32 accumulation.
    """
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        cols, cols_ok = gathered_positions(a_idx_ptr, a_start, offs_k, k_ok, a_size, GATHER_A)
        a = tl.load(a_rows + cols[None, :] * stride_ak,
                    mask=m_ok[:, None] & cols_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                      mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b_t, acc, input_precision=DOT_PRECISION)

    out_cols, out_ok = gathered_positions(out_idx_ptr, out_start, offs_n, n_ok, out_size,
                                          SCATTER_OUT)
    add_tile(out_ptr, offs_m, out_cols, m_ok, out_ok, stride_om, stride_on, acc)


CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    for m, n, k, w, s in [(64, 64, 32, 4, 3), (64, 64, 64, 4, 4), (128, 64, 32, 8, 4),
                          (64, 128, 32, 8, 4), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3),
                          (64, 64, 32, 8, 3), (32, 32, 32, 4, 2)]
]


def footprint(config, constexprs, element_bytes) -> int:
    """Words live per program: the accumulator and the output tile the epilogue loads to
    add into (with both, 128x128 tiles spill on sm_80); for fp32 the a and b tiles."""
    m, n, k = (config.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return tile_words(m * n, (m + n) * k, m * n, element_bytes, constexprs["DOT_PRECISION"])


tuned = autotuned(sparse_matmul_add_kernel, CONFIGS,
                  key=["N", "K", "GATHER_A", "SCATTER_OUT"], footprint=footprint,
                  restore_value=["out_ptr"])


# The S²FT layer of a compiled launch: TOKENS rows through a 4096 x 4096 Linear, 256 rows
# selected (two 128-wide heads), or 205 columns (5%, not a multiple of 16: compact buffers
# of that width have rows 208 apart); a range starts at 512.
FEATURES, SELECTED_ROWS, SELECTED_COLS, RANGE_START = 4096, 256, 205, 512
SELECTED_COLS_STRIDE = 208


def compile_cases() -> list[CompileCase]:
    """The four gathered S²FT products (ranges run on cuBLAS): gathered a or scattered out,
    the other side all columns, with b = Δ (stride_bk = 1, forward) or Δᵀ (stride_bn = 1,
    dX); cols mode's Δ (out, |C|) with rows padded to 208 (``kronops.s2ft.ops.ROW_ALIGN``)."""
    f, r, c, padded = FEATURES, SELECTED_ROWS, SELECTED_COLS, SELECTED_COLS_STRIDE
    launches = [  # (GATHER_A, SCATTER_OUT, b's strides (bn, bk), N, K)
        (False, True, (f, 1), r, f),        # rows forward, indexed R: b = Δ (|R|, in)
        (True, False, (padded, 1), f, c),   # cols forward, indexed C: b = Δ (out, |C|)
        (True, False, (1, f), f, r),        # rows dX, indexed R: b = Δᵀ
        (False, True, (1, padded), c, f)]   # cols dX, indexed C: b = Δᵀ
    cases = []
    for element, precision in PRECISIONS:
        for gather, scatter, (stride_bn, stride_bk), n, k in launches:
            constexprs = dict(GATHER_A=gather, SCATTER_OUT=scatter, DOT_PRECISION=precision)
            ints = dict(M=TOKENS, N=n, K=k, a_start=0, out_start=0, a_size=f, out_size=f,
                        stride_am=f, stride_ak=1, stride_bn=stride_bn, stride_bk=stride_bk,
                        stride_om=f, stride_on=1)
            b_unit = "stride_bk" if stride_bk == 1 else "stride_bn"
            cases.append(CompileCase(
                f"sparse_matmul_add-gather{int(gather)}-scatter{int(scatter)}-{b_unit}-{element}-"
                f"{precision}", sparse_matmul_add_kernel, constexprs, element,
                viable_configs(CONFIGS, footprint, constexprs, ELEMENT_BYTES[element]),
                ints, {"a_idx_ptr": "*i64", "out_idx_ptr": "*i64"}))
    return cases


def selection(index: torch.Tensor | None, start: int):
    """What the launchers take for an op's selection: the index tensor, or a range's start."""
    return index if index is not None else start


def index_or_start(cols) -> tuple[torch.Tensor | None, int]:
    """(index tensor or None, start) for a gather/scatter given as a tensor or an int start.

    The kernels read index k at ``idx_ptr + k``: a strided index tensor is made contiguous.
    """
    return (cols.contiguous(), 0) if isinstance(cols, torch.Tensor) else (None, int(cols))


def triton_sparse_matmul_add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *,
                             a_cols=0, out_cols=0) -> torch.Tensor:
    """out[:, out_cols] += a[:, a_cols] @ b.T in place; returns out.

    out: (M, *), a: (M, *), b: (N, K), all one dtype and any strides. a_cols (the gather):
    an int64 (K,) index tensor or the int start of a contiguous range of K columns, by
    default a's first K; out_cols (the scatter): an (N,) index tensor or the start of N
    columns, by default out's first N. Indices must be unique and in range.
    """
    m = out.shape[0]
    n, k = b.shape
    if m == 0 or n == 0:
        return out
    a_idx, a_start = index_or_start(a_cols)
    out_idx, out_start = index_or_start(out_cols)
    constexprs = dict(GATHER_A=a_idx is not None, SCATTER_OUT=out_idx is not None,
                      DOT_PRECISION=dot_precision(a.dtype))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    wrap_triton(tuned)[grid](
        a, b, out, a_idx if a_idx is not None else out, out_idx if out_idx is not None else out,
        m, n, k, a_start, out_start, a.shape[1], out.shape[1],
        *a.stride(), *b.stride(), *out.stride(),
        **constexprs)
    return out


def triton_sparse_linear(x, weight, delta, index, start, bias, cols):
    """CUDA kernel of ``kronops::sparse_linear``: for an index tensor cuBLAS x Wᵀ + b, then the
    gathered Δ product added; a range runs the PyTorch kernel (cuBLAS: the dense GEMM and the
    Δ GEMM on slices)."""
    if index is None:
        return torch_kernels.sparse_linear(x, weight, delta, index, start, bias, cols)
    y = F.linear(x, weight, bias)
    if cols:
        return triton_sparse_matmul_add(y, x, delta, a_cols=index)
    return triton_sparse_matmul_add(y, x, delta, out_cols=index)


def triton_sparse_input_grad(dy, weight, delta, index, start, cols):
    """CUDA kernel of ``kronops::sparse_input_grad``: as ``triton_sparse_linear``, a range on
    cuBLAS; an index tensor: cuBLAS dY W, then the gathered Δ product added."""
    if index is None:
        return torch_kernels.sparse_input_grad(dy, weight, delta, index, start, cols)
    dx = dy @ weight
    if cols:
        return triton_sparse_matmul_add(dx, dy, delta.mT, out_cols=index)
    return triton_sparse_matmul_add(dx, dy, delta.mT, a_cols=index)
