"""PEFT LoKr interop with the real peft package: conversion with identical outputs (full and
rank-decomposed factors, alpha/r), export to PEFT's state-dict layout, and the in-place patch."""
import copy

import pytest
import torch
from conftest import assert_close
from models import tiny_llama

peft = pytest.importorskip("peft")
from peft import LoKrConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402

from kronops import KronALinear  # noqa: E402
from kronops.adapters.apply import apply_adapters, merge_adapters  # noqa: E402
from kronops.adapters.peft import (LoKrLinear, from_peft, patch_peft_lokr,  # noqa: E402
                                  to_peft_state_dict, unpatch_peft_lokr)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (r, decompose_both) -> which PEFT factors are rank-decomposed, for the 48x48 / 16x48 / 40x48
# projections of tiny_llama (factors near sqrt: A (6, 6) or (4, 6) or (5, 6), B (8, 8) ...).
CASES = {"w2 low-rank": dict(r=2, decompose_both=False),
         "w1 and w2 low-rank": dict(r=2, decompose_both=True),
         "both full": dict(r=8, decompose_both=False)}


def lokr_model(r, decompose_both, alpha=3.0, dtype=torch.float64):
    base = tiny_llama(dtype)
    config = LoKrConfig(r=r, alpha=alpha, target_modules=TARGETS, decompose_both=decompose_both,
                        init_weights=False)  # random factors: a nonzero delta to compare
    return get_peft_model(base, config).eval()


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("case", list(CASES))
def test_from_peft_gives_identical_outputs(case):
    model = lokr_model(**CASES[case])
    x = torch.randint(0, 97, (2, 9))
    expected = logits(model, x)
    peft_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inner = from_peft(model)
    layers = [m for m in inner.modules() if isinstance(m, KronALinear)]
    assert len(layers) == 14
    assert all(isinstance(m, LoKrLinear) == (case != "both full") for m in layers)
    assert all(m.scale == 3.0 / CASES[case]["r"] for m in layers)
    assert not any("lokr" in n for n, _ in inner.named_parameters())
    assert_close(logits(inner, x), expected, torch.float64, "converted logits")
    assert sum(p.numel() for p in inner.parameters() if p.requires_grad) == peft_trainable
    merge_adapters(inner)
    assert_close(logits(inner, x), expected, torch.float64, "converted and merged")


def test_from_peft_without_lokr_layers_is_an_error():
    with pytest.raises(ValueError, match="no PEFT LoKr Linear layers"):
        from_peft(tiny_llama())


# PEFT decomposes w1 only for r < max(A) / 2 and keeps w2 full only for r >= max(B) / 2:
# a low-rank A with a full B needs A larger than B, here A (8, 8) = decompose_factor 8.
@pytest.mark.parametrize("rank, a_shape", [(None, None), (3, (8, 8))])
def test_export_loads_into_peft_with_identical_outputs(rank, a_shape):
    base = tiny_llama(torch.float64)
    fresh = copy.deepcopy(base)
    apply_adapters(base, rank=rank, alpha=1.5, a_shape=a_shape, verbose=False)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, KronALinear):
                m.b.normal_()
    x = torch.randint(0, 97, (2, 9))
    expected = logits(base, x)
    tensors, config = to_peft_state_dict(base)
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    assert config["decompose_factor"] == (8 if a_shape else -1)
    assert any(k.endswith(".lokr_w1_a" if rank else ".lokr_w1") for k in tensors)
    peft_model = get_peft_model(fresh, LoKrConfig(**config)).eval()
    result = set_peft_model_state_dict(peft_model, tensors)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lokr" in k]
    assert_close(logits(peft_model, x), expected, torch.float64, "PEFT logits from export")


def test_export_refuses_shapes_peft_cannot_express():
    model = tiny_llama()
    apply_adapters(model, target_modules=["q_proj"], a_shape=(4, 12), verbose=False)
    with pytest.raises(ValueError, match="not a factorisation PEFT makes"):
        to_peft_state_dict(model)
    model = tiny_llama()
    apply_adapters(model, target_modules=["q_proj"], rank=2, verbose=False)  # A (6, 6), B (8, 8)
    with pytest.raises(ValueError, match="PEFT would decompose w2"):
        to_peft_state_dict(model)


@pytest.mark.parametrize("case", list(CASES))
def test_patch_matches_peft_forward_and_backward(case, monkeypatch):
    import kronops.adapters.peft as interop
    calls = []
    fused = interop.kron_linear
    monkeypatch.setattr(interop, "kron_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = lokr_model(**CASES[case], dtype=torch.float32)
    x = torch.randint(0, 97, (2, 9))

    def run():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                     if p.requires_grad}

    ref_logits, ref_grads = run()
    patched = patch_peft_lokr(model)
    assert len(patched) == 14 and patch_peft_lokr(model) == []  # idempotent
    out_logits, grads = run()
    assert len(calls) == 14  # every LoKr Linear delta went through the fused op
    assert_close(out_logits, ref_logits, torch.float32, "patched logits")
    for n, g in ref_grads.items():
        assert_close(grads[n], g, torch.float32, f"grad {n}")
    assert len(unpatch_peft_lokr(model)) == 14
    assert "_get_delta_activations" not in model.base_model.model.model.layers[0].self_attn \
        .q_proj.__dict__


def test_patch_keeps_rank_dropout_in_training():
    base = tiny_llama()
    config = LoKrConfig(r=2, alpha=2, target_modules=["q_proj", "down_proj"], rank_dropout=0.5,
                        init_weights=False)
    model = get_peft_model(base, config).train()
    x = torch.randint(0, 97, (2, 9))
    torch.manual_seed(7)
    ref = model(input_ids=x).logits
    patch_peft_lokr(model)
    torch.manual_seed(7)
    assert_close(model(input_ids=x).logits, ref, torch.float32, "rank dropout")


def test_patch_leaves_lokr_conv_layers_to_peft():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 12))
    model = get_peft_model(net, LoKrConfig(r=2, target_modules=["0", "2"], init_weights=False))
    x = torch.randn(3, 4, 6, 6)
    ref = model(x)
    assert patch_peft_lokr(model) == ["base_model.model.2"]
    assert_close(model(x), ref, torch.float32, "conv + linear")
    with pytest.raises(ValueError, match="Conv layers cannot become kronops layers"):
        from_peft(model)
