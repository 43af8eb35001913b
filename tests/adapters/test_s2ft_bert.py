"""S²FT on BERT-style encoders through the same path as LLaMA: blocks found, every selection
strategy, co-permutation (with biases) keeping outputs, merge, exact unpermute, and the
in-place mode saved and loaded."""
import copy

import pytest
import torch
from conftest import assert_close
from models import bert_batch, tiny_bert

from kronops import adapters, s2ft
from kronops.s2ft.modules import S2FTInPlaceLinear, S2FTLinear

STRATEGIES = ["random", "weight", "activation", "gradient"]
LAYER = "bert.encoder.layer.{}"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def planted_bert(dtype=torch.float32):
    """A tiny BERT (4 heads of 8, 48 channels, random biases) in which block 1 has a head 2
    with large query weights, a head 3 with large values and a channel 21 with large
    intermediate weights: what the weight, activation and gradient strategies look for."""
    model = tiny_bert().to(dtype)
    layer = model.bert.encoder.layer[1]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
        layer.attention.self.query.weight[2 * 8:3 * 8] *= 100
        layer.attention.self.value.weight[3 * 8:4 * 8] *= 1000
        layer.intermediate.dense.weight[21] *= 1000
    return model


def test_bert_blocks_are_found_with_their_roles_and_sizes():
    torch.manual_seed(0)
    blocks = adapters.find_blocks(tiny_bert())
    assert [b.name for b in blocks] == [LAYER.format(0), LAYER.format(1)]
    b = blocks[1]
    assert (b.num_heads, b.num_kv_heads, b.head_dim, b.channels) == (4, 4, 8, 48)
    assert b.query.module == LAYER.format(1) + ".attention.self.query"
    assert b.attention_output.module == LAYER.format(1) + ".attention.output.dense"
    assert [s.module for s in b.ffn_in] == [LAYER.format(1) + ".intermediate.dense"]
    assert b.ffn_out.module == LAYER.format(1) + ".output.dense"
    parts = b.parts([1, 3], [5])
    assert parts[b.key.module][0] == "rows" and parts[b.key.module][1].tolist() == \
        list(range(8, 16)) + list(range(24, 32))  # no GQA: K/V heads are the query heads
    assert parts[b.attention_output.module][0] == "cols"
    assert parts[b.ffn_out.module][1].tolist() == [5]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_selects_on_bert(strategy):
    torch.manual_seed(0)
    model = planted_bert()
    calibration = [bert_batch(), bert_batch()]
    plan = adapters.select(model, heads=1, channels=1, strategy=strategy,
                           calibration=calibration, seed=3)
    entry = plan.blocks[LAYER.format(1)]
    assert plan.strategy == strategy and set(plan.blocks) == {LAYER.format(0), LAYER.format(1)}
    assert (entry["num_heads"], entry["num_kv_heads"], entry["num_channels"]) == (4, 4, 48)
    if strategy != "random":
        assert entry["heads"] == ([2] if strategy == "weight" else [3]), strategy
        assert entry["channels"] == [21], strategy
    assert all(p.requires_grad for p in model.parameters())  # gradient: flags restored
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bert_permuted_keeps_outputs_merges_and_unpermutes_exactly(strategy):
    torch.manual_seed(0)
    model = planted_bert(torch.float64)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = bert_batch()["input_ids"]
    before = logits(model, x)
    adapters.apply_adapters(model, "s2ft", heads=2, channels=5, strategy=strategy,
                            calibration=[bert_batch()], seed=1, permute=True, verbose=False)
    state = model._kronops
    assert set(state.permutations) == {LAYER.format(0), LAYER.format(1)}
    assert_close(logits(model, x), before, torch.float64, "permuted logits at init")
    layer = model.bert.encoder.layer[1]
    assert layer.attention.self.query.selection() == range(0, 16)  # selected heads first
    assert layer.attention.output.dense.selection() == range(0, 16)
    assert layer.intermediate.dense.selection() == range(0, 5)
    assert layer.output.dense.selection() == range(0, 5)
    heads = state.plan.blocks[LAYER.format(1)]["heads"]
    perm = state.permutations[LAYER.format(1)]  # biases move with their rows
    rows = [8 * h + i for h in perm["heads"] for i in range(8)]
    assert torch.equal(layer.attention.self.query.base.bias,
                       original[LAYER.format(1) + ".attention.self.query.bias"][rows])
    assert torch.equal(layer.intermediate.dense.base.bias,
                       original[LAYER.format(1) + ".intermediate.dense.bias"][perm["channels"]])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, S2FTLinear):
                m.delta.normal_(std=0.1)
    adapted = logits(model, x)
    adapters.merge_adapters(model)
    assert_close(logits(model, x), adapted, torch.float64, "merged")
    adapters.unmerge_adapters(model)
    adapters.unpermute(model)
    assert state.permutations == {}
    assert_close(logits(model, x), adapted, torch.float64, "unpermuted")
    for name, value in model.state_dict().items():
        key = name.replace(".base.", ".")
        if key in original:
            assert torch.equal(value, original[key]), name
    assert layer.attention.self.query.indices().tolist() == \
        [8 * h + i for h in heads for i in range(8)]
    adapters.merge_adapters(model, unload=True)
    assert_close(logits(model, x), adapted, torch.float64, "unloaded")


@pytest.mark.parametrize("permute", [False, True])
def test_bert_inplace_save_load_into_a_fresh_model(permute, tmp_path):
    torch.manual_seed(0)
    model = planted_bert()
    fresh = copy.deepcopy(model)
    adapters.apply_adapters(model, "s2ft", heads=1, channels=4, strategy="weight", mode="inplace",
                            permute=permute, train_modules=["classifier"], verbose=False)
    opt = s2ft.InPlaceAdamW(model, lr=0.01)
    head = torch.optim.SGD(model.classifier.parameters(), lr=0.1)
    for _ in range(2):
        model(**bert_batch()).loss.backward()
        opt.step()
        head.step()
        opt.zero_grad()
        head.zero_grad()
    x = bert_batch()["input_ids"]
    trained = logits(model, x)
    adapters.save_adapters(model, tmp_path / "bert.safetensors")
    adapters.load_adapters(fresh, tmp_path / "bert.safetensors")
    assert isinstance(fresh.bert.encoder.layer[1].output.dense, S2FTInPlaceLinear)
    assert fresh._kronops.plan == model._kronops.plan and fresh._kronops.mode == "inplace"
    assert_close(logits(fresh, x), trained, torch.float32, "loaded in-place BERT")
    if not permute:
        assert torch.equal(logits(fresh, x), trained)
