"""What the vLLM tests serve, built locally (nothing downloaded): a tiny LLaMA saved with a
byte-level BPE tokenizer trained on a few sentences, kronops adapter files for it, each
with random "trained" values, a PEFT LoRA adapter folder (vLLM's own kind), a PEFT LoKr
checkpoint folder and a folder holding one kronops file."""
import json
import os
import shutil

import pytest
import torch
from models import randomly_trained

import kronops

# name -> (method, apply_adapters options): KronA, LoKr (low-rank factor), S²FT in both file
# modes; S²FT adapts heads (q/k/v rows, o_proj columns) and channels (gate/up rows, down_proj
# columns), so both of its sides are served.
ADAPTERS = {
    "krona": ("krona", dict()),
    "lokr": ("krona", dict(rank=2, alpha=3.0)),
    "s2ft": ("s2ft", dict(mode="adapter")),
    "s2ft_inplace": ("s2ft", dict(mode="inplace")),
}
TEXT = ["the quick brown fox jumps over the lazy dog %d" % i for i in range(400)] + \
    ["hello world kron adapter serving test"] * 20


def tiny_llama(folder) -> None:
    """Save a 2-block LLaMA (hidden 128, 4 query heads on 2 K/V heads, FFN 256, vocab 512,
    fp32) and its tokenizer into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)


def trained(base, name: str, seed: int):
    """A copy of ``base`` with adapter ``name`` applied and given random trained values."""
    method, options = ADAPTERS[name]
    return randomly_trained(base, method, options, seed, scale=0.05)


LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def peft_lora(base, folder, seed: int) -> dict:
    """Write a PEFT LoRA adapter (``LORA``, random A and B) for ``base`` into ``folder``;
    {module name: (A, B)}."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    factors, tensors = {}, {}
    for name, module in base.named_modules():
        if name.rpartition(".")[2] in LORA["target_modules"]:
            a = 0.1 * torch.randn(LORA["r"], module.in_features, generator=g)
            b = 0.1 * torch.randn(module.out_features, LORA["r"], generator=g)
            factors[name] = (a, b)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(dict(LORA, peft_type="LORA", bias="none"), f)
    return factors


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(model folder, {adapter name: file}, (PEFT LoRA folder, its factors)): the tiny LLaMA,
    an adapter file of each of ``ADAPTERS`` for it and a LoRA adapter."""
    from transformers import AutoModelForCausalLM
    folder = tmp_path_factory.mktemp("vllm") / "tiny-llama"
    tiny_llama(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    files = {}
    for seed, name in enumerate(ADAPTERS):
        files[name] = str(folder.parent / f"{name}.safetensors")
        kronops.save_adapters(trained(base, name, seed + 1), files[name])
    lora = str(folder.parent / "lora")
    return folder, files, (lora, peft_lora(base, lora, len(ADAPTERS) + 1))


# PEFT LoKr on every projection: w1 rank-decomposed on q/k/v, w2 on the MLP; r 2 (down_proj
# 4 by rank_pattern), alpha 3 (o_proj 5 by alpha_pattern); B (16, 16), A (out/16, in/16).
LOKR = dict(r=2, alpha=3.0, rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 5.0},
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"])


def peft_lokr(base, folder, seed: int) -> dict[str, torch.Tensor]:
    """Write a PEFT LoKr checkpoint (``LOKR``, random factors; PEFT's key and config layout)
    for ``base`` into ``folder``; {module name: its ΔW = alpha/r kron(w1, w2), materialised}."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    deltas, tensors = {}, {}
    for name, module in base.named_modules():
        kind = name.rpartition(".")[2]
        if kind not in LOKR["target_modules"]:
            continue
        r = 4 if kind == "down_proj" else 2
        alpha = 5.0 if kind == "o_proj" else 3.0
        a1, a2 = module.out_features // 16, module.in_features // 16
        key = f"base_model.model.{name}."
        if kind in ("q_proj", "k_proj", "v_proj"):
            w1a, w1b = torch.randn(a1, r, generator=g), torch.randn(r, a2, generator=g)
            tensors.update({key + "lokr_w1_a": w1a, key + "lokr_w1_b": w1b})
            w1 = w1a @ w1b
        else:
            w1 = tensors[key + "lokr_w1"] = torch.randn(a1, a2, generator=g)
        if kind in ("gate_proj", "up_proj", "down_proj"):
            w2a, w2b = 0.05 * torch.randn(16, r, generator=g), 0.05 * torch.randn(r, 16, generator=g)
            tensors.update({key + "lokr_w2_a": w2a, key + "lokr_w2_b": w2b})
            w2 = w2a @ w2b
        else:
            w2 = tensors[key + "lokr_w2"] = 0.005 * torch.randn(16, 16, generator=g)
        deltas[name] = alpha / r * torch.kron(w1, w2)
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(dict(LOKR, peft_type="LOKR", rank_dropout=0.0, module_dropout=0.0,
                       use_effective_conv2d=False, decompose_both=False, decompose_factor=-1,
                       modules_to_save=None), f)
    return deltas


@pytest.fixture(scope="module")
def more_assets(assets):
    """{"peft_lokr": (PEFT LoKr folder, {module: ΔW}), "krona_dir": a folder holding only a
    copy of the "krona" file}, for the tiny LLaMA of ``assets``."""
    from transformers import AutoModelForCausalLM
    folder, files, _ = assets
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lokr = str(folder.parent / "peft_lokr")
    deltas = peft_lokr(base, lokr, len(ADAPTERS) + 2)
    krona_dir = folder.parent / "krona_dir"
    krona_dir.mkdir()
    shutil.copy(files["krona"], krona_dir / "adapter.safetensors")
    return {"peft_lokr": (lokr, deltas), "krona_dir": str(krona_dir)}


def hf_model(folder, path=None, deltas=None):
    """The tiny LLaMA in transformers (fp32, eval) with the kronops adapter file at ``path``
    loaded by kronops, or with ``deltas`` ({module: ΔW}) added by forward hooks; plain when
    both are None."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if path is not None:
        model = kronops.load_adapters(model, path).eval()
    for name, dw in (deltas or {}).items():
        model.get_submodule(name).register_forward_hook(
            lambda module, args, y, dw=dw: y + args[0] @ dw.T)
    return model
