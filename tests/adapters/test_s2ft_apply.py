"""apply_adapters(model, "s2ft", plan=...) on a tiny GQA LLaMA: identical outputs, what is
trainable, permutation undo, save/load/merge, and plans or files that do not fit."""
import copy
import json

import pytest
import torch
from conftest import assert_close
from models import llama_batch, tiny_llama
from s2ft_plans import apply_s2ft, gqa_plan

from kronops import adapters, s2ft
from kronops.adapters.fileformat import checksum
from kronops.s2ft.modules import S2FTInPlaceLinear, S2FTLinear

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rewrite(path, tensors):
    """Write ``tensors`` to the adapter file ``path`` under its config (checksum updated)."""
    from safetensors.torch import save_file
    _, config = adapters.read_adapters(path)
    config["tensors"] = {k: dict(shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""))
                         for k, t in tensors.items()}
    config["sha256"] = checksum(config, tensors)
    save_file(tensors, path, metadata={"kronops": json.dumps(config)})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["adapter", "inplace"])
@pytest.mark.parametrize("permute", [False, True])
def test_outputs_unchanged_and_only_selection_trainable(mode, permute):
    model = tiny_llama(torch.float64)
    ids = llama_batch()["input_ids"]
    before = logits(model, ids)
    apply_s2ft(model, gqa_plan(model), mode=mode, permute=permute)
    after = logits(model, ids)
    if permute:  # permuted sums round differently
        assert_close(after, before, torch.float64, "logits after apply")
    else:
        assert torch.equal(after, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layer_type = S2FTLinear if mode == "adapter" else S2FTInPlaceLinear
    layers = {n: m for n, m in model.named_modules() if isinstance(m, layer_type)}
    assert trainable == {f"{n}.{'delta' if mode == 'adapter' else 'selected'}" for n in layers}
    assert len(layers) == 14
    model(**llama_batch()).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    for name, layer in layers.items():  # compact gradients of the selection, and real ones
        grad, weight = layer.delta.grad, layer.base.weight
        count = layer.indices().numel()
        compact = (weight.shape[0], count) if layer.mode == "cols" else (count, weight.shape[1])
        assert weight.grad is None and grad.shape == compact, name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert sum(m.delta.grad.numel() for m in layers.values()) < \
        sum(m.base.weight.numel() for m in layers.values()) / 2


def test_gqa_mapping_of_heads():
    model = tiny_llama()
    apply_s2ft(model, gqa_plan(model))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    heads = torch.tensor([1, 3, 5])
    q_rows = (heads[:, None] * 8 + torch.arange(8)).flatten()
    assert torch.equal(attn.q_proj.indices(), q_rows)
    assert torch.equal(attn.o_proj.indices(), q_rows) and attn.o_proj.mode == "cols"
    assert attn.k_proj.selection() == range(0, 16)  # heads 1 (group 0), 3 and 5 (group 1)
    assert attn.v_proj.selection() == range(0, 16)
    assert torch.equal(mlp.gate_proj.indices(), torch.tensor([0, 7, 8, 39]))
    assert mlp.down_proj.mode == "cols"
    layer1 = model.model.layers[1].self_attn
    assert layer1.q_proj.selection() == range(16, 24)
    assert layer1.k_proj.selection() == range(0, 8)  # head 2 is in group 0 (heads 0-2)


def test_permute_makes_selections_contiguous_and_undo_is_exact():
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_s2ft(model, gqa_plan(model), permute=True)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.selection() == range(0, 4) and mlp.down_proj.selection() == range(0, 4)
    q = model.model.layers[1].self_attn.q_proj
    assert q.selection() == range(0, 8)
    # layer 0: head 1 alone in group 0, heads 3 and 5 in group 1 -> two runs
    assert torch.equal(model.model.layers[0].self_attn.q_proj.indices(),
                       torch.cat([torch.arange(0, 8), torch.arange(24, 40)]))
    adapters.unpermute(model)
    for name, value in model.state_dict().items():
        key = name.replace(".base.", ".")
        if key in original:
            assert torch.equal(value, original[key]), name
    assert torch.equal(model.model.layers[0].self_attn.q_proj.indices(),
                       torch.tensor([8 * h + i for h in (1, 3, 5) for i in range(8)]))


@pytest.mark.parametrize("permute", [False, True])
def test_save_load_merge(permute, tmp_path):
    model = tiny_llama(torch.float64)
    untouched = copy.deepcopy(model)
    apply_s2ft(model, gqa_plan(model), permute=permute)
    for layer in model.modules():
        if isinstance(layer, S2FTLinear):
            with torch.no_grad():
                layer.delta.normal_(std=0.1)
    ids = llama_batch()["input_ids"]
    trained = logits(model, ids)
    adapters.save_adapters(model, tmp_path / "s2ft.safetensors")
    tensors, config = adapters.read_adapters(tmp_path / "s2ft.safetensors")
    assert config["mode"] == "adapter"
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    assert tensors["model.layers.0.self_attn.q_proj.rows"].tolist() == \
        [8 * h + i for h in (1, 3, 5) for i in range(8)]
    assert tensors["model.layers.0.mlp.down_proj.delta"].shape == (48, 4)
    assert sum(t.numel() for t in tensors.values()) < \
        sum(p.numel() for p in untouched.parameters()) / 5
    adapters.load_adapters(untouched, tmp_path / "s2ft.safetensors")
    assert_close(logits(untouched, ids), trained, torch.float64, "restored model")
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, S2FTLinear):
                layer.delta.zero_()
    adapters.load_adapters(model, tmp_path / "s2ft.safetensors")  # same (co-permuted) adapters
    assert torch.equal(logits(model, ids), trained)
    adapters.merge_adapters(model)
    assert_close(logits(model, ids), trained, torch.float64, "merged model")
    with pytest.raises(RuntimeError, match="already merged"):
        adapters.merge_adapters(model)
    adapters.unmerge_adapters(model)
    assert_close(logits(model, ids), trained, torch.float64, "unmerged model")


def test_inplace_file_is_the_trained_weights(tmp_path):
    model = tiny_llama()
    untouched = copy.deepcopy(model)
    apply_s2ft(model, gqa_plan(model), mode="inplace", permute=True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.base.weight[:4] += 1.0
    adapters.save_adapters(model, tmp_path / "inplace.safetensors")
    adapters.load_adapters(untouched, tmp_path / "inplace.safetensors")
    assert isinstance(untouched.model.layers[0].mlp.up_proj, S2FTInPlaceLinear)
    adapters.unpermute(model)
    trained = model.state_dict()
    for name, value in untouched.state_dict().items():
        if name.endswith(".weight") or name.endswith(".bias"):
            assert torch.equal(trained[name], value), name


@pytest.mark.parametrize("permute", [False, True])
def test_inplace_save_load_into_a_fresh_model_gives_identical_outputs(permute, tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    fresh = copy.deepcopy(model)
    apply_s2ft(model, gqa_plan(model), mode="inplace", permute=permute)
    opt = s2ft.InPlaceSGD(model, lr=0.5)
    for _ in range(2):
        model(**llama_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    ids = llama_batch()["input_ids"]
    trained = logits(model, ids)
    path = tmp_path / "inplace.safetensors"
    adapters.save_adapters(model, path)
    tensors, config = adapters.read_adapters(path)
    assert config["mode"] == "inplace" and config["format_version"] == 3
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (48, 4)
    assert not any(k.endswith(".delta") for k in tensors)
    adapters.load_adapters(fresh, path)
    assert fresh._kronops.mode == "inplace" and fresh._kronops.permutations == {}
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {f"{n}.selected" for n, m in fresh.named_modules() if isinstance(m, S2FTInPlaceLinear)}
    if permute:  # permuted sums round differently
        assert_close(logits(fresh, ids), trained, torch.float32, "loaded in-place model")
    else:
        assert torch.equal(logits(fresh, ids), trained)
    adapters.load_adapters(model, path)  # into the identically adapted (co-permuted) model
    assert torch.equal(logits(model, ids), trained)


def test_plan_for_another_model_is_rejected():
    model = tiny_llama()
    plan = adapters.select(tiny_llama(layers=3), heads=1, channels=1)
    with pytest.raises(ValueError, match="plan names block 'model.layers.2'"):
        apply_s2ft(model, plan)
    plan = adapters.select(model, heads=1, channels=1)
    plan.blocks["model.layers.0"]["num_kv_heads"] = 3
    with pytest.raises(ValueError, match="num_kv_heads is 3 in the plan, 2 in the model"):
        apply_s2ft(model, plan)
    plan = adapters.select(model, heads=1, channels=1)
    plan.blocks["model.layers.1"]["channels"] = [3, 40]
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 40\), got values from 3 "):
        apply_s2ft(model, plan)
    plan.blocks["model.layers.1"]["channels"] = [3, 3]
    with pytest.raises(ValueError, match=r"channels must be sorted and unique"):
        apply_s2ft(model, plan)
    plan.blocks["model.layers.1"]["channels"] = [3, True]
    with pytest.raises(TypeError, match=r"channels must be a list of ints"):
        apply_s2ft(model, plan)
    with pytest.raises(TypeError, match="plan must be a kronops.adapters.Plan"):
        apply_s2ft(model, plan.blocks)
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_s2ft(model, adapters.select(model, heads=1), mode="lora")


@pytest.mark.parametrize("config, error, match", [
    (dict(heads=1), ValueError, "give it or ratio, .* not both"),
    (dict(mode="inplace", delta_dtype=torch.float64), ValueError, "delta_dtype applies to"),
    (dict(delta_dtype=torch.int8), TypeError, "delta_dtype must be a floating-point"),
    (dict(permute=1), TypeError, "permute must be a bool"),
])
def test_bad_s2ft_options_change_nothing(config, error, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        apply_s2ft(model, adapters.select(model, heads=1, channels=1), **config)
    assert not hasattr(model, "_kronops") and not adapters.adapter_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_apply_twice_and_bad_files(tmp_path):
    model = tiny_llama()
    apply_s2ft(model, adapters.select(model, heads=1, channels=1))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_s2ft(model, adapters.select(model, heads=1, channels=1))
    path = tmp_path / "s2ft.safetensors"
    adapters.save_adapters(model, path)
    tensors, _ = adapters.read_adapters(path)
    rewrite(path, {k.replace("layers.0", "layers.9"): v for k, v in tensors.items()})
    with pytest.raises(ValueError, match="layer 'model.layers.9.[a-z_.]+' is not a module"):
        adapters.load_adapters(tiny_llama(), path)
    wrong = dict(tensors)
    wrong["model.layers.0.mlp.up_proj.delta"] = torch.zeros(2, 48)
    rewrite(path, wrong)
    with pytest.raises(ValueError, match="values of shape"):
        adapters.load_adapters(tiny_llama(), path)
    with pytest.raises(ValueError, match="no kronops adapters"):
        adapters.save_adapters(tiny_llama(), path)


def test_load_rejects_repeated_indices(tmp_path):
    model = tiny_llama()
    apply_s2ft(model, adapters.select(model, heads=1, channels=2))
    path = tmp_path / "s2ft.safetensors"
    adapters.save_adapters(model, path)
    tensors, _ = adapters.read_adapters(path)
    tensors["model.layers.0.mlp.up_proj.rows"] = torch.tensor([5, 5])
    rewrite(path, tensors)
    untouched = tiny_llama()
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(ValueError, match="up_proj.rows differs from the selection plan"):
        adapters.load_adapters(untouched, path)
    for name, value in untouched.state_dict().items():  # nothing applied, not even in part
        assert torch.equal(value, before[name]), name
    assert not hasattr(untouched, "_kronops")


def test_permute_with_biases_keeps_outputs_and_undoes_exactly():
    """Qwen-style q/k/v (and MLP) biases move with their rows."""
    model = tiny_llama(torch.float64, bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = llama_batch()["input_ids"]
    before = logits(model, ids)
    apply_s2ft(model, gqa_plan(model), permute=True)
    assert_close(logits(model, ids), before, torch.float64, "permuted logits")
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base.bias,
                           original["model.layers.0.self_attn.q_proj.bias"])
    adapters.unpermute(model)
    for name, value in model.state_dict().items():
        key = name.replace(".base.", ".")
        if key in original:
            assert torch.equal(value, original[key]), name


def test_permute_and_unpermute_with_four_kv_heads_a_later_group_selected(tmp_path):
    """12 query heads on 4 K/V heads (groups of 3): selecting heads of K/V groups 1 and 3
    orders the K/V heads [1, 3, 0, 2], whose inverse [2, 0, 3, 1] differs from it (every
    2-K/V-head model's order is its own inverse, hiding an unpermute that used the forward
    order). unpermute must restore every weight bit for bit; outputs stay equal throughout."""
    from models import llama_12_heads
    torch.manual_seed(0)
    model = llama_12_heads(2, torch.float64)
    fresh = copy.deepcopy(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = llama_batch()["input_ids"]
    before = logits(model, ids)
    plan = adapters.select(model, heads=3, channels=4, seed=0)
    plan.blocks["model.layers.0"]["heads"] = [4, 9, 11]  # groups 1 and 3
    plan.blocks["model.layers.1"]["heads"] = [10]        # group 3 alone
    apply_s2ft(model, plan, permute=True)
    perms = model._kronops.permutations
    assert perms["model.layers.0"]["kv_heads"] == [1, 3, 0, 2]
    assert perms["model.layers.1"]["kv_heads"] == [3, 0, 1, 2]
    assert perms["model.layers.0"]["heads"][:6] == [4, 3, 5, 9, 11, 10]
    assert_close(logits(model, ids), before, torch.float64, "permuted logits")
    k = model.model.layers[0].self_attn.k_proj
    assert k.selection() == range(0, 8)  # K/V heads 1 and 3 now first
    k_weight = original["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(k.base.weight[4:8], k_weight[12:16])
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, S2FTLinear):
                layer.delta.normal_(std=0.1)
    adapted = logits(model, ids)
    adapters.save_adapters(model, tmp_path / "gqa.safetensors")
    adapters.load_adapters(fresh, tmp_path / "gqa.safetensors")  # original layout
    assert_close(logits(fresh, ids), adapted, torch.float64, "loaded into an unpermuted model")
    adapters.unpermute(model)
    assert model._kronops.permutations == {}
    for name, value in model.state_dict().items():
        key = name.replace(".base.", ".")
        if key in original:
            assert torch.equal(value, original[key]), name
    assert_close(logits(model, ids), adapted, torch.float64, "unpermuted logits")
    for name, layer in model.named_modules():  # the same layers as the unpermuted load made
        if isinstance(layer, S2FTLinear):
            other = fresh.get_submodule(name)
            assert torch.equal(layer.indices(), other.indices()), name
            assert torch.equal(layer.delta, other.delta), name
    adapters.merge_adapters(model, unload=True)
    assert_close(logits(model, ids), adapted, torch.float64, "unloaded")
