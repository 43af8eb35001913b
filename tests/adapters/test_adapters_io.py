"""save_adapters / load_adapters: round trips (KronA, S²FT, PEFT-converted LoKr, train modules),
and every failure (mismatched names or shapes, corrupt or truncated file, crash mid-save)
leaving the model, or the previous file, untouched."""
import copy
import json
import os
import random
import re
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from adapter_files import load_refused, out
from models import randomize_b, tiny_bert, tiny_llama

from kronops.adapters import AdapterFileError, load_adapters, read_adapters, save_adapters
from kronops.adapters.apply import apply_adapters

def trained_krona(model, **config):
    apply_adapters(model, verbose=False, **config)
    randomize_b(model)
    return model


@pytest.fixture
def saved(tmp_path):
    """A tiny LLaMA with trained KronA adapters, a fresh copy of its base, and the file."""
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    model = trained_krona(base, rank=2, alpha=3)
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path)
    return model, fresh, path


def test_krona_round_trip_into_a_plain_model(saved):
    model, fresh, path = saved
    load_adapters(fresh, path)
    assert torch.equal(out(fresh), out(model))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    _, config = read_adapters(path)
    assert config["method"] == "krona" and config["kronops_version"]
    layer = config["layers"]["model.layers.0.self_attn.k_proj"]
    assert layer == dict(kind="krona", in_features=48, out_features=16, a_shape=[4, 6], rank=2,
                         alpha=3.0, dropout=0.0)


def test_krona_load_into_a_model_with_the_same_adapters(saved):
    model, fresh, path = saved
    apply_adapters(fresh, rank=2, alpha=3, verbose=False)
    load_adapters(fresh, path)
    assert torch.equal(out(fresh), out(model))


def test_loading_into_merged_adapters_is_refused(saved):
    from kronops.adapters.apply import merge_adapters
    _, fresh, path = saved
    apply_adapters(fresh, rank=2, alpha=3, verbose=False)
    randomize_b(fresh)
    merge_adapters(fresh)
    load_refused(fresh, path, "merged")


def test_train_modules_are_saved_and_loaded(tmp_path):
    base = tiny_bert()
    fresh = copy.deepcopy(base)
    model = trained_krona(base, train_modules=["classifier"])
    with torch.no_grad():
        model.classifier.weight.normal_()
    save_adapters(model, tmp_path / "a.safetensors")
    load_adapters(fresh, tmp_path / "a.safetensors")
    assert torch.equal(out(fresh), out(model))
    assert fresh.classifier.weight.requires_grad


@pytest.mark.parametrize("permute", [False, True])
def test_s2ft_round_trip(tmp_path, permute):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    apply_adapters(base, "s2ft", heads=2, channels=5, seed=3, permute=permute, verbose=False)
    with torch.no_grad():
        for m in base.modules():
            if hasattr(m, "delta"):
                m.delta.normal_(std=0.2)
    save_adapters(base, tmp_path / "s.safetensors")
    load_adapters(fresh, tmp_path / "s.safetensors")
    torch.testing.assert_close(out(fresh), out(base), rtol=1e-5, atol=1e-5)
    assert fresh._kronops.plan.blocks == base._kronops.plan.blocks


def test_peft_converted_lokr_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    from kronops.adapters.peft import LoKrLinear, from_peft
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    config = peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"],
                             init_weights=False)
    model = from_peft(peft.get_peft_model(base, config))
    save_adapters(model, tmp_path / "p.safetensors")
    load_adapters(fresh, tmp_path / "p.safetensors")
    assert isinstance(fresh.model.layers[0].mlp.down_proj, LoKrLinear)
    assert torch.equal(out(fresh), out(model))


def test_mismatched_shapes_fail_and_leave_model_untouched(saved):
    _, _, path = saved
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=44, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    other = transformers.LlamaForCausalLM(config)
    load_refused(other, path, r"down_proj is 44->48 in the model, 40->48 in the file")


def test_mismatched_adapter_config_fails_and_leaves_model_untouched(saved):
    _, fresh, path = saved
    apply_adapters(fresh, rank=1, verbose=False)
    load_refused(fresh, path, "has rank 1 in the model, 2 in the file")


def test_mismatched_alpha_fails_and_leaves_model_untouched(saved):
    """Same rank and shapes, another alpha (another scale): the file does not fit."""
    _, fresh, path = saved
    apply_adapters(fresh, rank=2, alpha=5, verbose=False)
    load_refused(fresh, path, "has alpha 5.0 in the model, 3.0 in the file")


def test_mismatched_module_names_fail_and_leave_model_untouched(saved):
    _, _, path = saved
    one_layer = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=1,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8))
    load_refused(one_layer, path, r"'model\.layers\.1\.[a-z_.]+' is missing")
    bert = tiny_bert()
    load_refused(bert, path, "is missing in the model")


def test_wrong_method_fails(saved):
    _, fresh, path = saved
    apply_adapters(fresh, "s2ft", heads=1, channels=1, verbose=False)
    load_refused(fresh, path, "holds 'krona' adapters, the model has 's2ft'")


def _data_offset(path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


@pytest.mark.parametrize("damage", ["flip a data byte", "truncate", "truncate header",
                                    "garbage", "empty"])
def test_corrupt_or_truncated_file_fails_and_leaves_model_untouched(saved, damage):
    _, fresh, path = saved
    data = bytearray(path.read_bytes())
    if damage == "flip a data byte":
        data[_data_offset(path) + 5] ^= 0x40
    elif damage == "truncate":
        data = data[:len(data) - 17]
    elif damage == "truncate header":
        data = data[:40]
    elif damage == "garbage":  # a header length that fits, then no JSON
        data = bytearray(data[:8]) + bytearray(random.Random(0).randbytes(len(data) - 8))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    load_refused(fresh, path, r"not a kronops adapter file \(not safetensors" if
                 damage == "garbage" else "corrupt")


@pytest.mark.parametrize("kind", ["torch.save", "text", "random bytes"])
def test_a_file_that_is_not_safetensors_says_so(tmp_path, kind):
    """Not "a header of 578712552184433488 bytes": the file is not an adapter file at all."""
    path = tmp_path / "adapters.bin"
    if kind == "torch.save":
        torch.save({"w": torch.ones(3)}, path)
    elif kind == "text":
        path.write_text("these are not adapters\n" * 4)
    else:
        path.write_bytes(random.Random(0).randbytes(1343))
    model = tiny_llama()
    message = load_refused(model, path, re.escape(
        f"{str(path)!r} is not a kronops adapter file (not safetensors: "))
    assert "header of" not in message


def test_safetensors_file_without_kronops_config(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(AdapterFileError, match="without a kronops adapter config"):
        load_adapters(tiny_llama(), tmp_path / "plain.safetensors")
    with pytest.raises(AdapterFileError, match="cannot read adapter file"):
        load_adapters(tiny_llama(), tmp_path / "missing.safetensors")


def test_failed_save_keeps_the_previous_file_and_no_temporary(saved, monkeypatch):
    model, _, path = saved
    previous = path.read_bytes()
    randomize_b(model)

    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, path)
    assert path.read_bytes() == previous
    assert os.listdir(path.parent) == [path.name]


def test_crash_mid_save_keeps_the_previous_file(saved):
    """A process killed (SIGKILL) after writing the new bytes but before the rename."""
    model, fresh, path = saved
    previous = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        from models import tiny_llama, randomize_b
        from kronops.adapters.apply import apply_adapters
        from kronops.adapters.files import save_adapters
        model = tiny_llama()
        apply_adapters(model, rank=2, alpha=3, verbose=False)
        randomize_b(model)
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        save_adapters(model, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert path.read_bytes() == previous
    load_adapters(fresh, path)
    assert torch.equal(out(fresh), out(model))


def test_config_is_readable_json(saved):
    _, _, path = saved
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    config = json.loads(header["__metadata__"]["kronops"])
    assert config["format"] == "kronops-adapters" and len(config["layers"]) == 14
    assert config["tensors"]["model.layers.0.self_attn.q_proj.b"] == \
        dict(shape=[8, 8], dtype="float32")


def test_s2ft_on_bert_round_trip_and_mismatch(tmp_path):
    base = tiny_bert()
    fresh, other = copy.deepcopy(base), copy.deepcopy(base)
    apply_adapters(base, "s2ft", heads=1, channels=12, seed=5,
                   train_modules=["classifier"], verbose=False)
    with torch.no_grad():
        for m in base.modules():
            if hasattr(m, "delta"):
                m.delta.normal_(std=0.2)
    path = tmp_path / "bert.safetensors"
    save_adapters(base, path)
    load_adapters(fresh, path)
    assert torch.equal(out(fresh), out(base))
    assert fresh._kronops.plan == base._kronops.plan
    apply_adapters(other, "s2ft", heads=1, channels=12, seed=6,
                   train_modules=["classifier"], verbose=False)
    load_refused(other, path, "selects other")
