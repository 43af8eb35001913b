"""The S²FT ops: ``sparse_linear`` and the in-place ``sparse_adamw``, and the custom ops under them.

``kronops::sparse_linear``      x (M, in) -> (M, out): x Wᵀ + b, Δ added into rows R or cols C
``kronops::sparse_input_grad``  dX (M, in) for dY (M, out)
``kronops::sparse_delta_grad``  dΔ in dY's dtype: rows dY[:, R]ᵀ X, cols dYᵀ X[:, C] (X[:, C] given)
``kronops::sparse_merged_weight``  W' (out, in): W with Δ added into rows R or cols C (a new
                                tensor; what ``sparse_linear``'s merged route multiplies by)
``kronops::sparse_adamw``       AdamW on W[R] or W[:, C] in place (mutates weight, moments and
                                the optional fp32 master values)

An index is an int64 tensor, or ``None`` and ``start`` for a contiguous range as long as
Δ's side; ``cols`` picks the mode. Each op is declared once: its default kernel is the
PyTorch kernel (``torch_kernels``) on every device; on CUDA an index tensor's Δ
products run the gathered Triton kernels (the dense x Wᵀ and dY W stay torch matmuls), a
range's forward and dX run the PyTorch kernel (the dense GEMM and the Δ GEMM on slices, all
cuBLAS) and its dΔ the Triton kernel; on CPU the native kernels when built
(``kronops.native``; the op table: the ``OpSpec`` below). Gradients go to x, delta and
bias, never to weight: the linear ops make no (out, in) gradient or copy of W (the one op
that builds a copy is ``sparse_merged_weight``, for ``sparse_linear``'s merged route), and
cols mode saves only X[:, C] (not X) for backward, in a buffer with aligned rows
(``aligned_empty``). The three linear ops are twice differentiable, except that cols mode
raises on a double backward that needs d(dΔ)/dx (X[:, C] is saved detached).

The ops are public once registered (``torch.ops.kronops.*``): every kernel first checks its
arguments by the native kernels' rules (``check_*`` below, the same for the PyTorch and the
Triton kernels), so a bad call is refused before anything changes, with an error naming the
argument. Index values are read where they are on the host (CPU); on CUDA the Triton kernels
skip out-of-range positions instead of synchronising.
"""
import torch

from .. import backends
from ..backends import OpSpec
from ..checks import OpChecks, check_same, check_tensor
from ..dtypes import autocast_operands
from ..kernels import partial_sums
from ..kernels.s2ft import adamw, delta_grad, matmul_add
from ..kron.dispatch import sparse_merge_pays
from . import torch_kernels
from .torch_kernels import addmm_into, take
from .selection import Selection, check_sorted_unique


# Argument checks of the ops called directly, shared by the PyTorch and the Triton kernels:
# the native kernels' rules (csrc/s2ft.cpp), in the same order and words.

def check_selection(c: OpChecks, index, start: int, count: int, counted: str, size: int,
                    device: torch.device) -> None:
    """``index`` holds ``count`` positions in [0, size), or (None) the range [start,
    start + count) lies in [0, size]; ``counted`` names what fixes the count."""
    if index is not None:
        if index.numel() != count:
            raise c.value_error(f"index has {index.numel()} positions but {counted} {count}")
        c.index("index", index, size, device)
    elif start < 0 or start + count > size:
        raise c.value_error(f"the range [{start}, {start + count}) of index must lie in "
                            f"[0, {size}]")


def check_linear_args(c: OpChecks, name: str, t, width_dim: int, weight, delta, index, start,
                      cols) -> None:
    """x or dy (``name``: M x weight.shape[width_dim]), weight (out, in) and delta ((|R|, in)
    or (out, |C|)) against the mode, and the selection."""
    c.floating(name, t)
    c.like("weight", weight, t)
    c.like("delta", delta, t)
    for arg, value in ((name, t), ("weight", weight), ("delta", delta)):
        c.matrix(arg, value)
    (out, in_), width = weight.shape, weight.shape[width_dim]
    if t.shape[1] != width:
        raise c.value_error(f"{name} must have {width} columns for weight of shape "
                            f"{list(weight.shape)}, got {list(t.shape)}")
    if cols and delta.shape[0] != out:
        raise c.value_error(f"delta must have shape (out, |C|) with out = {out}, "
                            f"got {list(delta.shape)}")
    if not cols and delta.shape[1] != in_:
        raise c.value_error(f"delta must have shape (|R|, in) with in = {in_}, "
                            f"got {list(delta.shape)}")
    check_selection(c, index, start, delta.shape[1 if cols else 0], "delta has",
                    in_ if cols else out, t.device)


LINEAR = OpChecks("kronops::sparse_linear")
INPUT_GRAD = OpChecks("kronops::sparse_input_grad")
DELTA_GRAD = OpChecks("kronops::sparse_delta_grad")
MERGED_WEIGHT = OpChecks("kronops::sparse_merged_weight")
ADAMW = OpChecks("kronops::sparse_adamw")


def check_sparse_linear(x, weight, delta, index, start, bias, cols) -> None:
    check_linear_args(LINEAR, "x", x, 1, weight, delta, index, start, cols)
    if bias is not None:
        LINEAR.like("bias", bias, x)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise LINEAR.value_error(f"bias must have shape (out,) = ({weight.shape[0]},), "
                                     f"got {list(bias.shape)}")


def check_sparse_input_grad(dy, weight, delta, index, start, cols) -> None:
    check_linear_args(INPUT_GRAD, "dy", dy, 0, weight, delta, index, start, cols)


def check_sparse_merged_weight(weight, delta, index, start, cols) -> None:
    """The linear ops' checks, and an index strictly increasing where it is on the host (the
    native kernel writes each selected position once)."""
    check_linear_args(MERGED_WEIGHT, "weight", weight, 1, weight, delta, index, start, cols)
    if index is not None and index.device.type == "cpu":
        try:
            check_sorted_unique("index", index, weight.shape[1 if cols else 0])
        except ValueError as e:
            raise MERGED_WEIGHT.value_error(str(e)) from None


def check_sparse_delta_grad(dy, x, index, start, cols, rows_of_delta) -> None:
    c = DELTA_GRAD
    c.floating("dy", dy)
    c.like("x", x, dy)
    c.matrix("dy", dy)
    c.matrix("x", x)
    if x.shape[0] != dy.shape[0]:
        raise c.value_error(f"x and dy must have the same rows, got {list(x.shape)} and "
                            f"{list(dy.shape)}")
    if cols:  # x is X[:, C] itself: no selection
        return
    if rows_of_delta < 0:
        raise c.value_error(f"rows_of_delta must be >= 0, got {rows_of_delta}")
    check_selection(c, index, start, rows_of_delta, "rows_of_delta is", dy.shape[1], dy.device)


def check_sparse_adamw(weight, grad, exp_avg, exp_avg_sq, master, index, start, cols, lr, beta1,
                       beta2, eps, weight_decay, step) -> None:
    c = ADAMW
    c.floating("weight", weight)
    c.floating("grad", grad)
    c.on("grad", grad, weight.device)
    c.matrix("weight", weight)
    c.matrix("grad", grad)
    if exp_avg.dtype not in (torch.float32, torch.float64):
        raise c.type_error(f"exp_avg must be float32 or float64, got {exp_avg.dtype}")
    c.on("exp_avg", exp_avg, weight.device)
    c.like("exp_avg_sq", exp_avg_sq, exp_avg)
    if exp_avg.shape != grad.shape or exp_avg_sq.shape != grad.shape:
        raise c.value_error(f"exp_avg and exp_avg_sq must have grad's shape {list(grad.shape)}, "
                            f"got {list(exp_avg.shape)} and {list(exp_avg_sq.shape)}")
    if step < 1:
        raise c.value_error(f"step counts from 1, got {step}")
    dim = 1 if cols else 0
    if grad.shape[1 - dim] != weight.shape[1 - dim]:
        raise c.value_error(f"grad must have shape {'(out, |C|)' if cols else '(|R|, in)'} for "
                            f"weight of shape {list(weight.shape)}, got {list(grad.shape)}")
    check_selection(c, index, start, grad.shape[dim], "grad has", weight.shape[dim],
                    weight.device)
    if master is not None:
        c.like("master", master, exp_avg)
        if master.shape != grad.shape:
            raise c.value_error(f"master must have grad's shape {list(grad.shape)}, "
                                f"got {list(master.shape)}")


def save_linear_inputs(ctx, x, weight, delta, index, start, cols) -> None:
    """What backward needs of ``sparse_linear``'s inputs, by either route (the op, or
    ``kronops.s2ft.merged``; ``ctx.needs_input_grad`` in the op's argument order): x where dΔ
    is needed (cols mode: only X[:, C], as its own (M, |C|) tensor), W where dX is, Δ and
    the index."""
    need_x, _, need_delta = ctx.needs_input_grad[:3]
    saved_x = None
    if need_delta:
        saved_x = aligned_columns(x.detach(), index, start, delta.shape[1]) if cols else x
    ctx.save_for_backward(saved_x, weight if need_x else None, delta, index)
    ctx.start, ctx.cols = start, cols


def linear_grads(ctx, grad, input_grad):
    """The gradients of ``sparse_linear``'s inputs from what ``save_linear_inputs`` kept: dX =
    ``input_grad(dy, weight, delta, index, start, cols)`` (the route's), dΔ by
    ``sparse_delta_grad``, dbias = Σ dY."""
    saved_x, weight, delta, index = ctx.saved_tensors
    need_x, _, need_delta = ctx.needs_input_grad[:3]
    grad_x = grad_delta = grad_bias = None
    if need_x:
        grad_x = input_grad(grad, weight, delta, index, ctx.start, ctx.cols)
    if need_delta:
        if ctx.cols and need_x and torch.is_grad_enabled():
            raise RuntimeError("sparse_linear in cols mode saves X[:, C] detached from x, so it "
                               "has no double backward through delta's gradient to x; detach x "
                               "or use rows mode")
        grad_delta = sparse_delta_grad(grad, saved_x, index, ctx.start, ctx.cols, delta.shape[0])
    if ctx.needs_input_grad[5]:
        grad_bias = grad.sum(0)
    return grad_x, None, grad_delta, None, None, grad_bias, None


def _setup_context(ctx, inputs, output):
    x, weight, delta, index, start, bias, cols = inputs
    save_linear_inputs(ctx, x, weight, delta, index, start, cols)


def _backward(ctx, grad):
    return linear_grads(ctx, grad, sparse_input_grad)


def _input_grad_setup_context(ctx, inputs, output):
    dy, weight, delta, index, start, cols = inputs
    ctx.save_for_backward(dy, weight, delta, index)
    ctx.start, ctx.cols = start, cols


def _input_grad_backward(ctx, grad):
    """dX = dY W' (W' = W with Δ added in): gdY = g W'ᵀ is the forward op; gΔ a delta grad."""
    dy, weight, delta, index = ctx.saved_tensors
    grad_dy = grad_delta = None
    if ctx.needs_input_grad[0]:
        grad_dy = sparse_linear_op(grad, weight, delta, index, ctx.start, None, ctx.cols)
    if ctx.needs_input_grad[2]:
        # rows: gΔ = dY[:, R]ᵀ g;  cols: gΔ = dYᵀ g[:, C]
        other = take(grad, index, ctx.start, delta.shape[1]) if ctx.cols else grad
        grad_delta = sparse_delta_grad(dy, other, index, ctx.start, ctx.cols, delta.shape[0])
    return grad_dy, None, grad_delta, None, None, None


def _delta_grad_setup_context(ctx, inputs, output):
    dy, x, index, start, cols, rows_of_delta = inputs
    ctx.save_for_backward(dy, x, index)
    ctx.start, ctx.cols, ctx.rows_of_delta = start, cols, rows_of_delta


def _delta_grad_backward(ctx, grad):
    """G = dY[:, R]ᵀ X (rows) or dYᵀ X (cols): plain torch ops (second order is rare)."""
    dy, x, index = ctx.saved_tensors
    grad_dy = grad_x = None
    if ctx.needs_input_grad[0]:
        grad_dy = x @ grad.mT if ctx.cols else \
            addmm_into(dy.new_zeros(dy.shape), index, ctx.start, x, grad.mT)
    if ctx.needs_input_grad[1]:
        grad_x = (dy if ctx.cols else take(dy, index, ctx.start, ctx.rows_of_delta)) @ grad
    return grad_dy, grad_x, None, None, None, None


def _merged_weight_setup_context(ctx, inputs, output):
    weight, delta, index, start, cols = inputs
    ctx.save_for_backward(index)
    ctx.start, ctx.cols, ctx.count = start, cols, delta.shape[1 if cols else 0]


def _merged_weight_backward(ctx, grad):
    """dW = g; dΔ = g's selected rows (or columns)."""
    (index,) = ctx.saved_tensors
    dim = 1 if ctx.cols else 0
    grad_delta = None
    if ctx.needs_input_grad[1]:
        grad_delta = grad.narrow(dim, ctx.start, ctx.count) if index is None else \
            grad.index_select(dim, index)
    return grad if ctx.needs_input_grad[0] else None, grad_delta, None, None, None


def _linear_fake(x, weight, delta, index, start, bias, cols):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _input_grad_fake(dy, weight, delta, index, start, cols):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


def _delta_grad_fake(dy, x, index, start, cols, rows_of_delta):
    return dy.new_empty((dy.shape[1] if cols else rows_of_delta, x.shape[1]))


def _merged_weight_fake(weight, delta, index, start, cols):
    return torch.empty_like(weight)


def _adamw_fake(weight, grad, exp_avg, exp_avg_sq, master, index, start, cols, lr, beta1,
                beta2, eps, weight_decay, step):
    return None


MATMUL_ADD_CASES = (matmul_add.compile_cases,)

sparse_linear_op = backends.define(OpSpec(
    "kronops::sparse_linear(Tensor x, Tensor weight, Tensor delta, Tensor? index, SymInt start, Tensor? bias, bool cols) -> Tensor",
    torch_kernel=torch_kernels.sparse_linear, fake=_linear_fake,
    backward=_backward, setup_context=_setup_context,
    triton=matmul_add.triton_sparse_linear, compile_cases=MATMUL_ADD_CASES,
    check=check_sparse_linear))

sparse_input_grad = backends.define(OpSpec(
    "kronops::sparse_input_grad(Tensor dy, Tensor weight, Tensor delta, Tensor? index, SymInt start, bool cols) -> Tensor",
    torch_kernel=torch_kernels.sparse_input_grad, fake=_input_grad_fake,
    backward=_input_grad_backward, setup_context=_input_grad_setup_context,
    triton=matmul_add.triton_sparse_input_grad, compile_cases=MATMUL_ADD_CASES,
    check=check_sparse_input_grad))

sparse_delta_grad = backends.define(OpSpec(
    "kronops::sparse_delta_grad(Tensor dy, Tensor x, Tensor? index, SymInt start, bool cols, SymInt rows_of_delta) -> Tensor",
    torch_kernel=torch_kernels.sparse_delta_grad, fake=_delta_grad_fake,
    backward=_delta_grad_backward, setup_context=_delta_grad_setup_context,
    triton=delta_grad.triton_sparse_delta_grad,
    compile_cases=(delta_grad.compile_cases, partial_sums.compile_cases),
    check=check_sparse_delta_grad))

sparse_merged_weight = backends.define(OpSpec(
    "kronops::sparse_merged_weight(Tensor weight, Tensor delta, Tensor? index, SymInt start, bool cols) -> Tensor",
    torch_kernel=torch_kernels.sparse_merged_weight, fake=_merged_weight_fake,
    backward=_merged_weight_backward, setup_context=_merged_weight_setup_context,
    check=check_sparse_merged_weight))

sparse_adamw = backends.define(OpSpec(
    "kronops::sparse_adamw(Tensor(a0!) weight, Tensor grad, Tensor(a2!) exp_avg, Tensor(a3!) exp_avg_sq, Tensor(a4!)? master, Tensor? index, SymInt start, bool cols, float lr, float beta1, float beta2, float eps, float weight_decay, SymInt step) -> ()",
    torch_kernel=torch_kernels.sparse_adamw, fake=_adamw_fake,
    triton=adamw.triton_sparse_adamw, compile_cases=(adamw.compile_cases,),
    check=check_sparse_adamw, mutates=("weight", "exp_avg", "exp_avg_sq", "master")))


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor,
                  selection: Selection | None = None, *, rows=None, cols=None,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W', bias)`` where W' is ``weight`` with ``delta`` added into rows or cols.

    x: (..., in); weight: (out, in), treated as frozen (it never gets a gradient and is
    never written); bias: (out,) or None. Exactly one of:
      rows: R, output rows of W trained, delta (|R|, in):  y[..., R] += x Δᵀ
      cols: C, input columns of W trained, delta (out, |C|):  y += x[..., C] Δᵀ
      selection: a ``Selection`` of either side (checked when made: its index values are
        not read again here)
    R/C: a sorted, unique int64 tensor on weight's device (its values are checked on the
    host at every call), a slice/range (contiguous), or a ``Selection`` of that side.
    Returns (..., out) in x's dtype (the autocast dtype inside an autocast region, where,
    as with F.linear, all operands are cast to it). Differentiable in x, delta and bias; in
    cols mode only x[..., C] is saved for backward. From some number of rows of x on, for
    fp32 and fp64 (``dispatch.sparse_merge_pays``: CPU only, not under torch.compile) it
    runs as one GEMM on W with Δ added in, a temporary copy of W built in forward and again
    in backward (``kronops.s2ft.merged``), instead of the op's GEMM plus Δ products, which
    copy nothing of W.
    """
    return checked_sparse_linear(x, weight, delta, selection, rows=rows, cols=cols, bias=bias)


def checked_sparse_linear(x, weight, delta, selection=None, *, rows=None, cols=None, bias=None,
                          zero_delta: bool = False) -> torch.Tensor:
    """``sparse_linear``; ``zero_delta``: delta is zero by construction (``S2FTInPlaceLinear``'s
    expanded zero, its updates written into W), so the call is one GEMM on W itself, no W'
    built and no Δ product, in every dtype, on every device, compiled or not
    (``kronops.s2ft.merged``)."""
    check_tensor("x", x)
    check_tensor("weight", weight, dim=2)
    check_tensor("delta", delta, dim=2)
    if bias is not None:
        check_tensor("bias", bias, dim=1)
    # like F.linear under autocast: compute in the autocast dtype (this casts W too)
    x, weight, delta, bias = autocast_operands(x.device.type, x, weight, delta, bias)
    check_same("x", x, weight=weight, delta=delta, bias=bias)
    chosen = Selection.given(selection, rows, cols, weight_shape=weight.shape,
                             device=weight.device)
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dim in_features = {in_features} for weight of shape "
                         f"{tuple(weight.shape)}, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(f"bias must have length out_features = {out_features}, "
                         f"got {bias.shape[0]}")
    expected = chosen.part_shape(weight.shape)
    if tuple(delta.shape) != expected:
        raise ValueError(f"delta must have shape {expected} for {chosen.count} selected "
                         f"{chosen.side} of a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(delta.shape)}")
    index, start, is_cols = chosen.op_args
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if zero_delta or sparse_merge_pays(x.device.type, x2.shape[0], in_features, out_features,
                                       weight.dtype, chosen.count / chosen.size):
        from .merged import sparse_linear_merged  # merged.py builds on this module's ops
        y = sparse_linear_merged(x2, weight, delta, index, start, bias, is_cols, zero_delta)
    else:
        y = sparse_linear_op(x2, weight, delta, index, start, bias, is_cols)
    return y.view(*lead, out_features)


# Rows of the compact (·, |C|) buffers (Δ, the saved X[:, C]) start every ROW_ALIGN elements:
# 32 bytes or more apart (whole sectors, vector loads, cp.async and TMA need 16), and a row
# stride Triton's launcher marks divisible by 16, so the compiled loads can use it.
ROW_ALIGN = 16


def aligned_empty(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (rows, cols) view, row stride ``cols`` rounded up to ROW_ALIGN, of a
    buffer whose padding columns are zero."""
    width = -(-cols // ROW_ALIGN) * ROW_ALIGN
    buffer = torch.empty((rows, width), dtype=dtype, device=device)
    buffer[:, cols:].zero_()
    return buffer[:, :cols]


def is_aligned(t: torch.Tensor) -> bool:
    """Whether a 2-D ``t`` has unit column stride and rows ROW_ALIGN-aligned apart."""
    return t.stride(1) == 1 and t.stride(0) % ROW_ALIGN == 0


def aligned_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 2-D ``t`` in ``dtype`` with aligned rows: ``t`` itself when it already is, else a
    differentiable copy into ``aligned_empty``."""
    if t.dtype == dtype and is_aligned(t):
        return t
    return aligned_empty(*t.shape, dtype, t.device).copy_(t)


def aligned_columns(x: torch.Tensor, index: torch.Tensor | None, start: int,
                    count: int) -> torch.Tensor:
    """x[:, index] (or x[:, start:start+count]), x (M, *) 2-D, copied into an aligned
    (M, count) buffer (a gather into a strided ``out=`` takes a slow path on CPU)."""
    return aligned_empty(x.shape[0], count, x.dtype, x.device).copy_(take(x, index, start, count))
