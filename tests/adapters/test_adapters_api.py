"""The model-level API as users meet it: adapters follow the model's train/eval mode (apply,
load, from_peft); apply_adapters returns the model and prints nothing; trainable_parameters;
disable_adapters; the S²FT default selection; errors that name the argument and say what
would work; in-place S²FT refused clearly by torch.optim optimizers."""
import copy
import re

import pytest
import torch
from torch import nn
from models import ids, randomize_b, tiny_bert, tiny_llama

import kronops
from kronops import KronALinear, S2FTInPlaceLinear, S2FTLinear
from kronops.adapters import (DEFAULT_S2FT_RATIO, AdapterSummary, adapter_modules,
                              apply_adapters, disable_adapters, load_adapters,
                              merge_adapters, save_adapters, trainable_parameters,
                              unmerge_adapters)

CONFIG = {"krona": dict(rank=2, dropout=0.5), "s2ft": dict(heads=2, channels=5, seed=1)}


def train_adapters(model):
    """Nonzero adapters (their start values change nothing)."""
    randomize_b(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, S2FTLinear) and not isinstance(m, S2FTInPlaceLinear):
                m.delta.normal_(std=0.1)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# -- 1a: adapters follow the mode of what they wrap ---------------------------------------

@pytest.mark.parametrize("method", ["krona", "s2ft"])
def test_adapters_added_to_an_eval_model_are_in_eval_mode(method):
    torch.manual_seed(0)
    model = tiny_llama()  # eval(), as from_pretrained returns it
    apply_adapters(model, method, **CONFIG[method])
    assert [n for n, m in model.named_modules() if m.training] == []
    train_adapters(model)
    x = ids()
    assert torch.equal(logits(model, x), logits(model, x))  # dropout 0.5 does not run
    model.train()
    assert all(m.training for m in model.modules())
    if method == "krona":  # and in training mode dropout does run
        assert not torch.equal(logits(model, x), logits(model, x))
    torch.manual_seed(0)
    training = tiny_llama().train()
    apply_adapters(training, method, **CONFIG[method])
    assert all(m.training for m in training.modules())


@pytest.mark.parametrize("method", ["krona", "s2ft"])
def test_loading_for_inference_keeps_eval_mode(method, tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().train()
    fresh = copy.deepcopy(model).eval()
    apply_adapters(model, method, **CONFIG[method])
    train_adapters(model)
    save_adapters(model, tmp_path / "a.safetensors")
    load_adapters(fresh, tmp_path / "a.safetensors")
    assert [n for n, m in fresh.named_modules() if m.training] == []
    x = ids()
    assert torch.equal(logits(fresh, x), logits(fresh, x))
    assert torch.equal(logits(fresh, x), logits(model.eval(), x))


def test_from_peft_keeps_the_peft_layers_mode():
    peft = pytest.importorskip("peft")
    from kronops.adapters.peft import from_peft
    torch.manual_seed(0)
    config = peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"],
                             init_weights=False)
    inner = from_peft(peft.get_peft_model(tiny_llama(), config).eval())
    layers = [m for m in inner.modules() if isinstance(m, KronALinear)]
    assert len(layers) == 4 and not any(m.training for m in inner.modules())
    inner = from_peft(peft.get_peft_model(tiny_llama(), config).train())
    assert all(m.training for m in inner.modules())


# -- 4: apply returns the model; the summary on request -----------------------------------

def test_apply_returns_the_model_and_the_summary_is_on_request(capsys, tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    model = kronops.apply_adapters(model, "krona", rank=2)  # PEFT's get_peft_model idiom
    assert isinstance(model, nn.Module)
    kronops.save_adapters(model, tmp_path / "a.safetensors")  # the next call just works
    assert capsys.readouterr().out == ""
    summary = kronops.trainable_parameters(model)
    assert isinstance(summary, AdapterSummary) and kronops.AdapterSummary is AdapterSummary
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert len(summary.modules) == 14 and summary.method == "krona"
    print(summary)
    assert capsys.readouterr().out.startswith("kronops krona: 14 adapter module(s); trainable "
                                              f"params {summary.trainable:,} of ")
    torch.manual_seed(0)  # the same base: no BaseMismatchWarning
    fresh = kronops.load_adapters(tiny_llama(), tmp_path / "a.safetensors")
    assert trainable_parameters(fresh) == summary


# -- 4: disable_adapters ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["krona", "s2ft"])
def test_disable_adapters_gives_the_base_outputs_and_restores(method):
    torch.manual_seed(0)
    base = tiny_llama()
    model = train_adapters(apply_adapters(copy.deepcopy(base), method, **CONFIG[method]))
    x = ids()
    plain, adapted = logits(base, x), logits(model, x)
    assert not torch.equal(plain, adapted)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with kronops.disable_adapters(model) as same:
        assert same is model
        assert torch.equal(logits(model, x), plain)  # the very same base computation
        with disable_adapters(model):  # nesting is harmless
            assert torch.equal(logits(model, x), plain)
        assert torch.equal(logits(model, x), plain)
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # no unmerge
    assert torch.equal(logits(model, x), adapted)
    with pytest.raises(KeyError, match="boom"):
        with disable_adapters(model):
            raise KeyError("boom")
    assert torch.equal(logits(model, x), adapted)  # restored after an exception too
    assert all("forward" not in vars(m) for m in adapter_modules(model).values())


def test_disable_adapters_refuses_what_it_cannot_do():
    torch.manual_seed(0)
    model = train_adapters(apply_adapters(tiny_llama(), rank=2))
    merge_adapters(model)
    with pytest.raises(ValueError, match="merged.*unmerge_adapters"):
        with disable_adapters(model):
            pass
    unmerge_adapters(model)
    inplace = apply_adapters(tiny_llama(), "s2ft", heads=1, channels=2, mode="inplace")
    with pytest.raises(ValueError, match="in-place S²FT layers .* train the weights themselves"):
        with disable_adapters(inplace):
            pass
    with pytest.raises(ValueError, match="no kronops adapter layers"):
        with disable_adapters(tiny_llama()):
            pass


# -- 4: the S²FT default selection --------------------------------------------------------

@pytest.mark.parametrize("build, heads, channels", [
    (tiny_llama, 1, 4),  # 12 heads, 80 channels: 0.6 -> 1, 4.0 -> 4
    (tiny_bert, 1, 5),   # 8 heads, 96 channels: 0.4 -> 1 (at least one), 4.8 -> 5
])
def test_s2ft_without_a_selection_uses_the_default_ratio(build, heads, channels):
    torch.manual_seed(0)
    assert DEFAULT_S2FT_RATIO == 0.05
    model = apply_adapters(build(), "s2ft")
    plan = model._kronops.plan
    assert sum(len(b["heads"]) for b in plan.blocks.values()) == heads
    assert sum(len(b["channels"]) for b in plan.blocks.values()) == channels
    assert plan.strategy == "random"
    only_heads = apply_adapters(build(), "s2ft", heads=1)._kronops.plan
    assert all(b["channels"] == [] for b in only_heads.blocks.values())


# -- 3: errors that name the argument -----------------------------------------------------

def test_unknown_architecture_says_what_the_model_is_and_how_to_pass_targets():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"no default target modules for Sequential "
                                         r"\(no model.config\).*pass target_modules.*"
                                         r"target_modules=\['0', '2'\]"):
        apply_adapters(model)
    assert not adapter_modules(model)
    apply_adapters(model, target_modules=["0", "2"], a_shape=(4, 2))
    assert set(adapter_modules(model)) == {"0", "2"}
    with pytest.raises(ValueError, match="no default target modules for ReLU .*no nn.Linear"):
        apply_adapters(nn.ReLU())


def test_a_target_that_is_not_a_linear_says_what_it_is():
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"target_modules entry 'self_attn' names "
                                        r"'model.layers.0.self_attn' \(and 1 more\), a "
                                        r"LlamaAttention, not an nn.Linear.*e.g. "
                                        r"'self_attn.q_proj'"):
        apply_adapters(model, target_modules=["q_proj", "self_attn"])
    with pytest.raises(TypeError, match=r"'model\\\\.layers\\\\.0\\\\.mlp' names "
                                        r"'model.layers.0.mlp', a LlamaMLP, not an nn.Linear"):
        apply_adapters(model, target_modules=r"model\.layers\.0\.mlp")
    with pytest.raises(TypeError, match=r"'act_fn'.*a SiLU.*it holds no linear layer"):
        apply_adapters(model, target_modules=["act_fn"])
    with pytest.raises(ValueError, match="'qkv' matches no candidate module"):
        apply_adapters(model, target_modules=["qkv"])  # nothing of that name at all
    assert not adapter_modules(model)


def test_a_rank_too_large_says_which_rank_or_a_shape_works():
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape(
            "model.layers.0.self_attn.q_proj: rank 7 exceeds min(a1, a2) = 6 for a_shape "
            "(6, 6) (48x48 weight); use rank <= 6, or an a_shape (a1, a2) with a1 dividing 48, "
            "a2 dividing 48 and both >= 7, e.g. a_shape=(8, 8)")):
        apply_adapters(model, rank=7)
    apply_adapters(model, target_modules=["q_proj"], rank=7, a_shape=(8, 8))  # which works
    with pytest.raises(ValueError, match=r"rank 20 .*use rank <= 4 \(no a_shape of this weight "
                                         r"allows rank 20: the largest possible is 16\)"):
        apply_adapters(tiny_llama(), target_modules=["k_proj"], rank=20)


@pytest.mark.parametrize("method", ["krona", "krona_block"])
@pytest.mark.parametrize("alpha", [-1, -0.5, 0, 0.0, float("nan"), float("inf"), -float("inf")])
def test_alpha_must_be_positive_and_finite(method, alpha):
    """A negative alpha flips the update's sign and 0 switches it off: almost surely a
    mistake, refused by name (as are NaN and infinities); the model is unchanged."""
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(f"alpha must be a positive finite number, "
                                                   f"got {alpha!r}")):
        apply_adapters(model, method, alpha=alpha)
    assert not adapter_modules(model) and not hasattr(model, "_kronops")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    apply_adapters(model, method, alpha=1e-3)  # small but positive is fine


@pytest.mark.parametrize("given", [dict(heads=1), dict(channels=2), dict(heads=0.1),
                                   dict(heads=1, channels=2)])
def test_ratio_with_heads_or_channels_is_refused_by_name(given):
    """ratio is the same fraction of heads and channels, heads/channels the explicit
    alternative: both at once is ambiguous, refused naming what was given."""
    model = tiny_llama()
    names = ", ".join(given)
    with pytest.raises(ValueError, match=re.escape(f"give ratio or heads/channels, not both "
                                                   f"(got ratio and {names})")):
        apply_adapters(model, "s2ft", ratio=0.1, **given)
    assert not adapter_modules(model) and not hasattr(model, "_kronops")
    apply_adapters(model, "s2ft", **given)  # each alone works


# -- 3: in-place S²FT with an ordinary torch optimizer ------------------------------------

@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.SGD, torch.optim.Adam])
def test_inplace_s2ft_with_a_torch_optimizer_fails_early_and_clearly(optimizer):
    torch.manual_seed(0)
    model = apply_adapters(tiny_llama(), "s2ft", heads=1, channels=2, mode="inplace",
                           train_modules=["lm_head"])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optimizer(model.parameters(), lr=0.1)  # what a user writes first
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(ValueError, match=rf"{optimizer.__name__} was given an S²FT in-place "
                                         r"parameter of shape .*Use "
                                         r"kronops\.InPlaceAdamW\(model\) or "
                                         r"kronops\.InPlaceSGD\(model\)"):
        opt.step()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # unchanged
    # what the message says to do works
    inplace = kronops.InPlaceAdamW(model, lr=0.01)
    others = torch.optim.AdamW([p for n, p in model.named_parameters()
                                if p.requires_grad and not n.endswith(".selected")], lr=0.01)
    inplace.step()
    others.step()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base.weight,
                           weights["model.layers.0.self_attn.q_proj.base.weight"])
    assert not torch.equal(model.lm_head.weight, weights["lm_head.weight"])


def test_optimizers_of_ordinary_parameters_are_not_bothered():
    torch.manual_seed(0)
    model = apply_adapters(tiny_llama(), "s2ft", heads=1, channels=2, mode="inplace")
    plain = nn.Linear(3, 2)
    opt = torch.optim.AdamW(plain.parameters())
    plain(torch.randn(4, 3)).sum().backward()
    for _ in range(2):
        opt.step()  # checked once, then cached
    opt.add_param_group({"params": [model.model.layers[0].self_attn.q_proj.selected]})
    with pytest.raises(ValueError, match="S²FT in-place parameter"):
        opt.step()  # a new group is checked again
