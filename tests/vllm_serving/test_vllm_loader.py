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
from kronops.serving.vllm import loader, plugin  # noqa: E402
from models import materialised  # noqa: E402
from vllm_assets import assets, more_assets, trained  # noqa: E402,F401  (fixtures)


def lora_layer(kind: str, tp: int, rank: int, **attrs):
    """kronops' subclass of vLLM's LoRA layer ``kind`` for rank ``rank`` of ``tp``, holding only
    what the loader and ``kronops_part`` read (vLLM's CPU build leaves the weight empty, in
    the served dtype); its slicing methods are vLLM's own."""
    import vllm.lora.utils as lora_utils
    plugin.register()
    cls = next(c for c in lora_utils._all_lora_classes if c.__name__ == "Kronops" + kind)
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    layer.tp_size, layer.tp_rank = tp, rank
    layer.base_layer = SimpleNamespace(weight=torch.empty(0))
    for name, value in attrs.items():
        setattr(layer, name, value)
    return layer


def kv_rows(tp: int) -> int:
    """The rows of k (or v) on one rank: 2 K/V heads of 32, each on tp/2 ranks past tp 2."""
    return 32 * max(1, 2 // tp)


def manager_for(folder, tp: int = 1, rank: int = 0):
    """What the loader reads of vLLM's LoRA manager for the tiny LLaMA on rank ``rank`` of
    ``tp``: the fused qkv_proj (4 query heads of 32 on 2 K/V heads: q 128, k 64, v 64 rows),
    gate_up_proj (256, 256) and the row-parallel o_proj (128 inputs) and down_proj (256),
    with the sizes and shard ids vLLM's layers compute."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folder)
    kv_id = rank // max(1, tp // 2)
    modules, packed = {}, {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        modules[f"{p}.self_attn.qkv_proj"] = lora_layer(
            "MergedQKVParallelLinearWithLoRA", tp, rank, n_slices=3,
            output_slices=(128 // tp, kv_rows(tp), kv_rows(tp)), output_ids=(rank, kv_id, kv_id))
        modules[f"{p}.self_attn.o_proj"] = lora_layer(
            "RowParallelLinearWithLoRA", tp, rank, n_slices=1, output_slices=(128,),
            input_size=128 // tp)
        modules[f"{p}.mlp.gate_up_proj"] = lora_layer(
            "MergedColumnParallelLinearWithLoRA", tp, rank, n_slices=2,
            output_slices=(256 // tp,) * 2, output_ids=(rank, rank))
        modules[f"{p}.mlp.down_proj"] = lora_layer(
            "RowParallelLinearWithLoRA", tp, rank, n_slices=1, output_slices=(128,),
            input_size=256 // tp)
        packed[f"{p}.self_attn.qkv_proj"] = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
        packed[f"{p}.mlp.gate_up_proj"] = [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]
    return SimpleNamespace(model=SimpleNamespace(config=config), modules=modules,
                           packed_modules=packed)


def load(folder, path, tp: int = 1, rank: int = 0):
    return loader.load(manager_for(folder, tp, rank),
                       SimpleNamespace(model=str(folder), revision=None), path)


def hf_base(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_updates_go_to_vllm_modules_and_slices(assets):
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


def test_an_inplace_s2ft_file_gives_its_delta_against_the_checkpoint(assets):
    folder, files, _ = assets
    tuned = kronops.merge_adapters(kronops.load_adapters(hf_base(folder), files["s2ft_inplace"]),
                                   unload=True)
    base = hf_base(folder)
    served = load(folder, files["s2ft_inplace"])
    update = served["model.layers.1.mlp.down_proj"][0]
    w = base.model.layers[1].mlp.down_proj.weight.detach().clone()
    update.selection.add_into(w, update.delta)
    torch.testing.assert_close(w, tuned.model.layers[1].mlp.down_proj.weight, rtol=0, atol=1e-7)


def test_a_file_of_another_base_model_is_refused(assets, tmp_path):
    folder, _, _ = assets
    other = hf_base(folder)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    path = tmp_path / "other.safetensors"
    kronops.save_adapters(trained(other, "krona", 1), path)
    with pytest.raises(AdapterFileError, match="saved from another base model"):
        load(folder, str(path))


def rank_rows(kind: str, index: int, tp: int, rank: int) -> torch.Tensor:
    """The rows of output slice ``index`` of ``kind`` (qkv_proj or gate_up_proj) that rank
    ``rank`` of ``tp`` computes: block ``rank`` of q, gate and up; of k and v the block of the
    rank's K/V head (at tp 4 head h is on ranks 2h and 2h + 1)."""
    if kind == "qkv_proj" and index > 0:
        size, block = kv_rows(tp), rank // max(1, tp // 2)
    else:
        size, block = (128 if kind == "qkv_proj" else 256) // tp, rank
    return torch.arange(block * size, (block + 1) * size)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", ["krona", "lokr", "s2ft", "s2ft_inplace", "peft_lokr"])
def test_tensor_parallel_ranks_give_the_whole_layer(assets, more_assets, name, tp):
    """Each rank's cut updates, applied as its layer applies them: a column-parallel slice
    gives that rank's rows of the whole slice's output, the row-parallel outputs sum to the
    whole output."""
    folder, files, _ = assets
    path = more_assets["peft_lokr"][0] if name == "peft_lokr" else files[name]
    whole = load(folder, path)
    ranks = [load(folder, path, tp, rank) for rank in range(tp)]
    g = torch.Generator().manual_seed(tp)
    for module, slices in whole.items():
        kind = module.rpartition(".")[2]
        for index, update in slices.items():
            if kind in ("o_proj", "down_proj"):
                shape = (128, 128 if kind == "o_proj" else 256)
                x = torch.randn(3, shape[1], generator=g)
                size, total = shape[1] // tp, torch.zeros(3, shape[0])
                for rank, served in enumerate(ranks):
                    part = served.get(module, {}).get(index)
                    if part is not None:
                        total += x[:, rank * size:(rank + 1) * size] @ \
                            materialised(part, (shape[0], size)).T
                torch.testing.assert_close(total, x @ materialised(update, shape).T,
                                           rtol=1e-5, atol=1e-6, msg=module)
                continue
            rows_whole = rank_rows(kind, index, 1, 0).numel()
            x = torch.randn(3, 128, generator=g)
            expected = x @ materialised(update, (rows_whole, 128)).T
            for rank, served in enumerate(ranks):
                rows = rank_rows(kind, index, tp, rank)
                part = served.get(module, {}).get(index)
                got = torch.zeros(3, rows.numel()) if part is None else \
                    x @ materialised(part, (rows.numel(), 128)).T
                torch.testing.assert_close(got, expected[:, rows], rtol=1e-5, atol=1e-6,
                                           msg=f"{module} slice {index} rank {rank}")


def test_files_training_whole_modules_are_refused(assets, tmp_path):
    folder, _, _ = assets
    model = kronops.apply_adapters(copy.deepcopy(hf_base(folder)), "krona",
                                   train_modules=["lm_head"])
    path = tmp_path / "heads.safetensors"
    kronops.save_adapters(model, path)
    with pytest.raises(AdapterFileError, match=r"also trains whole modules \['lm_head'\]"):
        load(folder, str(path))


def test_adapters_on_modules_vllm_does_not_wrap_are_refused(assets, tmp_path):
    folder, _, _ = assets
    model = kronops.apply_adapters(hf_base(folder), "krona", target_modules=["lm_head"])
    path = tmp_path / "lm_head.safetensors"
    kronops.save_adapters(model, path)
    with pytest.raises(AdapterFileError, match=r"adapts \['lm_head'\], which vLLM does not"):
        load(folder, str(path))


def test_a_peft_lokr_checkpoint_and_a_folder_with_one_file_are_ours(assets, more_assets):
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


def test_a_folder_of_several_files_is_refused(assets, tmp_path):
    folder, files, _ = assets
    import shutil
    for name in ("a", "b"):
        shutil.copy(files["krona"], tmp_path / f"{name}.safetensors")
    with pytest.raises(AdapterFileError, match=r"holds 2 .safetensors files.*holds one"):
        load(folder, str(tmp_path))
