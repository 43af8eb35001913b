"""S²FT storage and ranges: compact buffers with aligned rows at odd widths (|C| = 205), the
range (co-permuted) path of forward and dX on dense GEMMs, and the range dΔ kernel reading
whole 16-column blocks, each against the fp64 references."""
import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, assert_close
from s2ft_inputs import check_against_reference, inputs

from kronops.kernels.s2ft.delta_grad import launch_sparse_delta_grad, readable_width
from kronops.s2ft import S2FTLinear
from kronops.s2ft.ops import ROW_ALIGN, aligned_as, aligned_columns, aligned_empty, sparse_linear
from kronops.testing import naive_sparse_linear

ODD = 205  # 5% of 4096: rows of 410 bytes in bf16 unless padded


def aligned_rows(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(0) % ROW_ALIGN == 0 and t.stride(0) >= t.shape[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_aligned_buffers(dtype):
    buf = aligned_empty(3, ODD, dtype, "cpu")
    assert buf.shape == (3, ODD) and buf.stride() == (208, 1)
    assert torch.equal(buf.as_strided((3, 3), (208, 1), buf.storage_offset() + ODD),
                       torch.zeros(3, 3, dtype=dtype))  # padding zeroed
    x = torch.randn(5, 300, dtype=torch.float64).to(dtype)
    index = torch.tensor([0, 7, 8, 299])
    assert torch.equal(aligned_columns(x, index, 0, 4), x[:, index])
    assert torch.equal(aligned_columns(x, None, 90, ODD), x[:, 90:90 + ODD])
    assert aligned_rows(aligned_columns(x, index, 0, 4))
    same = aligned_empty(4, 32, dtype, "cpu")
    assert aligned_as(same, dtype) is same  # aligned already: no copy
    cast = aligned_as(x[:, :ODD], torch.float64)
    assert aligned_rows(cast) and torch.equal(cast, x[:, :ODD].double())


@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["tensor", "range"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_odd_width_against_reference(mode, kind, dtype, backend_device):
    """205 selected rows or columns, 3-D non-contiguous x, both backends."""
    out, inp = (230, 37) if mode == "rows" else (37, 230)
    check_against_reference(*inputs((2, 7), out, inp, ODD, mode, kind, dtype, backend_device),
                            dtype)


@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("contiguous", [False, True])
def test_layer_passes_aligned_compact_buffers(mode, contiguous, backend_device):
    """The layer's Δ parameter stays contiguous (FSDP takes no other); the Δ forward casts
    and saves, and the saved X[:, C], have rows 16 elements apart at the user's width; the
    layer matches the materialised W' in forward and dΔ."""
    torch.manual_seed(0)
    out, inp = (230, 37) if mode == "rows" else (37, 230)
    base = torch.nn.Linear(inp, out, device=backend_device)
    sel = range(11, 11 + ODD) if contiguous else \
        torch.randperm(out if mode == "rows" else inp, device=backend_device)[:ODD].sort().values
    layer = S2FTLinear(base, **{mode: sel}, delta_dtype=torch.float64)
    shape = (ODD, inp) if mode == "rows" else (out, ODD)
    assert layer.delta.shape == shape and layer.delta.is_contiguous()
    with torch.no_grad():
        layer.delta.copy_(torch.randn(shape, dtype=torch.float64))
    saved = []
    x = torch.randn(3, 5, inp, device=backend_device)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    deltas = [t for t in saved if t.shape == shape and t.dtype == torch.float32]
    assert len(deltas) == 1 and aligned_rows(deltas[0])
    if mode == "cols":
        activations = [t for t in saved if t.shape == (15, ODD)]
        assert len(activations) == 1 and aligned_rows(activations[0])
    grad = torch.randn_like(y)
    y.backward(grad)
    index = layer.indices()
    ref_delta = layer.delta.detach().clone().requires_grad_()
    ref = naive_sparse_linear(x.double(), base.weight.double(), ref_delta,
                              bias=base.bias.double(), **{mode: index})
    ref.backward(grad.double())
    assert_close(y, ref, torch.float32, "forward")
    assert_close(layer.delta.grad, ref_delta.grad, torch.float32, "dΔ")


def test_readable_width():
    """A range reads whole 16-column blocks only where they lie inside the storage."""
    t = torch.randn(4, 300)
    assert readable_width(t, 11, ODD) == 208      # columns 11..218 of rows 300 wide
    assert readable_width(t, 95, ODD) == ODD      # the last row would end at column 302
    assert readable_width(t[:3], 95, ODD) == 208  # inside the storage (the next row's start)
    assert readable_width(t, 96, 204) == 204      # would end past the storage
    assert readable_width(t.T.contiguous().T, 0, 5) == 5  # columns not unit-stride
    assert readable_width(aligned_empty(6, ODD, torch.float16, "cpu"), 0, ODD) == 208


@pytest.mark.parametrize("start", [0, 11, 300 - 37])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_range_delta_grad(start, dtype):
    """dΔ on a range of 37 columns of dY (rows mode) or of the saved X[:, C] (cols mode),
    read 48 wide where the storage allows: the 37 asked for, contiguous."""
    d = torch.randn(70, 300, device=KERNEL_DEVICE, dtype=dtype)
    x = aligned_columns(torch.randn(70, 90, device=KERNEL_DEVICE, dtype=dtype), None, 4, 37)
    rows = launch_sparse_delta_grad(d, x, d_cols=start, p=37, q=37)
    cols = launch_sparse_delta_grad(x, d, p=37, x_cols=start, q=37)
    ref = d.double()[:, start:start + 37].T @ x.double()
    assert rows.shape == (37, 37) and rows.is_contiguous() and cols.is_contiguous()
    assert_close(rows, ref, dtype, "rows-mode dΔ")
    assert_close(cols, ref.T, dtype, "cols-mode dΔ")


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_range_products_keep_weight_and_inputs(mode, backend_device):
    """The range path writes only its output: weight, x and Δ are unchanged (the slices it
    accumulates into belong to the result)."""
    out, inp = 40, 50
    x = torch.randn(6, inp, device=backend_device)
    weight = torch.randn(out, inp, device=backend_device)
    delta = torch.randn((7, inp) if mode == "rows" else (out, 7), device=backend_device,
                        requires_grad=True)
    kept = [t.detach().clone() for t in (x, weight, delta)]
    y = sparse_linear(x.requires_grad_(), weight, delta, **{mode: range(20, 27)})
    y.backward(torch.ones_like(y))
    assert all(torch.equal(a, b.detach()) for a, b in zip(kept, (x, weight, delta)))
