"""Deterministic split-M reductions: per-group fp32 partials, summed in a fixed order.

The factor-gradient and delta-gradient kernels reduce over M rows. Each of ``groups``
programs along grid axis 0 sums a fixed, strided set of row blocks into its own fp32
(P, Q) partial; ``finish`` adds the partials in group order 0, 1, ..., scales and casts,
in one launch. No atomics: the result does not depend on scheduling.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .launch import ELEMENT_BYTES, CompileCase, num_programs_cap


def row_groups(m: int, out_tiles: int, rows_per_group: int, device: torch.device) -> int:
    """How many groups split M rows: enough that groups x output tiles fill the GPU, with
    at least ``rows_per_group`` rows each (so a partial is not mostly overhead)."""
    return max(1, min(triton.cdiv(m, rows_per_group),
                      triton.cdiv(num_programs_cap(device), out_tiles)))


def new_partials(groups: int, p: int, q: int, device: torch.device) -> torch.Tensor:
    """An uninitialised (groups, p, q) fp32 buffer; every program writes its whole tile.

    The kernels and ``finish`` take any strides with a unit last stride (the tests pass
    views into guarded buffers)."""
    return torch.empty((groups, p, q), device=device, dtype=torch.float32)


@triton.jit
def finish_kernel(partial_ptr, out_ptr, G, P, Q, stride_pg, stride_pp, scale,
                  BLOCK: tl.constexpr):
    """partial: (G, P, Q) fp32, unit last stride; out: (P, Q) contiguous.

    out[p, q] = scale * (partial[0, p, q] + ... + partial[G-1, p, q]). Grid: (cdiv(P*Q, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P * Q
    ptrs = partial_ptr + (offs // Q) * stride_pp + offs % Q
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for g in range(0, G):
        acc += tl.load(ptrs + g * stride_pg, mask=ok, other=0.0)
    tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)


FINISH_BLOCK = 1024


def compile_cases() -> list[CompileCase]:
    """The reduction, per output dtype, of 64 groups of a 64x64 factor gradient."""
    groups, p, q = 64, 64, 64
    ints = dict(G=groups, P=p, Q=q, stride_pg=p * q, stride_pp=q)
    return [CompileCase(f"finish-{element}-nodot", finish_kernel, dict(BLOCK=FINISH_BLOCK), element,
                        [triton.Config({})], ints, pointer_types={"partial_ptr": "*fp32"})
            for element in sorted(ELEMENT_BYTES)]


def finish(partial: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * partial.sum(0)`` as a new (P, Q) tensor of ``dtype``: one launch, fixed order."""
    groups, p, q = partial.shape
    out = torch.empty((p, q), device=partial.device, dtype=dtype)
    if out.numel():
        wrap_triton(finish_kernel)[(triton.cdiv(p * q, FINISH_BLOCK),)](
            partial, out, groups, p, q, partial.stride(0), partial.stride(1), float(scale),
            BLOCK=FINISH_BLOCK)
    return out
