"""Every supported model family x every method, on tiny models of transformers' own classes.

Per family (``models.FAMILIES``) and method (krona, krona_block, s2ft): at initialisation
the adapted model gives the base model's outputs; one optimizer step changes them; saving
and loading into a fresh model gives identical outputs; merging (where the method allows)
keeps them. S²FT co-permutation is checked against the unpermuted model, which checks the
per-family weight layouts (fused q/k/v, fused gate/up, Conv1D): a wrong layout changes the
function. fp64 throughout: the tolerance is ``TOLERANCE[float64]`` (1e-10 relative).
"""
import copy
import re
from pathlib import Path

import pytest
import torch
from models import FAMILIES, build, family_batch, family_logits

from conftest import assert_close
import kronops
from kronops import adapters
from kronops.adapters import KronASublayer
from kronops.wrapped_linear import out_in_weight

F64 = torch.float64
METHODS = {"krona": dict(), "krona_block": dict(residual=True), "s2ft": dict(ratio=0.3, seed=3)}


def _train_step(model, family, optimizer):
    out = family_logits(model, family)
    (out.square().mean()).backward()
    optimizer.step()
    optimizer.zero_grad()


def _adam(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                             weight_decay=0.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_method_round_trip(family, method, tmp_path):
    base = build(family)
    reference = family_logits(base, family)
    model = kronops.apply_adapters(copy.deepcopy(base), method, **METHODS[method])
    layers = adapters.adapter_modules(model)
    assert layers
    assert_close(family_logits(model, family), reference, F64, "at initialisation")
    _train_step(model, family, _adam(model))
    trained = family_logits(model, family)
    assert (trained - reference).abs().max() > 1e-6, "a training step changed nothing"
    path = tmp_path / "adapters.safetensors"
    kronops.save_adapters(model, path)
    fresh = kronops.load_adapters(copy.deepcopy(base), path)
    assert torch.equal(family_logits(fresh, family), trained)
    if method == "krona_block":
        with pytest.raises(ValueError, match="cannot be merged"):
            kronops.merge_adapters(model)
        return
    kronops.merge_adapters(fresh, unload=True)
    assert not adapters.adapter_modules(fresh)
    assert_close(family_logits(fresh, family), trained, F64, "merged")


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_every_block_projection(family):
    model = build(family)
    blocks = adapters.find_blocks(model)
    kronops.apply_adapters(model, "krona")
    wrapped = set(adapters.adapter_modules(model))
    assert wrapped == {n for b in blocks for n in b.modules}
    assert not any(n.endswith("lm_head") for n in wrapped)
    encoder_decoder = FAMILIES[family][3]
    per_layer = {"t5": 4 + 4 + 2, "mt5": 4 + 4 + 3, "bart": 4 + 4 + 2}
    if encoder_decoder:  # decoder layers also adapt cross-attention
        decoder = [n for n in wrapped if re.search(r"decoder\.(block|layers)\.0\.", n)]
        assert len(decoder) == per_layer[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_s2ft_copermutation_trains_the_same_model(family):
    """Co-permuted and plain S²FT of the same plan, one identical SGD step: same outputs.
    Wrong rows for a head (a fused layout misread) would break this."""
    base = build(family)
    plan = adapters.select(base, heads=0.4, channels=0.3, seed=5)
    models = [kronops.apply_adapters(copy.deepcopy(base), "s2ft", plan=plan, permute=p)
              for p in (False, True)]
    assert_close(family_logits(models[1], family), family_logits(base, family), F64, "permuted at init")
    for model in models:
        _train_step(model, family, torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.5))
    assert_close(family_logits(models[1], family), family_logits(models[0], family), F64, "trained")
    adapters.unpermute(models[1])
    assert_close(family_logits(models[1], family), family_logits(models[0], family), F64, "unpermuted")


@pytest.mark.parametrize("family", ["gpt2", "phi3", "t5", "falcon_grouped"])
def test_s2ft_inplace_trains_the_selected_rows_of_fused_and_conv1d_weights(family):
    """In-place S²FT updates exactly the plan's rows/columns of each weight, through
    Conv1D's transposed view and inside fused projections; it matches adapter mode."""
    base = build(family)
    plan = adapters.select(base, heads=0.4, channels=0.3, seed=2)
    inplace = kronops.apply_adapters(copy.deepcopy(base), "s2ft", plan=plan, mode="inplace")
    adapter = kronops.apply_adapters(copy.deepcopy(base), "s2ft", plan=plan, delta_dtype=F64)
    _train_step(inplace, family, kronops.InPlaceSGD(inplace, lr=0.5))
    _train_step(adapter, family, torch.optim.SGD(
        [p for p in adapter.parameters() if p.requires_grad], lr=0.5))
    assert_close(family_logits(inplace, family), family_logits(adapter, family), F64, "in place vs adapter")
    parts = {n: p for b in adapters.find_blocks(base) for n, p in
             b.parts(plan.blocks[b.name]["heads"], plan.blocks[b.name]["channels"]).items()}
    kronops.merge_adapters(inplace, unload=True)
    before, after = dict(base.named_parameters()), dict(inplace.named_parameters())
    for name, (side, rows) in parts.items():
        w0 = out_in_weight(base.get_submodule(name))
        w1 = out_in_weight(inplace.get_submodule(name))
        changed = (w1 != w0).any(1 if side == "rows" else 0).nonzero().flatten()
        assert set(changed.tolist()) <= set(rows.tolist()), name
        assert changed.numel() > 0, name
    untouched = [n for n in before if not any(n.startswith(m + ".") for m in parts)]
    assert all(torch.equal(before[n], after[n]) for n in untouched)


@pytest.mark.parametrize("family", ["t5", "bloom"])
def test_heads_with_their_own_position_state_stay_in_place_and_channels_move(family):
    """T5's relative position bias (per head, shared by all layers) and BLOOM's ALiBi slopes:
    heads are not co-permuted (the function would change), FFN channels are."""
    base = build(family)
    blocks = adapters.find_blocks(base)
    assert not any(b.permutable_heads for b in blocks)
    plan = adapters.select(base, heads=2, channels=3, seed=1)
    model = kronops.apply_adapters(copy.deepcopy(base), "s2ft", plan=plan, permute=True)
    perms = model._kronops.permutations
    assert all(p["heads"] == list(range(4)) for p in perms.values())
    assert any(p["channels"] != sorted(p["channels"]) for p in perms.values())
    assert_close(family_logits(model, family), family_logits(base, family), F64, "permuted channels")


def test_cross_attention_is_a_heads_only_block():
    blocks = {b.name: b for b in adapters.find_blocks(build("bart"))}
    cross = blocks["model.decoder.layers.0.encoder_attn"]
    assert (cross.channels, cross.ffn_in, cross.ffn_out) == (0, (), None)
    assert cross.query.module == "model.decoder.layers.0.encoder_attn.q_proj"
    plan = adapters.select(build("bart"), heads=1, channels=2)
    assert plan.blocks[cross.name] == dict(heads=plan.blocks[cross.name]["heads"], channels=[],
                                           num_heads=4, num_kv_heads=4, head_dim=8,
                                           num_channels=0)
    assert all(len(e["channels"]) == 2 for n, e in plan.blocks.items() if n != cross.name
               and not n.endswith("encoder_attn"))


def test_fused_layouts_name_the_rows_of_each_head():
    phi3, neox = (adapters.find_blocks(build(f))[0] for f in ("phi3", "gpt_neox"))
    # Phi-3 qkv_proj: [4 q heads; 2 k heads; 2 v heads] of 8 rows; query head 3 reads K/V 1.
    rows = phi3.parts([3], [])["model.layers.0.self_attn.qkv_proj"][1].tolist()
    assert rows == list(range(24, 32)) + list(range(40, 48)) + list(range(56, 64))
    gate_up = phi3.parts([], [5])["model.layers.0.mlp.gate_up_proj"][1].tolist()
    assert gate_up == [5, 45]
    # GPT-NeoX query_key_value: per head [q; k; v].
    rows = neox.parts([1], [])["gpt_neox.layers.0.attention.query_key_value"][1].tolist()
    assert rows == list(range(24, 48))


def test_weight_scores_read_fused_and_conv1d_layouts():
    """A head (channel) whose weights are made large is the one strategy="weight" picks:
    GPT-2's q columns of the stored (in, out) c_attn, Phi-3's rows inside qkv_proj and the
    up half of gate_up_proj."""
    gpt2, phi3 = build("gpt2"), build("phi3")
    with torch.no_grad():
        for block in gpt2.transformer.h:
            block.attn.c_attn.weight[:, 16:24] *= 100      # query head 2 of 4 (8 wide)
            block.mlp.c_fc.weight[:, 7] *= 100             # channel 7
        for layer in phi3.model.layers:
            layer.self_attn.qkv_proj.weight[24:32] *= 100  # query head 3
            layer.mlp.gate_up_proj.weight[40 + 5] *= 100   # channel 5 (up half)
    for model, family, head, channel in ((gpt2, "gpt2", 2, 7), (phi3, "phi3", 3, 5)):
        plan = adapters.select(model, heads=1, channels=1, strategy="weight")
        assert all(e["heads"] == [head] and e["channels"] == [channel]
                   for e in plan.blocks.values()), (family, plan.blocks)


def _conv1d(in_features, out_features):
    from transformers.pytorch_utils import Conv1D
    layer = Conv1D(out_features, in_features).to(F64)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("residual", [False, True])
def test_krona_sublayer_matches_the_materialised_formula(residual):
    """base(h) + s * x @ kron(A, B).T (+ s_res * x), x the input of the source layer, on 3-D
    inputs, with nonzero factors; a Conv1D output projection as GPT-2 has."""
    source, base = torch.nn.Linear(12, 20).to(F64), _conv1d(20, 12)
    layer = KronASublayer(base, source, residual=residual, a_shape=(3, 4), rank=2, alpha=3.0)
    with torch.no_grad():
        layer.b.normal_()
        if residual:
            layer.residual_scale.fill_(0.7)
    x = torch.randn(2, 5, 12, dtype=F64)
    h = torch.relu(source(x))  # the sub-layer's inside: not linear
    out = layer(h)
    delta = (3.0 / 2) * torch.kron(layer.a_u @ layer.a_v, layer.b)
    ref = h @ base.weight + base.bias + x @ delta.T + (0.7 * x if residual else 0)
    assert_close(out, ref, F64, "KronASublayer")
    with pytest.raises(RuntimeError, match="first projection did not run"):
        layer(h)  # the input was consumed: a second call without the source raises


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_conv1d_adapters_match_the_materialised_weight(mode):
    """KronALinear and S2FTLinear over a Conv1D (weight stored (in, out)) equal the naive
    products on its (out, in) view; merging writes the update into the stored weight."""
    conv = _conv1d(12, 20)
    weight = conv.weight.detach().T.clone()  # (out, in)
    x = torch.randn(3, 4, 12, dtype=F64)
    krona = kronops.KronALinear(conv, a_shape=(4, 3))
    with torch.no_grad():
        krona.b.normal_()
    delta = krona.delta_weight()
    assert_close(krona(x), x @ (weight + delta).T + conv.bias, F64, "KronALinear(Conv1D)")
    krona.merge()
    assert_close(conv.weight.T, weight + delta, F64, "merged Conv1D weight")
    krona.unmerge()
    conv = krona.base
    index = torch.tensor([1, 4, 5, 9])
    s2ft = kronops.S2FTLinear(conv, **{mode: index}, delta_dtype=F64)
    with torch.no_grad():
        s2ft.delta.normal_()
    full = weight.clone()
    if mode == "rows":
        full[index] += s2ft.delta.detach()
    else:
        full[:, index] += s2ft.delta.detach()
    assert_close(s2ft(x), x @ full.T + conv.bias, F64, "S2FTLinear(Conv1D)")


def test_krona_block_generates_and_its_input_comes_from_the_sublayer():
    model = kronops.apply_adapters(build("t5"), "krona_block", rank=2)
    layer = adapters.adapter_modules(model)["decoder.block.0.layer.1.EncDecAttention.o"]
    assert isinstance(layer, KronASublayer) and layer.residual_scale is None
    with torch.no_grad():
        for m in adapters.adapter_modules(model).values():
            m.b.normal_()
    out = model.generate(**{k: v for k, v in family_batch("t5").items() if k == "input_ids"},
                         max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2
    with pytest.raises(RuntimeError, match="first projection did not run"):
        layer(torch.randn(2, 32, dtype=F64))
    with adapters.disable_adapters(model):  # (frozen weights: other kernels, last bits)
        assert_close(family_logits(model, "t5"), family_logits(build("t5"), "t5"), F64, "disabled")
    assert (family_logits(model, "t5") - family_logits(build("t5"), "t5")).abs().max() > 1e-6


def test_krona_block_refusals():
    with pytest.raises(ValueError, match="target_modules must be None"):
        kronops.apply_adapters(build("llama"), "krona_block", target_modules=["o_proj"])
    with pytest.raises(TypeError, match="unknown config.*dropout"):
        kronops.apply_adapters(build("llama"), "krona_block", dropout=0.1)
    with pytest.raises(ValueError, match="residual needs"):
        KronASublayer(torch.nn.Linear(8, 6), torch.nn.Linear(8, 4), residual=True)
    model = kronops.apply_adapters(build("gpt2"), "krona_block")
    with pytest.raises(ValueError, match="cannot be merged"):
        kronops.merge_adapters(model, unload=True)
    assert adapters.adapter_modules(model)


def test_a_krona_block_file_does_not_load_into_another_architecture(tmp_path):
    model = kronops.apply_adapters(build("llama"), "krona_block")
    kronops.save_adapters(model, tmp_path / "a.safetensors")
    other = build("gpt_neox")
    with pytest.raises(adapters.AdapterFileError, match="sub-layer output module"):
        kronops.load_adapters(other, tmp_path / "a.safetensors")
    assert not adapters.adapter_modules(other)


def test_gpt2_cross_attention_is_refused_clearly():
    config = dict(FAMILIES["gpt2"][2], add_cross_attention=True)
    import transformers
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    with pytest.raises(ValueError, match="crossattention: a GPT-2-style cross-attention"):
        adapters.find_blocks(model)


def test_readme_lists_the_tested_families():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Supported model families", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M))
    assert listed == set(FAMILIES)
