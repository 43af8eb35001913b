"""kronops.adapters.select: plans per block, counts and fractions, strategies, JSON, bad input."""
import pytest
import torch
from models import llama_12_heads, llama_batch, tiny_llama

from kronops import adapters


def test_blocks_found_with_gqa_sizes():
    blocks = adapters.find_blocks(tiny_llama())
    assert [b.name for b in blocks] == ["model.layers.0", "model.layers.1"]
    sizes = {(b.num_heads, b.num_kv_heads, b.head_dim, b.channels) for b in blocks}
    assert sizes == {(6, 2, 8, 40)}


def test_counts_per_block_and_json_round_trip():
    plan = adapters.select(tiny_llama(), heads=2, channels=5, seed=3)
    assert plan.strategy == "random" and plan.seed == 3
    for entry in plan.blocks.values():
        assert len(entry["heads"]) == 2 and len(entry["channels"]) == 5
        assert entry["heads"] == sorted(set(entry["heads"]))
    assert adapters.Plan.from_json(plan.to_json()) == plan


def test_fraction_is_of_the_model_total_and_seed_decides():
    model = tiny_llama()
    plan = adapters.select(model, heads=0.25, channels=0.1, seed=7)
    assert sum(len(e["heads"]) for e in plan.blocks.values()) == 3  # 25% of 12
    assert sum(len(e["channels"]) for e in plan.blocks.values()) == 8  # 10% of 80
    assert adapters.select(model, heads=0.25, channels=0.1, seed=7) == plan
    others = [adapters.select(model, heads=0.25, channels=0.1, seed=s) for s in range(8, 12)]
    assert any(o.blocks != plan.blocks for o in others)


def test_weight_strategy_picks_the_largest_parts():
    model = tiny_llama()
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.self_attn.q_proj.weight[4 * 8:5 * 8] *= 100  # head 4
        layer.mlp.down_proj.weight[:, 13] *= 100            # channel 13
    plan = adapters.select(model, heads=1, channels=1, strategy="weight")
    assert plan.blocks["model.layers.1"]["heads"] == [4]
    assert plan.blocks["model.layers.1"]["channels"] == [13]


def test_activation_and_gradient_strategies_use_calibration():
    model = tiny_llama()
    calibration = [llama_batch(), llama_batch()]
    users_grad = torch.randn_like(model.lm_head.weight)
    model.lm_head.weight.grad = users_grad
    with torch.no_grad():  # channel 21 of block 0 carries large activations and gradients
        model.model.layers[0].mlp.up_proj.weight[21] *= 1000
    for strategy in ("activation", "gradient"):
        plan = adapters.select(model, heads=1, channels=1, strategy=strategy,
                               calibration=calibration)
        assert plan.blocks["model.layers.0"]["channels"] == [21], strategy
        assert plan.strategy == strategy
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert model.lm_head.weight.grad is users_grad  # the caller's gradients are kept
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")


def test_gradient_strategy_with_loss_fn():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    plan = adapters.select(model, heads=1, channels=2, strategy="gradient", calibration=[ids],
                           loss_fn=lambda out, b: out.logits.square().mean())
    assert all(len(e["channels"]) == 2 for e in plan.blocks.values())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(heads=7), ValueError, "heads = 7 per block, but blocks have 6"),
    (dict(channels=-1), ValueError, r"channels must be >= 0 \(a count per block\), got -1"),
    (dict(heads=-2), ValueError, r"heads must be >= 0 \(a count per block\), got -2"),
    (dict(channels=1.5), ValueError, r"channels as a fraction must lie in \[0, 1\]"),
    (dict(heads="2"), TypeError, "heads must be an int"),
    (dict(strategy="magic"), ValueError, "strategy must be one of"),
    (dict(strategy="activation"), ValueError, "needs calibration batches"),
    (dict(strategy="gradient", calibration=[]), ValueError, "calibration is empty"),
    (dict(strategy="gradient", calibration=[torch.randint(0, 97, (1, 5))]), ValueError,
     "needs a loss"),
    (dict(seed=1.0), TypeError, "seed must be an int"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        adapters.select(tiny_llama(), **{"heads": 1, "channels": 1, **kwargs})


@pytest.mark.parametrize("strategy", ["weight", "gradient"])
def test_weight_strategies_on_a_wrapped_model(strategy):
    """After apply the projections are S²FT layers (no .weight): a clear error, no
    AttributeError; random and activation still work."""
    model = tiny_llama()
    adapters.apply_adapters(model, "s2ft", plan=adapters.select(model, heads=1, channels=1),
                            verbose=False)
    with pytest.raises(ValueError, match=f"strategy='{strategy}' scores plain nn.Linear weights, "
                                         "but model.layers.0.self_attn.q_proj is already wrapped"):
        adapters.select(model, heads=1, channels=1, strategy=strategy, calibration=[llama_batch()])
    for other in ("random", "activation"):
        adapters.select(model, heads=1, channels=1, strategy=other, calibration=[llama_batch()])


def test_model_without_blocks():
    with pytest.raises(ValueError, match="no transformer blocks found"):
        adapters.select(torch.nn.Linear(3, 3), heads=1)


@pytest.mark.parametrize("layers, heads, channels, want_heads, want_channels", [
    (1, 0.05, 0.05, 1, 2),     # 12 heads: 0.6 -> 1; 40 channels: 2.0 -> 2
    (2, 0.05, 0.0125, 1, 1),   # 24 heads: 1.2 -> 1; 80 channels: 1.0 -> 1
    (3, 0.05, 0.0125, 2, 2),   # 36 heads: 1.8 -> 2; 120 channels: 1.5 -> 2 (halves up)
    (5, 0.05, 0.01, 3, 2),     # 60 heads: 3.0 -> 3 (not 2.9999...: 0.05 as written); 2.0 -> 2
    (3, 0.125, 0.0, 5, 0),     # 36 heads: 4.5 -> 5 (halves up, not to even); 0.0 -> none
    (1, 0.01, 0.001, 1, 1),    # 0.12 -> 1 and 0.04 -> 1: a positive fraction trains something
    (2, 1.0, 1.0, 24, 80),     # everything
])
def test_fractions_round_as_documented(layers, heads, channels, want_heads, want_channels):
    """A fraction of the model total is rounded to the nearest count, halves up, at least
    one when positive (the module docstring of kronops.adapters.selection): 0.05 of 12 heads
    is 1, not 0 (a truncation bug gave 0)."""
    from kronops.adapters.selection import fraction_count
    torch.manual_seed(0)
    model = llama_12_heads(layers)
    plan = adapters.select(model, heads=heads, channels=channels, seed=2)
    assert sum(len(e["heads"]) for e in plan.blocks.values()) == want_heads
    assert sum(len(e["channels"]) for e in plan.blocks.values()) == want_channels
    assert fraction_count(heads, 12 * layers) == want_heads
    assert fraction_count(channels, 40 * layers) == want_channels
    applied = adapters.apply_adapters(model, "s2ft", heads=heads, channels=channels, seed=2)
    assert applied._kronops.plan == plan
