"""Kronecker-factored EWC: ``ewc_penalty(model, factors, anchor, strength=λ)``.

    penalty = ½ λ Σ_layers vec(ΔW)ᵀ (A ⊗ G) vec(ΔW) = ½ λ Σ_layers ⟨ΔW, G ΔW A⟩

(vec stacks columns; A ⊗ G is never formed: two products of the layer's size per layer).
ΔW (out', in') = W − W_anchor, with the bias difference as a last column when the factors
have a bias (``LayerFactors.bias``: A is then over [x, 1]). ``kind="diag"`` is the diagonal
EWC baseline: ½ λ Σ ⟨F_diag, ΔW²⟩ with the diagonal empirical Fisher
(``collect(..., diagonal=True)``).

S²FT layers: ΔW is the trained part only, so the penalty and its gradient touch only the
selected rows/columns (cost ∝ selection): ``S2FTLinear``: its ``delta`` (the anchor is its
base, so the anchor is not read for it); ``S2FTInPlaceLinear``: the selected part of the
weight minus the anchor's, made differentiable through ``selected`` (what
``kronops.s2ft.InPlaceAdamW`` steps with).
"""
from collections.abc import Mapping

import torch
from torch import nn

from ..checks import check_number
from ..s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from ..wrapped_linear import as_out_in, out_in_weight
from .factors import LayerFactors, check_layer

KINDS = ("kron", "diag")


def _anchored(module: nn.Module, name: str, anchor: Mapping, stored: str, side: str):
    """The anchor's value of ``module``'s ``side`` ("weight", as (out, in), or "bias"),
    looked up under ``name.side`` or ``name.base.side`` (an adapter layer's base; that key
    first when ``stored`` is "base"), of the model's shape."""
    keys = [f"{name}.{side}", f"{name}.base.{side}"]
    if stored == "base":
        keys.reverse()
    key = next((k for k in keys if k in anchor), None)
    if key is None:
        raise ValueError(f"anchor has no {' or '.join(map(repr, keys))}")
    layer = module.base if stored == "base" else module
    ours = getattr(layer, side)
    if not isinstance(anchor[key], torch.Tensor) or anchor[key].shape != ours.shape:
        raise ValueError(f"anchor[{key!r}] must be a tensor of shape {tuple(ours.shape)}, got "
                         f"{getattr(anchor[key], 'shape', type(anchor[key]).__name__)}")
    return as_out_in(layer, anchor[key]) if side == "weight" else anchor[key]


def delta(module: nn.Module, name: str, f: LayerFactors, anchor: Mapping) -> torch.Tensor:
    """ΔW (out', in') of one layer for its factors ``f``: see the module docstring."""
    check_layer(name, module, f)
    if isinstance(module, S2FTLinear):
        if not isinstance(module, S2FTInPlaceLinear):
            return module.delta
        chosen = module.chosen
        anchor_w = _anchored(module, name, anchor, "base", "weight")
        part = chosen.to(anchor_w.device).part(anchor_w.detach())
        return (module.weight_part() - part.to(module.base_weight)) + module.selected
    w = out_in_weight(module)
    d = w - _anchored(module, name, anchor, "module", "weight").to(w)
    if f.bias:
        if module.bias is None:
            raise ValueError(f"factors[{name!r}] have a bias part, but {name!r} has no bias")
        b = module.bias
        d = torch.cat([d, (b - _anchored(module, name, anchor, "module", "bias").to(b))[:, None]],
                      1)
    return d


def ewc_penalty(model: nn.Module, factors: Mapping[str, LayerFactors], anchor, *,
                strength, kind: str = "kron") -> torch.Tensor:
    """½·strength·Σ_layers vec(ΔW)ᵀ(A⊗G)vec(ΔW) (``kind="kron"``) or ½·strength·Σ ⟨diag, ΔW²⟩
    (``"diag"``), a differentiable scalar in the factors' dtype; see the module docstring.

    ``factors``: ``collect``'s result (layers named as in ``model``; moved to each layer's
    device per call where they lie elsewhere: ``LayerFactors.to`` once avoids that);
    ``anchor``: the model at the end of the earlier task, or its state_dict (moved likewise);
    ``strength``: λ, finite and >= 0.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    strength = check_number("strength", strength)
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    if not isinstance(factors, Mapping) or not factors:
        raise ValueError("factors must be a non-empty dict {layer name: LayerFactors}")
    if isinstance(anchor, nn.Module):
        anchor = anchor.state_dict()
    if not isinstance(anchor, Mapping):
        raise TypeError(f"anchor must be a model or its state_dict, got {type(anchor).__name__}")
    modules = dict(model.named_modules())
    total = None
    for name, f in factors.items():
        if not isinstance(f, LayerFactors):
            raise TypeError(f"factors[{name!r}] must be a LayerFactors, got {type(f).__name__}")
        if name not in modules:
            raise ValueError(f"factors[{name!r}]: the model has no module {name!r}")
        d = delta(modules[name], name, f, anchor)
        if tuple(d.shape) != f.shape:
            raise ValueError(f"factors[{name!r}] are for a weight of shape {f.shape} (out', in'), "
                             f"{name!r} has {tuple(d.shape)}")
        if kind == "diag":
            if f.diag is None:
                raise ValueError(f"kind='diag' needs the diagonal Fisher: factors[{name!r}] "
                                 "has none (collect(..., diagonal=True))")
            term = (f.diag.to(d.device) * d.to(f.diag.dtype).square()).sum()
        else:
            d = d.to(f.a.dtype)
            term = (d * (f.g.to(d.device) @ d @ f.a.to(d.device))).sum()
        total = term if total is None else total + term
    return 0.5 * strength * total


__all__ = ["ewc_penalty", "KINDS"]
