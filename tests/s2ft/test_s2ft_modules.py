"""S2FTLinear: zero start, training only the selection, merge/unmerge, bad input."""
import pytest
import torch
from conftest import assert_close
from torch import nn

from kronops.s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from kronops.testing import naive_sparse_linear

SELECTIONS = [("rows", torch.tensor([0, 3, 4, 10])), ("rows", slice(2, 7)),
              ("cols", torch.tensor([1, 5, 8])), ("cols", range(0, 4))]


@pytest.mark.parametrize("mode,sel", SELECTIONS)
def test_fresh_adapter_is_the_base(mode, sel):
    base = nn.Linear(9, 11)
    layer = S2FTLinear(base, **{mode: sel})
    x = torch.randn(2, 5, 9)
    assert torch.equal(layer(x), base(x))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["delta"]


@pytest.mark.parametrize("mode,sel", SELECTIONS)
def test_forward_backward_match_reference(mode, sel):
    layer = S2FTLinear(nn.Linear(9, 11), **{mode: sel})
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(3, 4, 9, requires_grad=True)
    y = layer(x)
    xr, dr = x.detach().double().requires_grad_(), layer.delta.detach().double().requires_grad_()
    ref = naive_sparse_linear(xr, layer.base.weight.double(), dr,
                                  bias=layer.base.bias.double(), **{mode: sel})
    assert_close(y, ref, torch.float32, "forward")
    g = torch.randn_like(ref)
    y.backward(g.float())
    ref.backward(g)
    assert_close(layer.delta.grad, dr.grad, torch.float32, "grad delta")
    assert_close(x.grad, xr.grad, torch.float32, "grad x")
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


@pytest.mark.parametrize("mode,sel", SELECTIONS)
def test_merge_unmerge(mode, sel):
    layer = S2FTLinear(nn.Linear(9, 11), **{mode: sel})
    with torch.no_grad():
        layer.delta.normal_()
    original = layer.base.weight.clone()
    x = torch.randn(6, 9)
    before = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), before, torch.float32, "merged forward")
    changed = (layer.base.weight != original)
    expected = torch.zeros_like(changed)
    idx = layer.indices()
    if mode == "rows":
        expected[idx] = True
    else:
        expected[:, idx] = True
    assert not changed[~expected].any()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.base.weight, original, torch.float32, "unmerged weight")
    assert_close(layer(x), before, torch.float32, "unmerged forward")  # fp32 rounding of W+Δ-Δ
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_low_precision_base_keeps_fp32_delta():
    base = nn.Linear(8, 6).to(torch.float16)
    layer = S2FTLinear(base, rows=torch.tensor([1, 4]))
    assert layer.delta.dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.float16))
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert layer.delta.grad.dtype == torch.float32 and layer.delta.grad.shape == (2, 8)


def test_state_dict_round_trip():
    layer = S2FTLinear(nn.Linear(5, 7), cols=torch.tensor([0, 2]))
    with torch.no_grad():
        layer.delta.normal_()
    other = S2FTLinear(nn.Linear(5, 7), cols=torch.tensor([1, 3]))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.index, layer.index) and torch.equal(other.delta, layer.delta)


def test_state_dict_carries_a_contiguous_selection():
    """A range's start is part of the state: rows 0:4 loaded into a rows 4:8 layer select 0:4."""
    layer = S2FTLinear(nn.Linear(5, 9), rows=range(0, 4))
    with torch.no_grad():
        layer.delta.normal_()
    other = S2FTLinear(nn.Linear(5, 9), rows=range(4, 8))
    other.load_state_dict(layer.state_dict())
    assert other.selection() == range(0, 4)
    x = torch.randn(3, 5)
    assert torch.equal(other(x), layer(x))
    with pytest.raises(ValueError, match=r"selecting rows \(a contiguous range\) into one "
                                         r"selecting rows \(an index tensor\)"):
        S2FTLinear(nn.Linear(5, 9), rows=torch.tensor([0, 1, 2, 5])) \
            .load_state_dict(layer.state_dict(), strict=False)
    with pytest.raises(ValueError, match=r"into one selecting cols"):
        S2FTLinear(nn.Linear(5, 9), cols=range(0, 4)).load_state_dict(layer.state_dict(),
                                                                       strict=False)
    state = S2FTLinear(nn.Linear(5, 9), rows=range(5, 9)).state_dict()
    state["_extra_state"] = {"mode": "rows", "start": 6}
    with pytest.raises(ValueError, match="range start 6 does not fit 4 rows of 9"):
        other.load_state_dict(state)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rows=torch.tensor([0, 1]), cols=torch.tensor([0])), ValueError, "exactly one"),
    (dict(), ValueError, "exactly one"),
    (dict(rows=torch.tensor([3, 1])), ValueError, "rows must be sorted"),
    (dict(cols=torch.tensor([0, 5])), ValueError, r"cols must lie in \[0, 5\)"),
    (dict(rows=torch.tensor([0.5])), TypeError, "rows must have dtype torch.int64"),
    (dict(rows=slice(0, 2), delta_dtype=torch.int32), TypeError, "delta_dtype"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        S2FTLinear(nn.Linear(5, 7), **kwargs)


def test_base_must_be_linear():
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        S2FTLinear(nn.Conv1d(2, 2, 1), rows=slice(0, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,sel", SELECTIONS[:3:2])
def test_autocast_cpu(dtype, mode, sel):
    """Inside autocast the layer computes in the autocast dtype; Δ and its grad stay fp32."""
    layer = S2FTLinear(nn.Linear(9, 11), **{mode: sel})
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(5, 9)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    grad, layer.delta.grad = layer.delta.grad, None
    layer(x).square().sum().backward()
    assert grad.dtype == torch.float32
    assert_close(grad, layer.delta.grad, torch.bfloat16, "grad delta under autocast")


@pytest.mark.parametrize("mode,sel", SELECTIONS)
def test_torch_compile_fullgraph(mode, sel):
    torch._dynamo.reset()
    layer = S2FTLinear(nn.Linear(9, 11), **{mode: sel})
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(3, 9, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    grads = layer.delta.grad.clone(), x.grad.clone()
    layer.delta.grad = x.grad = None
    layer(x).square().sum().backward()
    assert_close(grads[0], layer.delta.grad, torch.float32, "compiled grad delta")
    assert_close(grads[1], x.grad, torch.float32, "compiled grad x")


def test_inplace_layer_gives_compact_gradient_only():
    base = nn.Linear(9, 11)
    layer = S2FTInPlaceLinear(base, cols=torch.tensor([2, 3, 7]))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["selected"]
    assert layer.selected.stride() == (0, 0) and not layer.selected.any()
    x = torch.randn(4, 9)
    y = layer(x)
    assert torch.equal(y, base(x))
    y.square().sum().backward()
    xd, wd = x.double(), base.weight.detach().double().requires_grad_()
    torch.nn.functional.linear(xd, wd, base.bias.double()).square().sum().backward()
    assert layer.selected.grad.shape == (11, 3) and base.weight.grad is None
    assert_close(layer.selected.grad, wd.grad[:, [2, 3, 7]], torch.float32, "compact grad")
    assert torch.equal(layer.weight_part(), base.weight[:, [2, 3, 7]])


def test_inplace_state_dict_round_trip():
    """The expanded zero ``selected`` loads (shape checked); the trained weight is restored."""
    layer = S2FTInPlaceLinear(nn.Linear(5, 7), rows=torch.tensor([1, 4]))
    with torch.no_grad():
        layer.base.weight[[1, 4]] += 1.0
    other = S2FTInPlaceLinear(nn.Linear(5, 7), rows=torch.tensor([1, 4]))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.base.weight, layer.base.weight)
    assert other.selected.stride() == (0, 0) and not other.selected.any()
    x = torch.randn(3, 5)
    assert torch.equal(other(x), layer(x))
    with pytest.raises(RuntimeError, match="size mismatch for selected"):
        S2FTInPlaceLinear(nn.Linear(5, 7), rows=torch.tensor([1, 2, 4])) \
            .load_state_dict(layer.state_dict())
    state = layer.state_dict()
    del state["selected"]
    with pytest.raises(RuntimeError, match='Missing key.*"selected"'):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)


def test_inplace_layer_deepcopy_keeps_an_expanded_selection():
    """A deep copy's ``selected`` is an expanded zero again (not a full tensor that a torch
    optimizer would train unseen), and a torch optimizer is refused for it too."""
    import copy
    layer = S2FTInPlaceLinear(torch.nn.Linear(8, 6), rows=torch.tensor([1, 4]))
    twin = copy.deepcopy(layer)
    assert twin.selected.stride() == (0, 0) and twin.selected is not layer.selected
    assert torch.equal(twin.base.weight, layer.base.weight)
    twin(torch.randn(3, 8)).sum().backward()
    with pytest.raises(ValueError, match="S²FT in-place parameter"):
        torch.optim.SGD([twin.selected], lr=0.1).step()
