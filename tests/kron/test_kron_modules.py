"""KronLinear, KronALinear and KronABlock."""
import pytest
import torch
from conftest import rel_err
from torch import nn

import kronops


def test_kron_linear_layer_matches_its_materialised_weight():
    layer = kronops.KronLinear(20, 12, a_shape=(3, 4), dtype=torch.float64)
    assert layer.a.shape == (3, 4) and layer.b.shape == (4, 5)
    x = torch.randn(2, 7, 20, dtype=torch.float64)
    assert rel_err(layer(x), nn.functional.linear(x, layer.weight(), layer.bias)) < 1e-12


def test_kron_linear_layer_picks_factors_near_square_roots():
    layer = kronops.KronLinear(4096, 11008, bias=False)
    assert tuple(layer.a.shape) == (86, 64) and tuple(layer.b.shape) == (128, 64)
    assert layer.bias is None


def test_kron_linear_layer_init_variance_like_linear():
    layer = kronops.KronLinear(1024, 1024)
    assert 0.5 < layer.weight().var().item() * 3 * 1024 < 2.0


@pytest.mark.parametrize("a_shape", [(3, 4), (4, 0), (2,), "ab"])
def test_kron_linear_layer_bad_a_shape(a_shape):
    with pytest.raises(ValueError, match="a_shape"):
        kronops.KronLinear(10, 8, a_shape=a_shape)


@pytest.mark.parametrize("rank", [None, 2])
def test_krona_fresh_adapter_changes_nothing_then_trains(rank):
    base = nn.Linear(12, 10)
    x = torch.randn(4, 3, 12)
    expected = base(x)
    layer = kronops.KronALinear(base, a_shape=(2, 3), rank=rank, alpha=4.0)
    assert torch.equal(layer(x), expected)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == ({"a", "b"} if rank is None else {"a_u", "a_v", "b"})
    assert layer.scale == (4.0 if rank is None else 2.0)
    layer(x).square().sum().backward()
    assert layer.b.grad.abs().sum() > 0 and base.weight.grad is None


@pytest.mark.parametrize("rank", [None, 3])
def test_krona_forward_merge_unmerge(rank):
    base = nn.Linear(12, 10, dtype=torch.float64)
    original = base.weight.detach().clone()
    layer = kronops.KronALinear(base, a_shape=(5, 4), rank=rank)
    nn.init.normal_(layer.b)
    x = torch.randn(6, 12, dtype=torch.float64)
    expected = nn.functional.linear(x, original + layer.delta_weight(), base.bias)
    assert rel_err(layer(x), expected) < 1e-12
    layer.merge()
    assert layer.merged and rel_err(layer(x), expected) < 1e-12
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged and rel_err(base.weight, original) < 1e-14
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_krona_dropout_only_touches_adapter_path():
    base = nn.Linear(8, 8, dtype=torch.float64)
    layer = kronops.KronALinear(base, dropout=0.5)
    nn.init.normal_(layer.b)
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.manual_seed(1)
    y = layer.train()(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5)
    assert rel_err(y, base(x) + layer.adapter(dropped)) < 1e-12
    assert rel_err(layer.eval()(x), base(x) + layer.adapter(x)) < 1e-12


def test_krona_bad_arguments():
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        kronops.KronALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="rank"):
        kronops.KronALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match="dropout"):
        kronops.KronALinear(nn.Linear(4, 4), dropout=1.0)
    with pytest.raises(ValueError, match="a_shape"):
        kronops.KronALinear(nn.Linear(6, 4), a_shape=(3, 3))
    with pytest.raises(TypeError, match="dropout must be a number"):
        kronops.KronALinear(nn.Linear(4, 4), dropout="0.1")


@pytest.mark.parametrize("merged", [False, True])
def test_wrong_input_width_names_in_features(merged):
    layer = kronops.KronALinear(nn.Linear(8, 6))
    block = kronops.KronABlock(nn.Linear(8, 6), 8, 6)
    s2ft = kronops.S2FTLinear(nn.Linear(8, 6), rows=torch.tensor([1, 4]))
    if merged:
        layer.merge()
        s2ft.merge()
    for module in (layer, block, s2ft):
        with pytest.raises(ValueError, match=r"x must have last dim in_features = 8.*got shape \(3, 7\)"):
            module(torch.randn(3, 7))


@pytest.mark.parametrize("residual", [False, True])
def test_krona_block(residual):
    ffn = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(2, 5, 8)
    expected = ffn(x)
    block = kronops.KronABlock(ffn, 8, 8, residual=residual, a_shape=(2, 4))
    assert torch.equal(block(x), expected)
    nn.init.normal_(block.b)
    if residual:
        nn.init.constant_(block.residual_scale, 0.25)
    y = block(x)
    delta = block.scale * x @ torch.kron(block.a, block.b).T
    want = expected + delta + (0.25 * x if residual else 0)
    assert rel_err(y, want) < 1e-5
    y.sum().backward()
    assert all(p.grad is None for p in ffn.parameters())
    assert block.a.grad is not None and (not residual or block.residual_scale.grad is not None)


def test_krona_block_residual_needs_square():
    with pytest.raises(ValueError, match="residual needs in_features == out_features"):
        kronops.KronABlock(nn.Linear(8, 4), 8, 4, residual=True)


def test_layers_run_under_autocast_after_linear():
    model = nn.Sequential(nn.Linear(12, 12), kronops.KronLinear(12, 10),
                          kronops.KronALinear(nn.Linear(10, 8), rank=2))
    nn.init.normal_(model[2].b)
    x = torch.randn(5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, model(x)) < 3e-2
    y.float().square().sum().backward()
    assert model[1].a.grad is not None and model[2].b.grad is not None
