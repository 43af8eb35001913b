"""The native CPU kernels beside the PyTorch (composite) kernels: every op against the
materialising references in fp32 and fp64, odd shapes, 3-D inputs, strided views, several
row blocks and threads, empty batches, bad indices and arguments refused; and the library's
loading rules (built means loaded; KRONOPS_NATIVE=0 runs the suite without it)."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close

import kronops
from kronops import native
from kronops.kron.ops import (kron_factor_grad, kron_mode, kron_rows, kron_rows_grads,
                              kron_rows_keep)
from kronops.kron.torch_kernels import b_first
from kronops.s2ft.ops import (sparse_adamw, sparse_delta_grad, sparse_input_grad, sparse_linear_op,
                              sparse_merged_weight)
from kronops.testing import naive_kron_linear, naive_sparse_linear

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = [torch.float64, torch.float32]


@pytest.fixture(params=["composite", "native"])
def backend(request):
    """Each CPU backend in turn: the PyTorch kernels, then the native ones (skipped, with the
    reason, only when the library is not built; test_built_library_is_loaded fails then)."""
    if request.param == "composite":
        with native.disabled():
            yield "composite"
        return
    if not native.available():
        pytest.skip(f"native library {native.load_error()}")
    assert native.active()
    yield "native"


def test_built_library_is_loaded():
    """After `python -m kronops.native build` (the README's test command runs it) the library
    is loaded: a build that does not load fails here rather than skipping the native tests."""
    if native.choice() == "0":
        pytest.skip("KRONOPS_NATIVE=0")
    if not os.path.exists(native.library_path()):
        pytest.skip(f"native library {native.load_error()}")
    assert native.available(), native.load_error()
    assert not kronops.backends.torch_kernel_serves(kron_rows, torch.empty(0))


# (leading dims of x, a shape, b shape): both contraction orders, odd and prime sizes,
# a column or row factor, and enough rows for several blocks and threads. The last three
# take the FMA kernel of the per-row products (repeated_gemm.cpp) where the CPU has it: a
# partial 6-row panel, and 16-, 8- and 1-column steps (27 = 16 + 8 + 3 columns of X Bᵀ,
# 10 = 8 + 2 columns of A X).
KRON_CASES = [((), (3, 5), (7, 11)), ((2, 5), (4, 6), (5, 3)), ((4, 3), (1, 7), (13, 1)),
              ((6,), (33, 2), (3, 19)), ((5,), (9, 2), (2, 9)), ((7,), (2, 9), (9, 2)),
              ((3, 41), (32, 32), (32, 32)), ((19,), (7, 3), (27, 30)), ((2, 9), (4, 20), (30, 10))]


def kron_inputs(lead, a_shape, b_shape, dtype):
    k = a_shape[1] * b_shape[1]
    x = torch.randn(*lead, k + 2, dtype=dtype)[..., 1:-1]  # rows that do not fold
    a, b = torch.randn(*a_shape, dtype=dtype), torch.randn(*b_shape, dtype=dtype)
    bias = torch.randn(a_shape[0] * b_shape[0], dtype=dtype)
    return [t.requires_grad_() for t in (x, a, b, bias)]


@pytest.mark.parametrize("lead,a_shape,b_shape", KRON_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kron_linear_matches_reference(lead, a_shape, b_shape, dtype, backend):
    leaves = kron_inputs(lead, a_shape, b_shape, dtype)
    y = kronops.kron_linear(*leaves, scale=0.7)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = naive_kron_linear(*ref_leaves, scale=0.7)
    product = naive_kron_linear(*ref_leaves[:3], scale=0.7)
    rows = product.numel() // product.shape[-1]
    assert_close(y, ref, dtype, "forward",
                 magnitude=(product.norm() + ref_leaves[3].norm() * rows ** 0.5).item())
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, r in zip(["x", "a", "b", "bias"], got, want):
        assert_close(g, r, dtype, f"grad {name}")


# (M, p, q, r) of kron_mode: y_m = f (p, q) @ x_m (q, r). 19 columns take the FMA kernel
# (16 + 3), 5 and 1 the BLAS calls; an empty batch.
MODE_CASES = [(6, 7, 3, 19), (300, 16, 16, 40), (4, 6, 9, 5), (3, 1, 3, 1), (0, 2, 2, 8)]


@pytest.mark.parametrize("shape", MODE_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kron_mode_matches_reference(shape, layout, dtype, backend):
    """One factor on one mode (kron_matmul's leading factors), forward and both gradients,
    for row-major x_m and for transposed views (the native kernel's BLAS path)."""
    m, p, q, r = shape
    x = torch.randn(m, q, r, dtype=dtype) if layout == "contiguous" else \
        torch.randn(m, r, q, dtype=dtype).mT
    f = torch.randn(p, q, dtype=dtype)
    leaves = [x.requires_grad_(), f.requires_grad_()]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y, ref = kron_mode(*leaves), torch.matmul(ref_leaves[1], ref_leaves[0])
    assert y.shape == (m, p, r) and y.dtype == dtype
    assert_close(y, ref, dtype, "forward")
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, w in zip("xf", got, want):
        assert_close(g, w, dtype, f"grad {name}")


def test_kron_mode_opcheck(backend):
    x, f = torch.randn(5, 4, 9), torch.randn(3, 4)
    torch.library.opcheck(torch.ops.kronops.kron_mode.default, (x, f.requires_grad_()))


# Row products over the native kernel's mode-major bound in fp32 and fp64 (32K multiply-adds),
# where its backward runs one GEMM a row when dX is wanted (mode-major blocks for dA and dB
# alone): X Bᵀ first, then A X first.
LARGE_ROW_CASES = [((5,), (40, 40), (40, 40)), ((5,), (24, 64), (64, 24))]


@pytest.mark.parametrize("lead,a_shape,b_shape", KRON_CASES[:6] + LARGE_ROW_CASES)
@pytest.mark.parametrize("wanted", ["x", "a", "b", "ab", "xab"])
def test_kron_rows_grads_each_subset_with_and_without_the_kept_intermediate(
        lead, a_shape, b_shape, wanted, backend):
    """The one backward op, called directly: every subset of gradients, with the
    intermediate the forward kept (X Bᵀ or A X, by the contraction order) and without."""
    x, a, b, _ = (t.detach() for t in kron_inputs(lead, a_shape, b_shape, torch.float64))
    (a1, a2), (b1, b2) = a.shape, b.shape
    x3 = x.reshape(-1, a2, b2)
    dy = torch.randn(x3.shape[0], a1, b1, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x3, a, b)]
    ref = torch.autograd.grad(naive_kron_linear(leaves[0].reshape(-1, a2 * b2), *leaves[1:],
                                                scale=1.3), leaves, dy.reshape(-1, a1 * b1))
    y, inner = kron_rows_keep(x3, a, b, None, 1.3)
    assert inner.shape == ((x3.shape[0], a2, b1) if b_first(a1, a2, b1, b2)
                           else (x3.shape[0], a1, b2))
    assert_close(y, naive_kron_linear(x3.reshape(-1, a2 * b2), a, b, scale=1.3), torch.float64, "y")
    need = ["x" in wanted, "a" in wanted, "b" in wanted]
    for kept in (None, inner):
        got = kron_rows_grads(dy, x3, a, b, 1.3, *need, kept)
        for name, n, g, r in zip("xab", need, got, ref):
            if n:
                assert_close(g, r, torch.float64, f"grad {name}, kept {kept is not None}")
            else:
                assert g.numel() == 0


# Small row products (the native backward copies blocks of rows mode-major): both
# contraction orders; one row, and 100 rows (with 2 threads: two chunks of 50 rows, each a
# block of 39 rows and one of 11 in fp32, 19-row blocks in fp64).
MODE_MAJOR_CASES = [((16, 24), (24, 16)), ((24, 16), (16, 24))]


@pytest.mark.parametrize("a_shape,b_shape", MODE_MAJOR_CASES)
@pytest.mark.parametrize("rows", [1, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_row_products_strided_and_reproducible(a_shape, b_shape, rows, dtype, backend):
    """x and dY as transposed views (unit stride across their rows' columns), factors as
    transposed views; the backward matches the reference and is bitwise reproducible."""
    (a1, a2), (b1, b2) = a_shape, b_shape
    assert b_first(a1, a2, b1, b2) == (a_shape == (24, 16))
    x = torch.randn(rows, b2, a2, dtype=dtype).mT                  # (rows, a2, b2)
    a, b = torch.randn(a2, a1, dtype=dtype).T, torch.randn(b2, b1, dtype=dtype).T
    dy = torch.randn(rows, b1, a1, dtype=dtype).mT                 # (rows, a1, b1)
    y = kron_rows(x, a, b, None, 0.6)
    ref_leaves = [t.double().requires_grad_() for t in (x, a, b)]
    ref = naive_kron_linear(ref_leaves[0].reshape(rows, -1), *ref_leaves[1:], scale=0.6)
    assert_close(y, ref, dtype, "y")
    want = torch.autograd.grad(ref, ref_leaves, dy.reshape(rows, -1).double())
    got = kron_rows_grads(dy, x, a, b, 0.6, True, True, True, None)
    for name, g, r in zip("xab", got, want):
        assert_close(g, r, dtype, f"grad {name}")
    again = kron_rows_grads(dy, x, a, b, 0.6, True, True, True, None)
    assert all(torch.equal(g, h) for g, h in zip(got, again))


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_operands(dtype, backend):
    """Row-matrices and factors given as transposed views (the double backward passes such
    views) take the transposed GEMM layouts, without copies, and give the same results."""
    x = torch.randn(6, 5, 4, dtype=dtype).mT           # (6, 4, 5), unit row stride
    a, b = torch.randn(4, 3, dtype=dtype).T, torch.randn(5, 2, dtype=dtype).T  # (3, 4), (2, 5)
    y = kron_rows(x, a, b, None, 0.5)
    ref = naive_kron_linear(x.reshape(6, 20).double(), a.double(), b.double(), scale=0.5)
    assert_close(y, ref, dtype, "y")
    dy = torch.randn(6, 2, 3, dtype=dtype).mT          # (6, 3, 2) transposed
    g = kron_factor_grad(dy, b, x, 0.5)
    want = 0.5 * torch.einsum("mpn,nq,mrq->pr", dy.double(), b.double(), x.double())
    assert_close(g, want, dtype, "factor grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kron_factor_grad_and_double_backward(dtype, backend):
    x, a, b, bias = kron_inputs((4, 3), (3, 4), (2, 5), dtype)
    dy = torch.randn(12, 3, 2, dtype=dtype)
    g = kron_factor_grad(dy, b.detach(), x.detach().reshape(12, 4, 5), 0.8)
    want = 0.8 * torch.einsum("mpn,nq,mrq->pr", dy.double(), b.detach().double(),
                              x.detach().reshape(12, 4, 5).double())
    assert_close(g, want, dtype, "factor grad")
    if dtype == torch.float64:
        small = kron_inputs((2,), (2, 3), (3, 2), dtype)
        assert torch.autograd.gradgradcheck(lambda *t: kronops.kron_linear(*t, scale=1.3), small)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_fp32(dtype, backend):
    x, a, b, bias = (t.detach() for t in kron_inputs((5, 3), (4, 6), (5, 3), torch.float32))
    y = kronops.kron_linear(x.to(dtype), a.to(dtype), b.to(dtype), bias.to(dtype))
    ref = naive_kron_linear(*(t.to(dtype).double() for t in (x, a, b, bias)))
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "forward")


def test_empty_batch(backend):
    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    x = torch.randn(0, 3, 15, requires_grad=True)
    y = kronops.kron_linear(x, a, b)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))
    w, delta = torch.randn(6, 8), torch.randn(3, 8, requires_grad=True)
    z = kronops.sparse_linear(torch.randn(0, 8), w, delta, rows=torch.tensor([0, 2, 5]))
    assert z.shape == (0, 6)
    z.sum().backward()
    assert torch.equal(delta.grad, torch.zeros_like(delta))


def test_composite_keeps_the_intermediate_native_does_not(backend):
    """Where the PyTorch kernels run, the forward keeps X Bᵀ (as autograd would) and the
    backward uses it; the native backward recomputes it per block in cache instead."""
    x, a, b, _ = kron_inputs((7,), (9, 2), (2, 9), torch.float32)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kronops.kron_linear(x, a, b)
    kept = (7, 2, 2) in shapes  # X Bᵀ: (M, a2, b1)
    assert kept == (backend == "composite")


# (leading dims of x, out, in, selected count): odd shapes; 1200 rows span several row
# blocks; 150 input columns give the delta gradient two column chunks.
# The last case gathers over 1M elements (4100 rows x 260): the blocked kernels that never
# copy the gathered operand; the others copy it (one GEMM).
SPARSE_CASES = [((), 7, 5, 3), ((2, 5), 67, 33, 17), ((4, 3), 130, 9, 65), ((1200,), 40, 150, 11),
                ((4100,), 300, 280, 260)]


def sparse_inputs(lead, out, inp, count, mode, kind, dtype):
    x = torch.randn(*lead, inp + 3, dtype=dtype)[..., 2:-1]  # a non-contiguous view
    weight = torch.randn(inp, out, dtype=dtype).T              # a transposed (out, in) view
    bias = torch.randn(out, dtype=dtype)
    size = out if mode == "rows" else inp
    count = min(count, size)
    if kind == "tensor":
        sel = torch.randperm(size)[:count].sort().values
    else:
        start = int(torch.randint(0, size - count + 1, ()))
        sel = slice(start, start + count)
    delta = torch.randn(*((count, inp) if mode == "rows" else (out, count)), dtype=dtype)
    return x.requires_grad_(), weight, delta.requires_grad_(), bias.requires_grad_(), {mode: sel}


@pytest.mark.parametrize("lead,out,inp,count", SPARSE_CASES)
@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["tensor", "slice"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
def test_sparse_linear_matches_reference(lead, out, inp, count, mode, kind, dtype, backend):
    x, weight, delta, bias, sel = sparse_inputs(lead, out, inp, count, mode, kind, dtype)
    y = kronops.sparse_linear(x, weight, delta, bias=bias, **sel)
    leaves = [x, delta, bias]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = naive_sparse_linear(ref_leaves[0], weight.double(), ref_leaves[1], bias=ref_leaves[2],
                              **sel)
    product = naive_sparse_linear(ref_leaves[0], weight.double(), ref_leaves[1], **sel)
    rows = max(1, product.numel() // product.shape[-1])
    assert_close(y, ref, dtype, "forward",
                 magnitude=(product.norm() + ref_leaves[2].norm() * rows ** 0.5).item())
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, r in zip(["x", "delta", "bias"], got, want):
        assert_close(g, r, dtype, f"grad {name}")


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_sparse_ops_half_precision(mode, backend):
    x, weight, delta, bias, sel = sparse_inputs((6,), 20, 12, 5, mode, "tensor", torch.float32)
    half = [t.detach().to(torch.bfloat16) for t in (x, weight, delta, bias)]
    y = kronops.sparse_linear(half[0], half[1], half[2], bias=half[3], **sel)
    ref = naive_sparse_linear(*(t.double() for t in half[:3]), bias=half[3].double(), **sel)
    assert y.dtype == torch.bfloat16
    assert_close(y, ref, torch.bfloat16, "forward")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sparse_columns_added_as_index_add_adds(dtype):
    """Where the native kernels add a product into selected columns (rows mode's y[:, R] +=
    x Δᵀ, cols mode's dX[:, C] += dY Δ) each element is summed and rounded once, as the
    PyTorch kernels' index_add_ does: bit-identical results, strided operands included."""
    if not native.available():
        pytest.skip(f"native library {native.load_error()}")
    x, weight, delta, bias, sel = sparse_inputs((37,), 40, 30, 9, "rows", "tensor", dtype)
    dy, weight_c, delta_c, _, sel_c = sparse_inputs((37,), 40, 30, 9, "cols", "tensor", dtype)
    dy = torch.randn(40, 37, dtype=dtype).T                       # (37, 40), column stride 37
    for fn, args in ((sparse_linear_op, (x.detach(), weight, delta.detach(), sel["rows"], 0,
                                         bias.detach(), False)),
                     (sparse_input_grad, (dy, weight_c, delta_c.detach(), sel_c["cols"], 0,
                                          True))):
        got = fn(*args)
        with native.disabled():
            want = fn(*args)
        assert torch.equal(got, want), fn


def test_sparse_delta_grad_in_bf16_is_rounded_once():
    """dΔ in bf16 sums over every token in fp32 (bf16 GEMMs accumulate in fp32) and rounds
    once: over 16384 tokens of positive values its relative error stays within bf16's
    rounding (2^-8) plus fp32 summation, where a sum kept in bf16 would be off by far more."""
    for backend_off in (False, True):
        dy = torch.rand(16384, 40).bfloat16()
        x = torch.rand(16384, 24).bfloat16()
        index = torch.tensor([1, 5, 6, 30])
        with native.disabled() if backend_off else contextlib.nullcontext():
            got = sparse_delta_grad(dy, x, index, 0, False, 4)
        want = dy[:, index].double().T @ x.double()
        assert ((got.double() - want).abs() / want).max() <= 2 ** -8 + 2 ** -12


@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_sparse_adamw_matches_torch_adamw(cols, gather, dtype, backend):
    """Three steps on a strided weight vs torch.optim.AdamW on the submatrix (fp32 master
    values for fp16); the rest of the weight is untouched."""
    shape, count, dim = (37, 29), 5, 1 if cols else 0
    weight = torch.randn(shape[1], shape[0], dtype=dtype).T
    index = torch.randperm(shape[dim])[:count].sort().values if gather else \
        torch.arange(3, 3 + count)
    original = weight.clone()
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    part = weight.index_select(dim, index).to(state_dtype).clone().requires_grad_()
    reference = torch.optim.AdamW([part], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    m, v = torch.zeros(part.shape, dtype=state_dtype), torch.zeros(part.shape, dtype=state_dtype)
    master = part.detach().clone() if dtype == torch.float16 else None
    for step in range(1, 4):
        grad = torch.randn(part.shape, dtype=dtype)
        part.grad = grad.to(state_dtype)
        reference.step()
        sparse_adamw(weight, grad, m, v, master, index if gather else None, 0 if gather else 3,
                     cols, 0.01, 0.8, 0.95, 1e-6, 0.1, step)
    assert_close(weight.index_select(dim, index), part, dtype, "weight")
    assert_close(m, reference.state[part]["exp_avg"], state_dtype, "exp_avg")
    assert_close(v, reference.state[part]["exp_avg_sq"], state_dtype, "exp_avg_sq")
    if master is not None:
        assert_close(master, part, torch.float32, "master")
    rest = torch.ones(shape[dim], dtype=torch.bool)
    rest[index] = False
    keep = rest.nonzero().flatten()
    assert torch.equal(weight.index_select(dim, keep), original.index_select(dim, keep))


def test_blocked_gathers_follow_column_strides():
    """Above 1M gathered elements the native kernels gather x[:, C] and dY[:, R] block by block
    into a buffer (no copy of the operand): from a transposed view (column stride M) and a
    sliced one (column stride 2), each gathering product against the fp64 reference."""
    if not native.available():
        pytest.skip(f"native library {native.load_error()}")
    m, count, other = 1040, 1024, 8  # 1040 * 1024 gathered elements: the blocked kernels
    width = count + 50
    index = torch.randperm(width)[:count].sort().values
    x_t = torch.randn(width, m, dtype=torch.float64).T  # (m, width), column stride m
    dy_sliced = torch.randn(m, 2 * width, dtype=torch.float64)[:, ::2]  # column stride 2
    # cols forward: y = x W^T + x[:, C] Δ^T, gathering from x (M, width)
    weight = torch.randn(other, width, dtype=torch.float64)
    delta = torch.randn(other, count, dtype=torch.float64)
    y = sparse_linear_op(x_t, weight, delta, index, 0, None, True)
    assert_close(y, x_t @ weight.T + x_t[:, index] @ delta.T, torch.float64, "x[:, C] Δᵀ")
    # rows dX = dY W + dY[:, R] Δ and dΔ = dY[:, R]ᵀ X, gathering from dY (M, width)
    weight = torch.randn(width, other, dtype=torch.float64)
    delta = torch.randn(count, other, dtype=torch.float64)
    x = torch.randn(m, other, dtype=torch.float64)
    for dy in (dy_sliced, x_t):
        dx = sparse_input_grad(dy, weight, delta, index, 0, False)
        assert_close(dx, dy @ weight + dy[:, index] @ delta, torch.float64, "dY[:, R] Δ")
        grad = sparse_delta_grad(dy, x, index, 0, False, count)
        assert_close(grad, dy[:, index].T @ x, torch.float64, "dY[:, R]ᵀ X")


def test_native_matches_composite_closely():
    """Both backends in fp64 agree to rounding: the native kernels compute the same sums."""
    if not native.available():
        pytest.skip(f"native library {native.load_error()}")
    x, a, b, bias = kron_inputs((3, 50), (6, 8), (7, 5), torch.float64)
    dy = torch.randn(3, 50, 42, dtype=torch.float64)
    got = torch.autograd.grad(kronops.kron_linear(x, a, b, bias, scale=0.3), (x, a, b, bias), dy)
    with native.disabled():
        want = torch.autograd.grad(kronops.kron_linear(x, a, b, bias, scale=0.3),
                                   (x, a, b, bias), dy)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float64, "native vs composite")


def test_native_refuses_bad_arguments():
    """Direct op calls (no Python checks in front): errors name the op and the argument."""
    if not native.available():
        pytest.skip(f"native library {native.load_error()}")
    x, a, b = torch.randn(4, 3, 5), torch.randn(2, 3), torch.randn(6, 5)
    with pytest.raises(TypeError, match="kronops::kron_rows: a has dtype Double"):
        kron_rows(x, a.double(), b, None, 1.0)
    with pytest.raises(ValueError, match=r"kronops::kron_rows: x must have shape \(M, a2, b2\)"):
        kron_rows(x[:, :2], a, b, None, 1.0)
    with pytest.raises(ValueError, match="kronops::kron_rows: bias must have shape"):
        kron_rows(x, a, b, torch.randn(5), 1.0)
    with pytest.raises(ValueError, match=r"kronops::kron_mode: x must have shape \(M, q, r\)"):
        kron_mode(x, torch.randn(2, 5))
    with pytest.raises(TypeError, match="kronops::kron_mode: f has dtype Double"):
        kron_mode(x, torch.randn(2, 3).double())
    with pytest.raises(TypeError, match="kronops::kron_mode: x must be a floating-point tensor"):
        kron_mode(x.long(), torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="kronops::kron_rows_grads: dy must have shape"):
        kron_rows_grads(torch.randn(4, 2, 5), x, a, b, 1.0, True, True, True)
    with pytest.raises(ValueError, match="kronops::kron_rows_grads: inner must have shape"):
        kron_rows_grads(torch.randn(4, 2, 6), x, a, b, 1.0, True, True, True, torch.randn(4, 3, 3))


# A mixed batch of 9 rows for 3 members: member 0 adapts rows 0, 4, 7 (a gather), member 1
# none, member 2 the consecutive rows 1-3 (a slice); rows 5, 6, 8 keep the base output.
ROUTED = dict(tokens=torch.tensor([0, 4, 7, 1, 2, 3]), offsets=[0, 3, 3, 6], starts=[-1, -1, 1])


def routed_call(op, y, x, *operands, **changes):
    route = {**ROUTED, **changes}
    op(y, x, *operands, route["tokens"], torch.empty(0, 4, dtype=torch.int64), route["offsets"],
       route["starts"], *route.get("tail", ()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_routed_ops_match_the_pytorch_kernels(dtype):
    """The serving ops' native kernels (csrc/serving.cpp) against their PyTorch kernels on
    the same batch: Kronecker members, S²FT members in both modes, a strided x."""
    if not native.available():
        pytest.skip(f"native library {native.load_error()}")
    from kronops.serving.ops import routed_kron_add, routed_sparse_add
    x = torch.randn(9, 14, dtype=dtype)[:, 1:13]  # strided rows
    a, b = torch.randn(3, 5, 3, dtype=dtype), torch.randn(3, 2, 4, dtype=dtype)
    width, widths = 4, [3, 0, 4]
    cases = [(routed_kron_add, 10, (a, b), ())]
    for cols in (False, True):
        out = 7
        values = torch.zeros(3 * width, out if cols else 12, dtype=dtype)  # zero padding
        index = torch.zeros(3 * width, dtype=torch.int64)
        for p, w in enumerate(widths):
            values[p * width:p * width + w] = torch.randn(w, values.shape[1], dtype=dtype)
            index[p * width:p * width + w] = torch.randperm(12 if cols else out)[:w].sort().values
        cases.append((routed_sparse_add, out, (values, index), (widths, cols)))
    for op, out, operands, tail in cases:
        y = torch.randn(9, out, dtype=dtype)
        with native.disabled():
            expected = y.clone()
            routed_call(op, expected, x, *operands, tail=tail)
        routed_call(op, y, x, *operands, tail=tail)
        assert_close(y, expected, dtype, op._qualname)
        assert torch.equal(y[[5, 6, 8]], expected[[5, 6, 8]])


@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("kind", ["tensor", "range"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_sparse_merged_weight_matches_the_pytorch_kernel(cols, kind, dtype):
    """The native W' build (csrc/s2ft.cpp) is the PyTorch kernel's bit for bit (each selected
    element summed in the op math type, rounded once), for a transposed W (kept transposed)
    and a strided Δ; W itself is left as it was."""
    if not native.available():
        pytest.skip(f"native library {native.load_error()}")
    weight = torch.randn(19, 23).to(dtype).mT  # (out, in) = (23, 19), not contiguous
    count, size = 5, 19 if cols else 23
    index = torch.tensor([1, 4, 9, 10, 17]) if kind == "tensor" else None
    shape = (23, count) if cols else (count, 19)
    delta = torch.randn(shape[0], 2 * shape[1]).to(dtype)[:, ::2]
    before = weight.clone()
    merged = sparse_merged_weight(weight, delta, index, 7, cols)
    with native.disabled():
        expected = sparse_merged_weight(weight, delta, index, 7, cols)
    assert merged.stride() == weight.stride() and torch.equal(merged, expected)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("op", ["kron_rows_keep", "kron_rows_grads", "sparse_merged_weight"])
def test_opcheck_new_ops(op, backend):
    if op == "sparse_merged_weight":
        weight = torch.randn(6, 9, requires_grad=True)
        delta = torch.randn(6, 3, requires_grad=True)
        torch.library.opcheck(torch.ops.kronops.sparse_merged_weight.default,
                              (weight, delta, torch.tensor([1, 4, 8]), 0, True))
        torch.library.opcheck(torch.ops.kronops.sparse_merged_weight.default,
                              (weight, torch.randn(3, 18)[:, ::2], None, 2, False))
        return
    x, a, b = torch.randn(5, 4, 3), torch.randn(2, 4), torch.randn(6, 3)
    if op == "kron_rows_keep":
        torch.library.opcheck(torch.ops.kronops.kron_rows_keep.default,
                              (x, a.requires_grad_(), b, None, 0.5))
        return
    y, inner = kron_rows_keep(x, a.detach(), b, None, 0.5)
    dy = torch.randn(5, 2, 6)
    torch.library.opcheck(torch.ops.kronops.kron_rows_grads.default,
                          (dy, x, a.detach(), b, 0.5, True, True, True, inner))


def test_suite_without_the_native_library():
    """KRONOPS_NATIVE=0: the op test files pass on the PyTorch kernels alone (what a pure
    Python install runs), and the package says why the library is not loaded."""
    env = {**os.environ, "KRONOPS_NATIVE": "0"}
    probe = subprocess.run([sys.executable, "-c", "import kronops.native as n, kronops; "
                            "print(n.available(), n.load_error())"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "False turned off by KRONOPS_NATIVE=0"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                          "not triton", "tests/kron/test_kron_linear.py",
                          "tests/s2ft/test_s2ft_linear.py", "tests/s2ft/test_s2ft_adamw.py",
                          "tests/kernels/test_index_safety.py", "tests/serving/test_serving_ops.py"],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_bad_choice_is_refused():
    run = subprocess.run([sys.executable, "-c", "import kronops"],
                         env={**os.environ, "KRONOPS_NATIVE": "yes"}, capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode != 0 and "KRONOPS_NATIVE must be one of" in run.stderr
