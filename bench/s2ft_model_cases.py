"""A small LLaMA-style model's training step: full fine-tuning vs S²FT (adapter and in-place).

Every provider starts from the same weights (S²FT deltas are zero), so the loss its
first step returns is checked against the fp64 loss of the untouched model; the steps
after that are timed. The model is transformers' LlamaForCausalLM with random weights
and grouped-query attention (nothing is downloaded); skipped when transformers is absent.
"""
import copy

import torch

import kronops

from .cases import INPUT_SETS, Case, element_bytes
from .optional import load_transformers

LR = 1e-4


def _stepper(model, optimizer, batches):
    def run(i):
        loss = model(input_ids=batches[i], labels=batches[i]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return run


def llama_step_cases(config: dict, batch: int, seq: int, fraction: float, dtype, device):
    """One training step (forward, backward, AdamW) of a LlamaForCausalLM built from ``config``,
    S²FT training ``fraction`` of the heads and of the FFN channels."""
    transformers, _ = load_transformers()
    if transformers is None:
        return []
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(device=device, dtype=dtype)
    batches = [torch.randint(0, config["vocab_size"], (batch, seq), device=device)
               for _ in range(INPUT_SETS)]
    plan = kronops.adapters.select(base, heads=fraction, channels=fraction, seed=0)

    full = copy.deepcopy(base)
    adapter = kronops.apply_adapters(copy.deepcopy(base), "s2ft", plan=plan, mode="adapter",
                                     delta_dtype=dtype)
    inplace = kronops.apply_adapters(copy.deepcopy(base), "s2ft", plan=plan, mode="inplace")
    providers = {
        "kronops S²FT in-place": _stepper(inplace, kronops.s2ft.InPlaceAdamW(inplace, lr=LR),
                                         batches),
        "kronops S²FT adapter": _stepper(adapter, torch.optim.AdamW(
            [p for p in adapter.parameters() if p.requires_grad], lr=LR, foreach=True), batches),
        "naive (full fine-tuning)": _stepper(full, torch.optim.AdamW(
            full.parameters(), lr=LR, foreach=True), batches),
    }

    def reference():
        model64 = copy.deepcopy(base).double()
        with torch.no_grad():
            return model64(input_ids=batches[0], labels=batches[0]).loss

    params = sum(p.numel() for p in base.parameters())
    tokens = batch * seq
    shape = (f"LLaMA h{config['hidden_size']} L{config['num_hidden_layers']} "
             f"{config['num_attention_heads']}/{config['num_key_value_heads']} heads, "
             f"{batch}x{seq} tokens, {fraction:.0%} selected")
    # Effective rates count full fine-tuning's work for every provider: 6 flops per
    # parameter and token; the weights read once.
    return [Case("LLaMA step", "train step", shape, tokens, params * element_bytes(dtype),
                 6 * params * tokens, providers, reference)]
