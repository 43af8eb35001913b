"""kronops.serving.vllm.loader without an engine: a kronops adapter file mapped onto vLLM's
LoRA modules and output slices, and the files it refuses, naming why. The LoRA manager is
stood in for by what the loader reads of it (its model's config, modules, packed modules).
"""
import copy
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm is not importable here: the vLLM tests run in their own environment "
                   "(.ci/vllm, .venv-vllm)")

import kronops  # noqa: E402
from kronops.adapters import AdapterFileError  # noqa: E402
from kronops.adapters.methods.updates import KronUpdate, SparseUpdate  # noqa: E402
from kronops.serving.vllm import loader  # noqa: E402
from vllm_assets import assets, more_assets, trained  # noqa: E402,F401  (fixtures)


def manager_for(folder):
    """What the loader reads of vLLM's LoRA manager for the tiny LLaMA (tp=1): the fused
    qkv_proj (q 128, k 64, v 64 rows) and gate_up_proj (256, 256), o_proj and down_proj."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folder)

    def layer(*slices):  # vLLM's CPU build leaves the weight empty, in the served dtype
        return SimpleNamespace(output_slices=slices,
                               base_layer=SimpleNamespace(weight=torch.empty(0)))
    modules, packed = {}, {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        modules[f"{p}.self_attn.qkv_proj"] = layer(128, 64, 64)
        modules[f"{p}.self_attn.o_proj"] = layer(128)
        modules[f"{p}.mlp.gate_up_proj"] = layer(256, 256)
        modules[f"{p}.mlp.down_proj"] = layer(128)
        packed[f"{p}.self_attn.qkv_proj"] = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
        packed[f"{p}.mlp.gate_up_proj"] = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
    return SimpleNamespace(model=SimpleNamespace(config=config), modules=modules,
                           packed_modules=packed)


@pytest.fixture
def tp(monkeypatch):
    """Set the tensor-parallel size the loader sees (1 unless a test says otherwise)."""
    size = [1]
    import vllm.distributed
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_world_size",
                        lambda: size[0])
    return size


def load(folder, path):
    return loader.load(manager_for(folder), SimpleNamespace(model=str(folder), revision=None),
                       path)


def hf_base(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_updates_go_to_vllm_modules_and_slices(assets, tp):
    folder, files, _ = assets
    kron = load(folder, files["krona"])
    assert set(kron["model.layers.0.self_attn.qkv_proj"]) == {0, 1, 2}
    assert set(kron["model.layers.1.mlp.gate_up_proj"]) == {0, 1}
    k = kron["model.layers.0.self_attn.qkv_proj"][1]
    assert isinstance(k, KronUpdate)
    assert torch.kron(k.a, k.b).shape == (64, 128)  # k_proj: slice 1 of qkv
    sparse = load(folder, files["s2ft_inplace"])
    sides = {u.selection.side for slices in sparse.values() for u in slices.values()}
    assert sides == {"rows", "cols"}
    assert all(isinstance(u, SparseUpdate) for s in sparse.values() for u in s.values())


def test_an_inplace_s2ft_file_gives_its_delta_against_the_checkpoint(assets, tp):
    folder, files, _ = assets
    tuned = kronops.merge_adapters(kronops.load_adapters(hf_base(folder), files["s2ft_inplace"]),
                                   unload=True)
    base = hf_base(folder)
    served = load(folder, files["s2ft_inplace"])
    update = served["model.layers.1.mlp.down_proj"][0]
    w = base.model.layers[1].mlp.down_proj.weight.detach().clone()
    update.selection.add_into(w, update.delta)
    torch.testing.assert_close(w, tuned.model.layers[1].mlp.down_proj.weight, rtol=0, atol=1e-7)


def test_a_file_of_another_base_model_is_refused(assets, tp, tmp_path):
    folder, _, _ = assets
    other = hf_base(folder)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    path = tmp_path / "other.safetensors"
    kronops.save_adapters(trained(other, "krona", 1), path)
    with pytest.raises(AdapterFileError, match="saved from another base model"):
        load(folder, str(path))


def test_tensor_parallel_serving_is_refused(assets, tp):
    folder, files, _ = assets
    tp[0] = 2
    with pytest.raises(AdapterFileError, match=r"tensor parallelism \(2 ranks\)"):
        load(folder, files["krona"])


def test_files_training_whole_modules_are_refused(assets, tp, tmp_path):
    folder, _, _ = assets
    model = kronops.apply_adapters(copy.deepcopy(hf_base(folder)), "krona",
                                   train_modules=["lm_head"])
    path = tmp_path / "heads.safetensors"
    kronops.save_adapters(model, path)
    with pytest.raises(AdapterFileError, match=r"also trains whole modules \['lm_head'\]"):
        load(folder, str(path))


def test_adapters_on_modules_vllm_does_not_wrap_are_refused(assets, tp, tmp_path):
    folder, _, _ = assets
    model = kronops.apply_adapters(hf_base(folder), "krona", target_modules=["lm_head"])
    path = tmp_path / "lm_head.safetensors"
    kronops.save_adapters(model, path)
    with pytest.raises(AdapterFileError, match=r"adapts \['lm_head'\], which vLLM does not"):
        load(folder, str(path))


def test_a_peft_lokr_checkpoint_and_a_folder_with_one_file_are_ours(assets, more_assets, tp):
    folder, files, (lora, _) = assets
    lokr, deltas = more_assets["peft_lokr"]
    for path in (files["krona"], more_assets["krona_dir"], lokr):
        assert loader.is_kronops_path(path), path
    assert not loader.is_kronops_path(lora)  # vLLM's own
    assert not loader.is_kronops_path(str(folder.parent / "no_such_adapter"))
    served = load(folder, lokr)
    for name, (wrapped, index) in [("model.layers.0.self_attn.k_proj", ("model.layers.0.self_attn"
                                    ".qkv_proj", 1)), ("model.layers.1.mlp.up_proj",
                                                       ("model.layers.1.mlp.gate_up_proj", 1)),
                                   ("model.layers.1.mlp.down_proj",
                                    ("model.layers.1.mlp.down_proj", 0))]:
        update = served[wrapped][index]
        torch.testing.assert_close(torch.kron(update.a, update.b), deltas[name], rtol=1e-6,
                                   atol=1e-7)
    same = load(folder, more_assets["krona_dir"])
    k = load(folder, files["krona"])["model.layers.0.self_attn.qkv_proj"][1]
    assert torch.equal(same["model.layers.0.self_attn.qkv_proj"][1].b, k.b)


def test_a_folder_of_several_files_is_refused(assets, tp, tmp_path):
    folder, files, _ = assets
    import shutil
    for name in ("a", "b"):
        shutil.copy(files["krona"], tmp_path / f"{name}.safetensors")
    with pytest.raises(AdapterFileError, match=r"holds 2 .safetensors files.*holds one"):
        load(folder, str(tmp_path))
