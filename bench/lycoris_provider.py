"""LyCORIS's LoKr in bypass mode as a benchmark provider (optional: without lycoris-lora, none).

Bypass mode is LyCORIS's unmerged training path: ``base(x) + scale * x @ kron(w1, w2).T``
computed from the factors as one grouped chain of ops on x, never forming kron(w1, w2); its
own kernel backend is picked per call (``lycoris.kernels.select``: the PyTorch chain on CPU).
The module gets the same factors and scale as the kronops layer, so it computes the same
function and is checked against the fp64 reference.
"""
import copy
import importlib.metadata

import torch
from torch import nn

from .cases import Provider
from .optional import load_lycoris


def lycoris_version() -> str | None:
    """lycoris-lora's version, or None when it cannot be used (``bench.optional`` says why)."""
    return None if load_lycoris()[0] is None else importlib.metadata.version("lycoris-lora")


def lycoris_providers(base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
    """{"LyCORIS LoKr (bypass)": Provider} over a copy of ``base`` with factors a, b and
    ``scale``; empty when lycoris-lora is not installed."""
    lokr_module, _ = load_lycoris()
    if lokr_module is None:
        return {}
    layer = copy.deepcopy(base)
    # full_matrix: whole w1 and w2 (no low-rank split), LyCORIS's own scale 1 (alpha is then
    # forced to the rank); multiplier: our scale, applied in the bypass product.
    lokr = lokr_module.LokrModule("bench", layer, multiplier=scale, factor=a.shape[0],
                                  full_matrix=True, bypass_mode=True)
    if lokr.lokr_w1.shape != a.shape or lokr.lokr_w2.shape != b.shape:
        raise RuntimeError(f"LyCORIS LoKr chose factors {tuple(lokr.lokr_w1.shape)} (x) "
                           f"{tuple(lokr.lokr_w2.shape)}, kronops {tuple(a.shape)} (x) "
                           f"{tuple(b.shape)}")
    with torch.no_grad():
        lokr.lokr_w1.copy_(a)
        lokr.lokr_w2.copy_(b)
    lokr.to(device=base.weight.device, dtype=base.weight.dtype)
    lokr.apply_to()  # layer.forward is now LyCORIS's bypass forward
    return {"LyCORIS LoKr (bypass)": Provider(layer, [lokr.lokr_w1, lokr.lokr_w2])}
