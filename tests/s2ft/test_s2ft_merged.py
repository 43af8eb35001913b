"""sparse_linear's merged-weight route (kronops/s2ft/merged.py) against the reference, and the
rule that picks it (``dispatch.sparse_merge_pays``); its gradcheck: test_s2ft_linear.py."""
import contextlib

import pytest
import torch
from conftest import rel_err
from s2ft_inputs import check_against_reference, inputs
from test_s2ft_linear import SHAPES

from kronops import native
from kronops.kron import dispatch
from kronops.s2ft import S2FTInPlaceLinear
from kronops.s2ft.ops import sparse_linear, sparse_merged_weight
from kronops.testing import naive_sparse_linear



def merged():
    """The merged route pinned on (the tests run with it pinned off: conftest.py)."""
    return dispatch.override(merge=True)


def route(y: torch.Tensor) -> str:
    """The autograd node under sparse_linear's final view of its (M, out) result."""
    return type(y.grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("lead,out,inp,count", SHAPES)
@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["tensor", "slice"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merged_matches_reference(lead, out, inp, count, mode, kind, dtype):
    with merged():
        check_against_reference(*inputs(lead, out, inp, count, mode, kind, dtype), dtype)


@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["tensor", "slice"])
def test_merged_leaves_weight_as_it_was(mode, kind):
    """W' is a new tensor: the frozen weight is neither written nor given a gradient."""
    x, weight, delta, bias, sel = inputs((4, 5), 12, 10, 4, mode, kind, torch.float32)
    weight.requires_grad_()
    before = weight.detach().clone()
    with merged():
        y = sparse_linear(x, weight, delta, bias=bias, **sel)
        assert route(y) == "_MergedSparseLinearBackward"
        y.square().sum().backward()
    assert torch.equal(weight.detach(), before) and weight.grad is None
    assert x.grad.shape == x.shape and delta.grad.shape == delta.shape


def test_merged_cols_saves_only_selected_columns_and_refuses_double_backward_to_x():
    m, out, inp = 64, 48, 40
    x = torch.randn(m, inp, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out, inp, dtype=torch.float64)
    delta = torch.randn(out, 5, dtype=torch.float64, requires_grad=True)
    cols = torch.tensor([0, 3, 17, 18, 39])
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with merged(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sparse_linear(x, weight, delta, cols=cols)
    activations = [t for t in saved if t.shape[0] == m]
    assert [tuple(t.shape) for t in activations] == [(m, 5)]
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.square().sum(), (x, delta), create_graph=True)


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_in_place_layer_is_the_frozen_layer_plus_delta_grad(mode, monkeypatch):
    """S2FTInPlaceLinear's ``selected`` is zero by construction: its forward and dX are the
    frozen layer's GEMMs on W itself (no W' built, no Δ product), in every dtype, giving the
    op's results on a zero Δ; under create_graph the derivative of dX in Δ is kept."""
    def refuse(*args, **kwargs):
        raise AssertionError("W' built for a zero Δ")

    index = torch.tensor([1, 4, 5, 11])
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        layer = S2FTInPlaceLinear(torch.nn.Linear(24, 20, dtype=dtype), **{mode: index})
        x = torch.randn(3, 7, 24, dtype=dtype, requires_grad=True)
        zero = torch.zeros(layer.selected.shape, dtype=dtype, requires_grad=True)
        with dispatch.override(merge=False):
            y0 = sparse_linear(x, layer.base_weight, zero, bias=layer.base.bias, **{mode: index})
            want = torch.autograd.grad(y0.square().sum(), (x, zero))
        with monkeypatch.context() as m:
            m.setattr("kronops.s2ft.merged.sparse_merged_weight", refuse)
            y = layer(x)
            got = torch.autograd.grad(y.square().sum(), (x, layer.selected))
        assert route(y) == "_MergedSparseLinearBackward"
        assert torch.equal(y, y0) and all(torch.equal(g, w) for g, w in zip(got, want)), dtype
    if mode == "cols":  # cols mode saves X[:, C] detached: no double backward to x
        return
    x = x.detach().double().requires_grad_()                      # double backward, fp64
    layer.double()
    zero = zero.detach().double().requires_grad_()
    second = []
    for f, delta in ((layer, layer.selected),
                     (lambda t: sparse_linear(t, layer.base_weight, zero, bias=layer.base.bias,
                                              **{mode: index}), zero)):
        with dispatch.override(merge=False):
            g = torch.autograd.grad(f(x).square().sum(), delta, create_graph=True)[0]
            second.append(torch.autograd.grad((g * g).sum(), x)[0])
    assert rel_err(second[0], second[1]) < 1e-13


def test_compile_keeps_the_op():
    """Under torch.compile sparse_linear runs the op even pinned to merge (the partitioner
    would merge the two builds of W' into one and keep W' from forward to backward)."""
    torch._dynamo.reset()
    x, weight, delta, bias, sel = inputs((4, 3), 11, 10, 4, "rows", "tensor", torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def step(x, delta, bias):
        return (sparse_linear(x, weight, delta, bias=bias, **sel) ** 2).sum()

    with merged():
        loss = torch.compile(step, fullgraph=True, backend=backend)(x, delta, bias)
        grads = torch.autograd.grad(loss, (x, delta, bias))
        loss_ref = step(x, delta, bias)
        grads_ref = torch.autograd.grad(loss_ref, (x, delta, bias))
    # the op, not the merged route's autograd.Function
    assert len(graphs) == 1 and "kronops.sparse_linear" in graphs[0]
    assert "autograd_function_apply" not in graphs[0]
    assert rel_err(loss, loss_ref) < 1e-5
    for g, r in zip(grads, grads_ref):
        assert rel_err(g, r) < 1e-5


def test_merged_double_backward_gives_weight_no_gradient():
    x, weight, delta, bias, sel = inputs((5,), 9, 8, 3, "rows", "tensor", torch.float64)
    weight.requires_grad_()
    with merged():
        y = sparse_linear(x, weight, delta, bias=bias, **sel)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    assert weight.grad is None and delta.grad is not None


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_merged_route_over_a_transposed_weight(mode):
    """A transformers Conv1D weight is a transposed view: W' keeps its layout (no
    transposing copy) and the result is the reference's."""
    torch.manual_seed(0)
    weight = torch.randn(10, 12, dtype=torch.float64).mT  # (out, in) = (12, 10)
    sel = torch.tensor([1, 4, 5])
    delta = torch.randn(*((3, 10) if mode == "rows" else (12, 3)), dtype=torch.float64)
    x = torch.randn(6, 10, dtype=torch.float64)
    assert sparse_merged_weight(weight, delta, sel, 0, mode == "cols").stride() == weight.stride()
    with merged():
        y = sparse_linear(x, weight, delta, **{mode: sel})
    assert rel_err(y, naive_sparse_linear(x, weight, delta, **{mode: sel})) < 1e-14


@pytest.mark.dispatch_rules
def test_half_precision_keeps_the_ops_route_and_small_updates():
    """A bf16 W' rounds away a Δ under half of W's rounding step (here all of it), which the
    op's separate products keep: the rule never merges bf16."""
    torch.manual_seed(0)
    # |W| in [0.02, 0.03): a rounding step of 2^-13 ≈ 1.2e-4, ten times Δ's 1e-5
    weight = ((torch.rand(16, 256) * 0.01 + 0.02) * torch.randn(16, 256).sign()).bfloat16()
    delta = torch.full((4, 256), 1e-5, dtype=torch.bfloat16)
    x = torch.ones(512, 256, dtype=torch.bfloat16)
    rows = torch.tensor([0, 3, 8, 9])
    base = torch.nn.functional.linear(x, weight)
    assert not torch.equal(sparse_linear(x, weight, delta, rows=rows), base)
    with merged():
        assert torch.equal(sparse_linear(x, weight, delta, rows=rows), base)


@pytest.mark.dispatch_rules
def test_sparse_merge_rule():
    """CPU: from rows · fraction ≥ SPARSE_MERGE_TOKEN_FACTOR · in·out/(in+out) on (1024²: 128
    rows at 5%, 640 at 1%), fp32 and fp64 only; never on CUDA (not measured there); pinned
    by ``override(merge=...)``."""
    f32 = torch.float32
    for fraction, threshold in ((0.05, 128), (0.01, 640)):
        assert dispatch.sparse_merge_pays("cpu", threshold, 1024, 1024, f32, fraction)
        assert not dispatch.sparse_merge_pays("cpu", threshold - 1, 1024, 1024, f32, fraction)
    assert dispatch.sparse_merge_pays("cpu", 128, 1024, 1024, torch.float64, 0.05)
    for dtype in (torch.bfloat16, torch.float16):
        assert not dispatch.sparse_merge_pays("cpu", 1 << 30, 1024, 1024, dtype, 0.05)
    assert not dispatch.sparse_merge_pays("cuda", 1 << 30, 1024, 1024, f32, 0.05)
    with dispatch.override(merge=False):
        assert not dispatch.sparse_merge_pays("cpu", 1 << 30, 1024, 1024, f32, 0.05)


@pytest.mark.dispatch_rules
@pytest.mark.parametrize("rows,node", [
    (1, "GeneratedBackwardFor_kronops_sparse_linear_defaultBackward"),
    (64, "_MergedSparseLinearBackward")])
def test_sparse_linear_takes_the_rules_route(rows, node):
    """48x40, 5 of 48 rows: intensity 21.8, so the CPU rule merges from 3 rows of x on."""
    x, weight, delta, bias, sel = inputs((rows,), 48, 40, 5, "rows", "tensor", torch.float32)
    y = sparse_linear(x, weight, delta, bias=bias, **sel)
    assert route(y) == node


@pytest.mark.parametrize("args,error,match", [
    (dict(delta=torch.randn(3, 7)), ValueError, r"delta must have shape \(\|R\|, in\) with in = 8"),
    (dict(delta=torch.randn(3, 8).double()), TypeError, "delta has dtype"),
    (dict(index=torch.tensor([0, 2])), ValueError, "index has 2 positions but delta has 3"),
    (dict(index=torch.tensor([0, 2, 6])), IndexError, "index"),
    (dict(index=torch.tensor([0, 2, 2])), ValueError,
     r"index must be sorted and unique \(strictly increasing\), got index\[1\] = 2 and index\[2\] = 2"),
    (dict(index=None, start=4), ValueError, r"the range \[4, 7\) of index must lie in \[0, 6\]"),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, "weight must be 2-D"),
])
@pytest.mark.parametrize("kernel", ["native", "pytorch"])
def test_merged_weight_refuses_bad_arguments(args, error, match, kernel):
    """The op behind the merged route, called directly, on the native kernel (when built) and
    on the PyTorch kernel: errors name the op and the argument."""
    if kernel == "native" and not native.available():
        pytest.skip(f"native library {native.load_error()}")
    call = dict(weight=torch.randn(6, 8), delta=torch.randn(3, 8), index=torch.tensor([0, 2, 5]),
                start=0, cols=False)
    call.update(args)
    with native.disabled() if kernel == "pytorch" else contextlib.nullcontext():
        with pytest.raises(error, match="kronops::sparse_merged_weight: .*" + match):
            sparse_merged_weight(**call)
