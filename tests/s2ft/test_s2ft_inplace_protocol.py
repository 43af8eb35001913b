"""The in-place optimizers use only ``InPlaceLayer``: the parameter, the base weight, its
Selection, the part the master values start from, and the write back."""
import io

import pytest
import torch
from torch import nn

from kronops.s2ft import (InPlaceAdamW, InPlaceLayer, InPlaceSGD, S2FTInPlaceLinear, S2FTLinear,
                          Selection, sparse_linear)


class RowsLinear(nn.Module):
    """An in-place layer other than S2FTInPlaceLinear: a real zero ``selected`` (|R|, in)."""

    def __init__(self, linear: nn.Linear, rows):
        super().__init__()
        self.linear = linear.requires_grad_(False)
        self.chosen = Selection.rows(rows, size=linear.out_features)
        self.selected = nn.Parameter(torch.zeros(self.chosen.part_shape(linear.weight.shape),
                                                 dtype=linear.weight.dtype))

    @property
    def base_weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x):
        return sparse_linear(x, self.base_weight, self.selected, self.chosen,
                             bias=self.linear.bias)

    def weight_part(self) -> torch.Tensor:
        return self.chosen.part(self.base_weight.detach())

    def write_weight_part(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.chosen.copy_into(self.base_weight, values)


def _train(model, opt, xs) -> None:
    for x in xs:
        opt.zero_grad()
        model(x).float().square().sum().backward()
        opt.step()


def test_which_layers_are_in_place():
    base = nn.Linear(4, 3)
    assert isinstance(S2FTInPlaceLinear(base, rows=range(0, 2)), InPlaceLayer)
    assert isinstance(RowsLinear(nn.Linear(4, 3), range(0, 2)), InPlaceLayer)
    assert not isinstance(S2FTLinear(nn.Linear(4, 3), rows=range(0, 2)), InPlaceLayer)
    assert not isinstance(base, InPlaceLayer)
    with pytest.raises(TypeError, match="expected S2FTInPlaceLinear layers"):
        InPlaceSGD([base])


@pytest.mark.parametrize("optimizer", [InPlaceSGD, InPlaceAdamW])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [torch.tensor([0, 2, 5]), range(1, 4)])
def test_optimizers_train_any_in_place_layer(optimizer, dtype, rows):
    """A layer that only follows the protocol trains exactly as S2FTInPlaceLinear does."""
    torch.manual_seed(0)
    linear = nn.Linear(5, 6).to(dtype)
    ours = S2FTInPlaceLinear(nn.Linear(5, 6).to(dtype).requires_grad_(False), rows=rows)
    ours.base.load_state_dict(linear.state_dict())
    other = RowsLinear(linear, rows)
    initial = linear.weight.clone()
    xs = [torch.randn(4, 5, dtype=dtype) for _ in range(3)]
    for model in (ours, other):
        opt = optimizer([model], lr=0.1)
        assert opt.layer_of(model.selected) is model
        _train(model, opt, xs)
    assert torch.equal(ours.base_weight, other.base_weight)
    assert not torch.equal(other.base_weight, initial)


def test_write_weight_part_rounds_into_the_weight():
    layer = S2FTInPlaceLinear(nn.Linear(4, 6).to(torch.bfloat16), cols=torch.tensor([0, 3]))
    values = torch.randn(6, 2, dtype=torch.float64)
    layer.write_weight_part(values)
    assert torch.equal(layer.weight_part(), values.to(torch.bfloat16))
    assert layer.weight_part().shape == layer.chosen.part_shape(layer.base_weight.shape)


@pytest.mark.parametrize("optimizer", [InPlaceSGD, InPlaceAdamW])
def test_state_dict_round_trip(optimizer):
    """A saved optimizer state (moments, step, fp32 master values) loads into a new optimizer
    on a new model, and training goes on as without the interruption."""
    def fresh():
        torch.manual_seed(1)
        return nn.Sequential(
            S2FTInPlaceLinear(nn.Linear(6, 8).to(torch.bfloat16), rows=torch.tensor([1, 6])),
            S2FTInPlaceLinear(nn.Linear(8, 4).to(torch.bfloat16), cols=range(2, 7)))

    xs = [torch.randn(3, 6, dtype=torch.bfloat16) for _ in range(4)]
    straight = fresh()
    _train(straight, optimizer(straight, lr=1e-3), xs)
    first = fresh()
    first_opt = optimizer(first, lr=1e-3)
    _train(first, first_opt, xs[:2])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert {k for s in saved["opt"]["state"].values() for k in s} >= {"master"}
    resumed = fresh()
    resumed.load_state_dict(saved["model"])
    resumed_opt = optimizer(resumed, lr=1e-3)
    resumed_opt.load_state_dict(saved["opt"])
    assert all(s["master"].dtype == torch.float32 for s in resumed_opt.state.values())
    _train(resumed, resumed_opt, xs[2:])
    for a, b in zip(resumed, straight):
        assert torch.equal(a.base_weight, b.base_weight)
