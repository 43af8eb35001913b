"""Kronecker-factored EWC: ``ewc_penalty(model, factors, anchor, strength=λ)``.

    penalty = ½ λ Σ_layers vec(ΔW)ᵀ (A ⊗ G) vec(ΔW) = ½ λ Σ_layers ⟨ΔW, G ΔW A⟩

(vec stacks columns; A ⊗ G is never formed: two products of the layer's size per layer,
and none in backward: the gradient λ G ΔW A is the forward's product, kept, where the
factors are symmetric, as K-FAC's are; otherwise ½ λ (G ΔW A + Gᵀ ΔW Aᵀ), two more).
ΔW (out', in') = W − W_anchor, with the bias difference as a last column when the factors
have a bias (``LayerFactors.bias``: A is then over [x, 1]). ``kind="diag"`` is the diagonal
EWC baseline: ½ λ Σ ⟨F_diag, ΔW²⟩ with the diagonal empirical Fisher
(``collect(..., diagonal=True)``).

S²FT layers: ΔW is the selected part only, so the penalty and its gradient touch only the
selected rows/columns (cost ∝ selection). It is the layer's effective selected weight minus
the anchor's, taken as (base part − anchor's base part) + (trained − anchor's Δ): the base
parts cancel exactly when the base is shared, leaving Δ − Δ_anchor for continual training
of one adapter. "trained" is ``S2FTLinear``'s ``delta`` (nothing once merged: the base
holds it) or ``S2FTInPlaceLinear``'s ``selected`` (what ``kronops.s2ft.InPlaceAdamW`` steps
with). The anchor's base part is its ``name.base.weight`` (or ``name.weight``: a model
without the adapter); its Δ is its ``name.delta`` (an adapter-mode layer; zero when it has
none: an in-place layer, a plain model, or a merged layer of an anchor given as a model),
and an anchor that has a selection must have the layer's.
"""
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

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


def _anchor_delta(module: S2FTLinear, name: str, anchor: Mapping) -> torch.Tensor | None:
    """The anchor's adapter Δ of S²FT layer ``name`` (None where it has none), after checking
    that the anchor selects what ``module`` does."""
    index, extra = anchor.get(f"{name}.index"), anchor.get(f"{name}._extra_state")
    chosen = module.chosen
    same = (index is None or (chosen.index is not None and
                              torch.equal(index.cpu(), chosen.index.cpu()))) and \
        (not isinstance(extra, Mapping) or
         (extra.get("mode"), extra.get("start")) ==
         (chosen.side, chosen.start if chosen.is_range else None))
    if not same:
        raise ValueError(f"anchor: {name!r} selects other {chosen.side} than the model's "
                         f"{chosen!r}")
    saved = anchor.get(f"{name}.delta")
    if saved is None:
        return None
    if not isinstance(saved, torch.Tensor) or saved.shape != module.delta.shape:
        raise ValueError(f"anchor[{name + '.delta'!r}] must be a tensor of shape "
                         f"{tuple(module.delta.shape)}, got "
                         f"{getattr(saved, 'shape', type(saved).__name__)}")
    return saved


def _s2ft_delta(module: S2FTLinear, name: str, anchor: Mapping) -> torch.Tensor:
    """The selected part of ``module``'s effective weight minus the anchor's (docstring)."""
    anchor_w = _anchored(module, name, anchor, "base", "weight")
    chosen = module.chosen
    base = chosen.part(module.base_weight.detach()) - \
        chosen.to(anchor_w.device).part(anchor_w.detach()).to(module.base_weight)
    trained = None if module.merged else module.delta  # in-place layers are never merged
    saved = _anchor_delta(module, name, anchor)
    if saved is not None:
        saved = saved.detach().to(module.delta)
        trained = -saved if trained is None else trained - saved
    return base if trained is None else base.to(trained) + trained


def delta(module: nn.Module, name: str, f: LayerFactors, anchor: Mapping) -> torch.Tensor:
    """ΔW (out', in') of one layer for its factors ``f``: see the module docstring."""
    check_layer(name, module, f)
    if isinstance(module, S2FTLinear):
        return _s2ft_delta(module, name, anchor)
    w = out_in_weight(module)
    d = w - _anchored(module, name, anchor, "module", "weight").to(w)
    if f.bias:
        if module.bias is None:
            raise ValueError(f"factors[{name!r}] have a bias part, but {name!r} has no bias")
        b = module.bias
        d = torch.cat([d, (b - _anchored(module, name, anchor, "module", "bias").to(b))[:, None]],
                      1)
    return d


def anchor_state(anchor: nn.Module) -> dict:
    """``anchor``'s state_dict without the ``delta`` of its merged S²FT adapter layers (their
    base weight holds it already)."""
    state = anchor.state_dict()
    for name, m in anchor.named_modules():
        if isinstance(m, S2FTLinear) and not isinstance(m, S2FTInPlaceLinear) and m.merged:
            del state[f"{name}.delta"]
    return state


# Factors found exactly symmetric, with their version then: a comparison with the transpose
# is a strided pass (14% of a penalty's step at the bench's LLaMA), repeated only after an
# in-place change.
_SYMMETRIC = WeakIdKeyDictionary()


def _symmetric(t: torch.Tensor) -> bool:
    if _SYMMETRIC.get(t) == t._version:
        return True
    if torch.equal(t, t.mT):
        _SYMMETRIC[t] = t._version
        return True
    return False


class _KronQuadratic(torch.autograd.Function):
    """⟨D, G D A⟩ for D (out', in'), G (out', out'), A (in', in'); its gradient in D is
    G D A + Gᵀ D Aᵀ, 2 G D A for symmetric G and A: the product the forward made, kept."""

    @staticmethod
    def forward(ctx, d, g, a):
        p = g @ d @ a
        ctx.save_for_backward(d, g, a, p)
        return (d * p).sum()

    @staticmethod
    def backward(ctx, grad):
        d, g, a, p = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the products again, differentiable
            p = g @ d @ a
            return grad * (p + g.mT @ d @ a.mT), None, None
        if _symmetric(g) and _symmetric(a):
            return (2 * grad) * p, None, None
        return grad * (p + g.mT @ d @ a.mT), None, None


def kron_quadratic(d: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """⟨d, g @ d @ a⟩, differentiable; through ``_KronQuadratic`` (no product in backward
    for symmetric factors) when only d needs a gradient."""
    if g.requires_grad or a.requires_grad:
        return (d * (g @ d @ a)).sum()
    return _KronQuadratic.apply(d, g, a)


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
        anchor = anchor_state(anchor)
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
            term = kron_quadratic(d, f.g.to(d.device), f.a.to(d.device))
        total = term if total is None else total + term
    return 0.5 * strength * total


__all__ = ["ewc_penalty", "KINDS"]
