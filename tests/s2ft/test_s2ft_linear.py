"""kronops.sparse_linear vs masked full fine-tuning; autograd, memory, opcheck, compile."""
import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, ON_GPU, rel_err
from s2ft_inputs import check_against_reference, inputs

from kronops.kron import dispatch
from kronops.s2ft.ops import sparse_linear

# (leading dims of x, out, in, selected count): odd, prime and tile-spanning shapes.
SHAPES = [((), 7, 5, 3), ((9,), 13, 11, 1), ((2, 5), 67, 33, 17), ((3, 7), 20, 70, 20),
          ((4, 3), 130, 9, 65)]


@pytest.mark.parametrize("lead,out,inp,count", SHAPES)
@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["tensor", "slice"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_composite_matches_reference(lead, out, inp, count, mode, kind, dtype):
    check_against_reference(*inputs(lead, out, inp, count, mode, kind, dtype), dtype)


@pytest.mark.parametrize("lead,out,inp,count", SHAPES)
@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["tensor", "range"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_matches_reference(lead, out, inp, count, mode, kind, dtype, triton_backend):
    check_against_reference(*inputs(lead, out, inp, count, mode, kind, dtype, KERNEL_DEVICE),
                            dtype)


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_strided_index_tensor(mode, triton_backend):
    """A sorted index that is a strided view (not contiguous) selects what it names."""
    x, weight, delta, bias, _ = inputs((5,), 13, 12, 4, mode, "tensor", torch.float32,
                                       KERNEL_DEVICE)
    sel = torch.arange(12, device=KERNEL_DEVICE)[::2][:4]
    assert not sel.is_contiguous()
    check_against_reference(x, weight, delta, bias, {mode: sel}, torch.float32)


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_zero_delta_is_the_base_layer(mode):
    x, weight, delta, bias, sel = inputs((3, 4), 12, 10, 4, mode, "tensor", torch.float32)
    y = sparse_linear(x, weight, torch.zeros_like(delta), bias=bias, **sel)
    assert torch.equal(y, torch.nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("backend", ["composite", "triton"])
def test_cols_mode_saves_only_selected_columns(backend, monkeypatch):
    """Bytes saved for backward: x[..., C] (M*|C|), never x, and never an (out, in) tensor."""
    monkeypatch.setenv("KRONOPS_BACKEND", backend)
    m, out, inp, count = 64, 48, 40, 5
    x = torch.randn(m, inp, device=KERNEL_DEVICE, requires_grad=True)
    weight = torch.randn(out, inp, device=KERNEL_DEVICE, requires_grad=True)
    delta = torch.randn(out, count, device=KERNEL_DEVICE, requires_grad=True)
    cols = torch.tensor([0, 3, 17, 18, 39], device=KERNEL_DEVICE)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sparse_linear(x.detach(), weight, delta, cols=cols)  # x frozen: only dΔ needed
    activations = [t for t in saved if t.data_ptr() not in (delta.data_ptr(), cols.data_ptr())]
    assert [tuple(t.shape) for t in activations] == [(m, count)]
    # X[:, C] alone, its rows padded to a multiple of 16 elements for aligned GPU loads
    assert activations[0].untyped_storage().nbytes() == m * 16 * 4
    assert not any(t.data_ptr() == weight.data_ptr() for t in saved)
    y.sum().backward()
    assert weight.grad is None and delta.grad.shape == (out, count)


def test_no_full_size_gradient_or_weight_copy():
    x, weight, delta, bias, sel = inputs((6,), 30, 20, 4, "rows", "tensor", torch.float32)
    weight.requires_grad_()
    sparse_linear(x, weight, delta, bias=bias, **sel).sum().backward()
    assert weight.grad is None
    assert x.grad.shape == x.shape and delta.grad.shape == delta.shape


@pytest.mark.parametrize("merge", [False, True], ids=["op", "merged weight"])
@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_gradcheck_float64(mode, merge):
    x, weight, delta, bias, sel = inputs((2, 3), 7, 6, 3, mode, "tensor", torch.float64)
    with dispatch.override(merge=merge):  # the op, or kronops/s2ft/merged.py
        assert torch.autograd.gradcheck(
            lambda x, d, b: sparse_linear(x, weight, d, bias=b, **sel), (x, delta, bias))
        second = (x, delta, bias) if mode == "rows" else (x.detach(), delta, bias)
        assert torch.autograd.gradgradcheck(
            lambda x, d, b: sparse_linear(x, weight, d, bias=b, **sel), second)


def test_cols_double_backward_to_x_raises():
    x, weight, delta, bias, sel = inputs((3,), 7, 6, 3, "cols", "tensor", torch.float64)
    y = sparse_linear(x, weight, delta, bias=bias, **sel)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.square().sum(), (x, delta), create_graph=True)


@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["tensor", "slice"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(mode, kind, requires_grad, backend_device):
    x, weight, delta, bias, sel = inputs((5,), 9, 8, 3, mode, kind, torch.float32, backend_device)
    sel = sel[mode]
    index, start = (sel, 0) if isinstance(sel, torch.Tensor) else (None, sel.start)
    x, delta, bias = (t.detach().requires_grad_(requires_grad) for t in (x, delta, bias))
    cols = mode == "cols"
    torch.library.opcheck(torch.ops.kronops.sparse_linear.default,
                          (x, weight, delta, index, start, bias, cols))
    dy = torch.randn(5, 9, device=backend_device)
    torch.library.opcheck(torch.ops.kronops.sparse_input_grad.default,
                          (dy, weight, delta, index, start, cols))
    saved = x[:, start:start + 3].contiguous() if cols and index is None else \
        (x.index_select(1, index) if cols else x)
    torch.library.opcheck(torch.ops.kronops.sparse_delta_grad.default,
                          (dy, saved.detach(), index, start, cols, delta.shape[0]))


@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("backend", ["aot_eager"] + (["inductor"] if ON_GPU else []))
def test_torch_compile_fullgraph(mode, backend):
    torch._dynamo.reset()
    device = KERNEL_DEVICE if backend == "inductor" else "cpu"
    x, weight, delta, bias, sel = inputs((4, 3), 11, 10, 4, mode, "tensor", torch.float32, device)

    def step(x, delta, bias):
        return (sparse_linear(x, weight, delta, bias=bias, **sel) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(x, delta, bias)
    grads = torch.autograd.grad(loss, (x, delta, bias))
    loss_ref = step(x, delta, bias)
    grads_ref = torch.autograd.grad(loss_ref, (x, delta, bias))
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    for g, r in zip(grads, grads_ref):
        assert rel_err(g, r) < 1e-5


def _bad(**change):
    args = dict(x=torch.randn(5, 8), weight=torch.randn(6, 8), delta=torch.randn(3, 8),
                rows=torch.tensor([0, 2, 5]), cols=None, bias=None)
    args.update(change)
    return args


BAD = [
    (_bad(rows=torch.tensor([2, 0, 5])), ValueError, "rows must be sorted and unique"),
    (_bad(rows=torch.tensor([0, 2, 2])), ValueError, "rows must be sorted and unique"),
    (_bad(rows=torch.tensor([0, 2, 6])), ValueError, r"rows must lie in \[0, 6\)"),
    (_bad(rows=torch.tensor([-1, 2, 5])), ValueError, r"rows must lie in \[0, 6\)"),
    (_bad(rows=torch.tensor([0.0, 2.0, 5.0])), TypeError, "rows must have dtype torch.int64"),
    (_bad(rows=torch.tensor([0, 2, 5], dtype=torch.int32)), TypeError, "rows must have dtype"),
    (_bad(rows=[0, 2, 5]), TypeError, "rows must be an int64 tensor, a slice or a range"),
    (_bad(rows=torch.tensor([[0, 2, 5]])), ValueError, "rows must be a non-empty 1-D"),
    (_bad(rows=torch.tensor([], dtype=torch.int64)), ValueError, "rows must be a non-empty"),
    (_bad(rows=slice(0, 6, 2)), ValueError, "rows must have step 1"),
    (_bad(rows=range(4, 7)), ValueError, "rows must satisfy 0 <= start < stop <= 6"),
    (_bad(rows=None), ValueError, "exactly one of rows and cols"),
    (_bad(cols=torch.tensor([1, 2, 3])), ValueError, "exactly one of rows and cols"),
    (_bad(delta=torch.randn(3, 7)), ValueError, r"delta must have shape \(3, 8\)"),
    (_bad(rows=None, cols=slice(2, 5)), ValueError, r"delta must have shape \(6, 3\)"),
    (_bad(rows=None, cols=torch.tensor([0, 9])), ValueError, r"cols must lie in \[0, 8\)"),
    (_bad(delta=torch.randn(3, 8).double()), TypeError, "delta has dtype torch.float64"),
    (_bad(x=torch.randn(5, 7)), ValueError, "x must have last dim in_features = 8"),
    (_bad(weight=torch.randn(48)), ValueError, "weight must be 2-D"),
    (_bad(bias=torch.randn(5)), ValueError, "bias must have length out_features = 6"),
    (_bad(x=torch.randn(5, 8).long()), TypeError, "x must be a floating-point"),
    (_bad(rows=torch.tensor([0, 2, 5], device="meta")), ValueError, "rows is on meta"),
]


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_meta_tensors(mode):
    """Shapes only, as for kron_linear: the index values are not read."""
    x, weight = torch.empty(4, 5, 16, device="meta"), torch.empty(8, 16, device="meta")
    sel = torch.empty(3, dtype=torch.int64, device="meta")
    delta = torch.empty((3, 16) if mode == "rows" else (8, 3), device="meta")
    y = sparse_linear(x, weight, delta, **{mode: sel})
    assert y.shape == (4, 5, 8) and y.device.type == "meta"


@pytest.mark.parametrize("args,error,match", BAD)
def test_bad_input(args, error, match):
    x, weight, delta = args.pop("x"), args.pop("weight"), args.pop("delta")
    with pytest.raises(error, match=match):
        sparse_linear(x, weight, delta, **args)
