"""Fused AdamW on the selected rows or columns of a weight, in place.

For the submatrix S = W[R] (rows) or W[:, C] (cols) of shape (P, Q), with its gradient G
and fp32 moments m, v of S's shape, one pass updates (torch.optim.AdamW's arithmetic):
  S *= 1 - lr*wd;  m = b1 m + (1-b1) G;  v = b2 v + (1-b2) G²;
  S -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
The rows/columns of W are reached by indexed loads and stores: no copy of S or W.
"""
import itertools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..launch import ELEMENT_BYTES, CompileCase, autotuned, live_words, viable_configs
from .matmul_add import (FEATURES, RANGE_START, SELECTED_COLS, SELECTED_ROWS,
                         gathered_positions, index_or_start, selection)


@triton.jit
def sparse_adamw_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, master_ptr, idx_ptr,
    P, Q, start, size,
    stride_wr, stride_wc,
    stride_gp, stride_gq,
    lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
    COLS: tl.constexpr, GATHER: tl.constexpr, HAS_MASTER: tl.constexpr, BLOCK: tl.constexpr,
):
    """w: (out, in) any strides; g: (P, Q) any strides; m, v (and master): (P, Q) contiguous fp32.

    Element (p, q) of S is w[I[p], q] (rows) or w[p, I[q]] (COLS), I[k] = idx[k] when
    GATHER else start + k; ``size`` is w's row (column) count. With HAS_MASTER the step starts from the fp32 master values,
    which it updates, and w receives them rounded. Grid: (cdiv(P*Q, BLOCK),).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < P * Q
    p = offs // Q
    q = offs % Q
    if COLS:
        sel = q
    else:
        sel = p
    sel, w_ok = gathered_positions(idx_ptr, start, sel, ok, size, GATHER)
    if COLS:
        w_ptrs = w_ptr + p * stride_wr + sel * stride_wc
    else:
        w_ptrs = w_ptr + sel * stride_wr + q * stride_wc
    if HAS_MASTER:
        w = tl.load(master_ptr + offs, mask=ok, other=0.0)
    else:
        w = tl.load(w_ptrs, mask=w_ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + p * stride_gp + q * stride_gq, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + offs, mask=ok, other=0.0)
    w = w * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    w = w - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    if HAS_MASTER:
        tl.store(master_ptr + offs, w, mask=ok)
    tl.store(w_ptrs, w.to(w_ptr.dtype.element_ty), mask=w_ok)


CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in [(1024, 4), (2048, 8), (512, 4)]]


def footprint(config, constexprs, element_bytes) -> int:
    """Words live per program: w, g, m, v and their addresses, per element."""
    return live_words(7 * config.kwargs["BLOCK"], 0, element_bytes, "tf32")


tuned = autotuned(sparse_adamw_kernel, CONFIGS, key=["P", "Q", "COLS", "GATHER"],
                  footprint=footprint, restore_value=["w_ptr", "m_ptr", "v_ptr", "master_ptr"])


def compile_cases() -> list[CompileCase]:
    """Rows and columns, gathered and ranged, per weight dtype, with fp32 master values for
    fp16/bf16 weights (no dot), on the layer of ``matmul_add.compile_cases``."""
    cases = []
    for element, cols, gather in itertools.product(sorted(ELEMENT_BYTES), [False, True],
                                                   [False, True]):
        constexprs = dict(COLS=cols, GATHER=gather, HAS_MASTER=element != "fp32")
        p, q = (FEATURES, SELECTED_COLS) if cols else (SELECTED_ROWS, FEATURES)
        ints = dict(P=p, Q=q, start=0 if gather else RANGE_START, size=FEATURES,
                    stride_wr=FEATURES, stride_wc=1, stride_gp=q, stride_gq=1)
        cases.append(CompileCase(
            f"sparse_adamw-cols{int(cols)}-gather{int(gather)}-{element}-nodot",
            sparse_adamw_kernel, constexprs, element,
            viable_configs(CONFIGS, footprint, constexprs, ELEMENT_BYTES[element]), ints,
            {"m_ptr": "*fp32", "v_ptr": "*fp32", "master_ptr": "*fp32", "idx_ptr": "*i64"}))
    return cases


def triton_sparse_adamw(weight, grad, exp_avg, exp_avg_sq, master, index, start, cols, lr,
                        beta1, beta2, eps, weight_decay, step) -> None:
    """CUDA kernel of ``kronops::sparse_adamw``: one fused pass over the selected submatrix
    (``launch_sparse_adamw``, on contiguous state: strided moments or master values are
    updated through a copy)."""
    state = [t if t is None or t.is_contiguous() else t.contiguous()
             for t in (exp_avg, exp_avg_sq, master)]
    launch_sparse_adamw(weight, grad, *state, selection(index, start), cols, lr=lr,
                        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    for given, used in zip((exp_avg, exp_avg_sq, master), state):
        if used is not given:
            given.copy_(used)


def launch_sparse_adamw(weight: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                        exp_avg_sq: torch.Tensor, master: torch.Tensor | None, selected,
                        cols: bool, *, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, step: int) -> None:
    """One AdamW step on weight[selected] (rows) or weight[:, selected] (cols), in place.

    weight: (out, in); grad: (P, Q), the submatrix's gradient, any strides; exp_avg,
    exp_avg_sq and master (or None): contiguous fp32 (P, Q), updated in place; with a
    master the step runs on it and the weight gets it rounded. selected: an int64 index
    tensor or the int start of a contiguous range. step: the step number, from 1.
    """
    p, q = grad.shape
    if p * q == 0:
        return
    idx, start = index_or_start(selected)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step

    def grid(meta):
        return (triton.cdiv(p * q, meta["BLOCK"]),)

    wrap_triton(tuned)[grid](
        weight, grad, exp_avg, exp_avg_sq, master if master is not None else exp_avg,
        idx if idx is not None else exp_avg,
        p, q, start, weight.shape[1] if cols else weight.shape[0], *weight.stride(),
        *grad.stride(),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
        float(lr / bias_correction1), float(bias_correction2 ** 0.5),
        COLS=cols, GATHER=idx is not None, HAS_MASTER=master is not None)
