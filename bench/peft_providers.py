"""PEFT's LoKr and LoRA as benchmark providers (optional: without peft, none).

PEFT LoKr gets the same factors as the kronops layer, so it computes the same function
and is checked against the fp64 reference; LoRA (beside the KronALinear step and beside
sparse_linear) gets the rank whose trainable size is closest to the adapter's and is timed
only.
"""
import copy

import torch
from torch import nn

from .cases import Provider
from .optional import load_peft


def peft_version() -> str | None:
    """peft's version, or None when it cannot be used (``bench.optional`` says why)."""
    peft, _ = load_peft()
    return None if peft is None else peft.__version__


def peft_providers(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
    """{name: Provider} for PEFT LoKr (factors a, b, scale) and LoRA over copies of ``base``;
    and the names that compute a different function. Empty when peft is not installed."""
    peft, _ = load_peft()
    if peft is None:
        return {}, set()

    lokr = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoKrConfig(
        target_modules=["0"], r=max(a.shape + b.shape), alpha=scale * max(a.shape + b.shape)))
    lokr_layer = lokr.base_model.model[0]
    w1, w2 = lokr_layer.lokr_w1["default"], lokr_layer.lokr_w2["default"]
    if w1.shape != a.shape or w2.shape != b.shape:
        raise RuntimeError(f"PEFT LoKr chose factors {tuple(w1.shape)} (x) {tuple(w2.shape)}, "
                           f"kronops {tuple(a.shape)} (x) {tuple(b.shape)}")
    with torch.no_grad():
        w1.copy_(a)
        w2.copy_(b)
    lokr.to(base.weight.dtype)
    name, lora, lora_params = lora_layer(base, a.numel() + b.numel())
    providers = {"PEFT LoKr": Provider(lokr, [w1, w2]), name: Provider(lora, lora_params)}
    return providers, {name}


def lora_layer(base: nn.Linear, trainable: int):
    """(provider name, PEFT LoRA over a copy of ``base``, its trainable parameters), with the
    rank whose trainable size is closest to ``trainable``. Needs peft."""
    peft, why = load_peft()
    if peft is None:
        raise RuntimeError(why)

    rank = max(1, round(trainable / (base.in_features + base.out_features)))
    lora = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                               peft.LoraConfig(target_modules=["0"], r=rank, lora_alpha=rank))
    params = [p for p in lora.parameters() if p.requires_grad]
    for p in params:  # B starts at zero in LoRA; random values keep the timing honest
        nn.init.normal_(p, std=0.02)
    return f"PEFT LoRA r={rank}", lora.to(base.weight.dtype), params
