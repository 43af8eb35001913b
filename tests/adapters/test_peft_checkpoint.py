"""A PEFT LoKr checkpoint directory read as a kronops file (read_peft_lokr) without peft: each
layer's served update (a, s·b) computes PEFT's own LoKr delta exactly (full and decomposed
factors, rank_pattern/alpha_pattern), the model checks apply, and what is not a LoKr linear
adapter is refused naming the reason."""
import json
import os

import pytest
import torch
from conftest import assert_close
from models import tiny_llama

peft = pytest.importorskip("peft")
from peft import LoKrConfig, get_peft_model  # noqa: E402

from kronops.adapters import AdapterFileError  # noqa: E402
from kronops.adapters.files import check_read  # noqa: E402
from kronops.adapters.lokr import KIND_KRONA, KIND_LOKR  # noqa: E402
from kronops.adapters.peft_checkpoint import peft_type, read_peft_lokr  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {"w2 low-rank": dict(r=2, decompose_both=False),
         "w1 and w2 low-rank": dict(r=2, decompose_both=True),
         "both full, rank and alpha patterns": dict(
             r=8, decompose_both=False, rank_pattern={"layers.1.mlp.down_proj": 9},
             alpha_pattern={r"self_attn\.[qk]_proj": 0.5})}


def saved(folder, **options):
    """A PEFT LoKr model of tiny_llama (fp64, random factors) saved into ``folder``; the
    model."""
    config = LoKrConfig(alpha=3.0, target_modules=TARGETS, init_weights=False, **options)
    model = get_peft_model(tiny_llama(torch.float64), config).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_each_served_update_is_peft_s_delta(case, tmp_path):
    model = saved(tmp_path, **CASES[case])
    tensors, config = read_peft_lokr(tmp_path)
    kinds = {cfg["kind"] for cfg in config["layers"].values()}
    assert kinds == {KIND_KRONA if case.startswith("both full") else KIND_LOKR}
    base = tiny_llama(torch.float64)
    checked = check_read(base, tmp_path, tensors, config, strict=True)
    updates = checked.spec.serve(base, checked.tensors)
    assert len(updates) == 14
    x = torch.randn(5, 48, dtype=torch.float64)
    for name, update in updates.items():
        layer = model.base_model.model.get_submodule(name)
        with torch.no_grad():
            expected = layer(x[:, :layer.in_features]) - layer.get_base_layer()(
                x[:, :layer.in_features])
        got = x[:, :layer.in_features] @ torch.kron(update.a, update.b).T
        assert_close(got, expected, torch.float64, name)


def test_peft_type_tells_lokr_from_lora(tmp_path):
    saved(tmp_path / "lokr", r=2)
    lora = get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert peft_type(tmp_path / "lokr") == "LOKR"
    assert peft_type(tmp_path / "lora") == "LORA"
    assert peft_type(tmp_path) is None
    with pytest.raises(AdapterFileError, match="is not a PEFT LoKr checkpoint.*'LORA'"):
        read_peft_lokr(tmp_path / "lora")


def edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_what_is_not_a_lokr_linear_adapter_is_refused(tmp_path):
    saved(tmp_path, r=2)
    edit_config(tmp_path, modules_to_save=["lm_head"])
    with pytest.raises(AdapterFileError, match=r"modules_to_save \['lm_head'\]"):
        read_peft_lokr(tmp_path)
    edit_config(tmp_path, modules_to_save=None)
    from safetensors.torch import load_file, save_file
    weights = os.path.join(tmp_path, "adapter_model.safetensors")
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lokr_w2_a"))
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(AdapterFileError, match="has no lokr_w2 .nor lokr_w2_a and lokr_w2_b"):
        read_peft_lokr(tmp_path)
    save_file(dict(tensors, **{key.replace("lokr_w2_a", "lokr_t2"): torch.zeros(2, 2, 3, 3)}),
              weights)
    with pytest.raises(AdapterFileError, match="convolution LoKr factor"):
        read_peft_lokr(tmp_path)
    save_file(dict(tensors, **{"base_model.model.lm_head.weight": torch.zeros(2, 2)}), weights)
    with pytest.raises(AdapterFileError, match="lm_head.weight is not a LoKr factor"):
        read_peft_lokr(tmp_path)
    os.remove(weights)
    with pytest.raises(AdapterFileError, match="has no adapter_model.safetensors"):
        read_peft_lokr(tmp_path)


def test_a_checkpoint_for_another_model_is_refused_by_the_model_checks(tmp_path):
    saved(tmp_path, r=2)
    tensors, config = read_peft_lokr(tmp_path)
    with pytest.raises(AdapterFileError, match=r"model.layers.1.mlp.down_proj. is missing in the model"):
        check_read(tiny_llama(torch.float64, layers=1), tmp_path, tensors, config)
