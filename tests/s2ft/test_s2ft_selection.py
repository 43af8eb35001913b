"""kronops.s2ft.Selection: made and checked once, immutable, and taken as one object by
sparse_linear, the S²FT layers and the optimizers."""
import copy
import pickle

import pytest
import torch
from torch import nn

from kronops.s2ft import S2FTInPlaceLinear, S2FTLinear, Selection, sparse_linear


def test_index_and_range():
    index = Selection.rows(torch.tensor([1, 4, 6]), size=8)
    assert (index.side, index.size, index.count, index.dim) == ("rows", 8, 3, 0)
    assert not index.is_range and index.range is None and index.device == torch.device("cpu")
    assert index.op_args[1:] == (0, False) and index.op_args[0] is index.index
    assert index.part_shape((8, 5)) == (3, 5)
    span = Selection.cols(slice(2, 5), size=7)
    assert (span.side, span.count, span.dim, span.start) == ("cols", 3, 1, 2)
    assert span.is_range and span.range == range(2, 5) and span.index is None
    assert span.op_args == (None, 2, True) and span.part_shape((4, 7)) == (4, 3)
    assert torch.equal(span.indices(), torch.tensor([2, 3, 4]))
    assert Selection.cols(range(2, 5), size=7) == span == Selection("cols", slice(2, 5), size=7)
    assert Selection.rows(slice(None), size=3).range == range(0, 3)


def test_strided_index_is_made_contiguous():
    sel = Selection.rows(torch.arange(10)[::3], size=10)
    assert sel.index.is_contiguous() and sel.index.tolist() == [0, 3, 6, 9]


@pytest.mark.parametrize("selected,size,error,match", [
    (torch.tensor([3, 1]), 5, ValueError, "rows must be sorted and unique"),
    (torch.tensor([1, 1]), 5, ValueError,
     r"rows must be sorted and unique \(strictly increasing\), got rows\[0\] = 1 and rows\[1\] = 1"),
    (torch.tensor([0, 5]), 5, ValueError, r"rows must lie in \[0, 5\), got values from 0 to 5"),
    (torch.tensor([-1, 2]), 5, ValueError, r"rows must lie in \[0, 5\)"),
    (torch.tensor([0, 1], dtype=torch.int32), 5, TypeError, "rows must have dtype torch.int64"),
    (torch.tensor([[0, 1]]), 5, ValueError, "rows must be a non-empty 1-D tensor"),
    (torch.tensor([], dtype=torch.int64), 5, ValueError, "rows must be a non-empty 1-D tensor"),
    ([0, 1], 5, TypeError, "rows must be an int64 tensor, a slice or a range, got list"),
    (slice(0, 4, 2), 5, ValueError, "rows must have step 1"),
    (range(3, 7), 5, ValueError, r"rows must satisfy 0 <= start < stop <= 5"),
    (range(3, 3), 5, ValueError, r"rows must satisfy 0 <= start < stop <= 5"),
    (range(0, 2), 0, ValueError, "size must be a positive int, got 0"),
    (range(0, 2), 2.0, ValueError, "size must be a positive int"),
])
def test_refusals_name_the_argument(selected, size, error, match):
    with pytest.raises(error, match=match):
        Selection.rows(selected, size=size)


def test_refusals_use_the_given_name_and_side():
    with pytest.raises(ValueError, match="q_proj rows must be sorted"):
        Selection.rows(torch.tensor([2, 1]), size=4, name="q_proj rows")
    with pytest.raises(ValueError, match="side must be one of"):
        Selection("diagonal", range(0, 1), size=4)


def test_immutable():
    sel = Selection.rows(range(0, 2), size=4)
    with pytest.raises(AttributeError, match="immutable"):
        sel.start = 1
    with pytest.raises(AttributeError, match="immutable"):
        del sel.count


def test_device_move():
    span = Selection.cols(range(1, 3), size=4)
    assert span.to("meta") is span and span.device is None
    index = Selection.cols(torch.tensor([0, 3]), size=4)
    assert index.to("cpu") is index
    moved = index.to("meta")
    assert moved.device.type == "meta" and (moved.side, moved.size, moved.count) == ("cols", 4, 2)
    assert index.device.type == "cpu"  # the original is unchanged


def test_equality_hash_and_copies():
    a = Selection.rows(torch.tensor([0, 2]), size=4)
    b = Selection.rows(torch.tensor([0, 2]), size=4)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Selection.rows(torch.tensor([0, 3]), size=4)
    assert a != Selection.cols(torch.tensor([0, 2]), size=4)
    assert a != Selection.rows(torch.tensor([0, 2]), size=5)
    assert Selection.rows(range(0, 2), size=4) != Selection.rows(torch.tensor([0, 1]), size=4)
    for copied in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert copied == a and copied.index is not a.index


def test_unpickling_checks_again():
    sel = Selection.rows(torch.tensor([0, 2]), size=4)
    data = pickle.dumps(sel)
    sel.index[1] = 0  # changed behind the selection's back: loading refuses it
    with pytest.raises(ValueError, match="rows must be sorted and unique"):
        pickle.loads(pickle.dumps(sel))
    assert pickle.loads(data).index.tolist() == [0, 2]


def test_as_range_if_contiguous():
    assert Selection.rows(torch.tensor([3, 4, 5]), size=8).as_range_if_contiguous() == \
        Selection.rows(range(3, 6), size=8)
    gaps = Selection.rows(torch.tensor([3, 5]), size=8)
    assert gaps.as_range_if_contiguous() is gaps


@pytest.mark.parametrize("side", ["rows", "cols"])
@pytest.mark.parametrize("selected", [torch.tensor([0, 3, 4]), range(1, 4)])
def test_weight_parts(side, selected):
    weight = torch.randn(5, 6)
    sel = Selection(side, selected, size=weight.shape[0 if side == "rows" else 1])
    positions = sel.indices()
    expected = weight.index_select(sel.dim, positions)
    part = sel.part(weight)
    assert torch.equal(part, expected) and part.shape == sel.part_shape(weight.shape)
    part.zero_()  # a copy, also of a range
    assert torch.equal(weight.index_select(sel.dim, positions), expected)
    values = torch.randn(sel.part_shape(weight.shape), dtype=torch.float64)
    sel.add_into(weight, values)
    assert torch.equal(weight.index_select(sel.dim, positions), expected + values.float())
    sel.copy_into(weight, values)
    assert torch.equal(weight.index_select(sel.dim, positions), values.float())


@pytest.mark.parametrize("side", ["rows", "cols"])
@pytest.mark.parametrize("selected", [torch.tensor([0, 3, 4]), range(1, 4)])
def test_sparse_linear_takes_a_selection(side, selected):
    x, weight = torch.randn(2, 3, 6), torch.randn(5, 6)
    sel = Selection(side, selected, size=weight.shape[0 if side == "rows" else 1])
    delta = torch.randn(sel.part_shape(weight.shape))
    expected = sparse_linear(x, weight, delta, **{side: selected})
    assert torch.equal(sparse_linear(x, weight, delta, sel), expected)
    assert torch.equal(sparse_linear(x, weight, delta, **{side: sel}), expected)


def test_sparse_linear_refuses_a_selection_that_does_not_fit():
    x, weight, delta = torch.randn(2, 6), torch.randn(5, 6), torch.randn(2, 6)
    rows = Selection.rows(torch.tensor([0, 1]), size=5)
    with pytest.raises(ValueError, match=r"selection selects rows of 7, expected rows of 5"):
        sparse_linear(x, weight, delta, Selection.rows(range(0, 2), size=7))
    with pytest.raises(ValueError, match=r"cols selects rows of 5, expected cols of 6"):
        sparse_linear(x, weight, delta, cols=rows)
    with pytest.raises(ValueError, match="exactly one of rows and cols"):
        sparse_linear(x, weight, delta, rows, rows=range(0, 2))
    with pytest.raises(TypeError, match="selection must be a kronops.s2ft.Selection, got range"):
        sparse_linear(x, weight, delta, range(0, 2))
    with pytest.raises(ValueError, match="selection is on meta but weight is on cpu"):
        sparse_linear(x, weight, delta, rows.to("meta"))
    with pytest.raises(ValueError, match=r"delta must have shape \(2, 6\)"):
        sparse_linear(x, weight, torch.randn(3, 6), rows)


@pytest.mark.parametrize("layer_type", [S2FTLinear, S2FTInPlaceLinear])
def test_layers_hold_one_selection(layer_type):
    base = nn.Linear(6, 5)
    index = torch.tensor([1, 3])
    layer = layer_type(base, Selection.cols(index, size=6))
    by_keyword = layer_type(base, cols=index)
    assert layer.chosen == by_keyword.chosen and by_keyword.chosen.index is not index  # copied
    assert (layer.mode, layer.start) == ("cols", 0) and torch.equal(layer.index, index)
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), by_keyword(x))
    with pytest.raises(ValueError, match="selection selects cols of 7, expected cols of 6"):
        layer_type(base, Selection.cols(index, size=7))


def test_layer_moves_its_selection():
    layer = S2FTLinear(nn.Linear(6, 5), rows=torch.tensor([0, 4]))
    layer.double()
    assert layer.chosen.device.type == "cpu" and layer.delta.dtype == torch.float64
    layer.to("meta")
    assert layer.chosen.device.type == "meta" and layer.index.device.type == "meta"


def test_state_dict_load_checks_the_index_once():
    layer = S2FTLinear(nn.Linear(6, 5), rows=torch.tensor([0, 4]))
    state = S2FTLinear(nn.Linear(6, 5), rows=torch.tensor([1, 2])).state_dict()
    layer.load_state_dict(state)
    assert layer.chosen == Selection.rows(torch.tensor([1, 2]), size=5)
    state["index"] = torch.tensor([2, 1])
    with pytest.raises(RuntimeError, match="bad S²FT selection index: index must be sorted"):
        layer.load_state_dict(state)
    assert layer.index.tolist() == [1, 2]  # nothing taken over
    del state["index"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "index"'):
        layer.load_state_dict(state)
