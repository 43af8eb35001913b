"""K-FAC preconditioning: ``KFACPreconditioner(model, factors, damping=γ)``, whose ``step()``
runs between ``loss.backward()`` and the optimizer's ``step()``.

For every layer its factors cover, the gradient ∇W (out', in') is replaced by

    (G + γI)⁻¹ · ∇W · (A + γI)⁻¹  =  ((A + γI) ⊗ (G + γI))⁻¹ vec(∇W)    (vec stacks columns)

so the optimizer steps along the damped K-FAC natural gradient; A ⊗ G is never formed. The
damping is per factor (the Kronecker product of damped factors, as K-FAC damps), γ > 0.
The two inverses come from eigendecompositions in fp64: A = Q diag(λ) Qᵀ gives
(A + γI)⁻¹ = Q diag(1 / (max(λ, 0) + γ)) Qᵀ (eigenvalues below 0 are round-off of a PSD
average), kept in the factors' dtype. They are recomputed only on a refresh: ``refresh(
factors)``, or with ``collect_fn`` every ``update_every`` steps (amortised: Σ (in'³ + out'³)
per refresh, two GEMMs of the layer's size per step).

Which gradient, per layer (``LayerFactors`` as ``collect`` makes them):
nn.Linear / transformers Conv1D: ∇W in (out, in) (Conv1D's stored (in, out) gradient
through its transposed view), with the bias gradient as the last column when the factors
have a bias (``LayerFactors.bias``; the bias must then have a gradient); ``S2FTLinear``: the
gradient of ``delta``; ``S2FTInPlaceLinear``: the gradient of ``selected`` (what
``kronops.s2ft.InPlaceAdamW`` steps with) — both with the factors restricted to the
layer's selection. Gradients are rewritten in place; a layer without a gradient (unused in
this step) is left alone.
"""
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..checks import check_number
from ..s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from ..wrapped_linear import as_out_in
from .factors import LayerFactors, check_layer


def damped_inverse(m: torch.Tensor, damping: float) -> torch.Tensor:
    """(m + damping·I)⁻¹ of a symmetric PSD ``m`` from its fp64 eigendecomposition, in
    ``m``'s dtype (see the module docstring)."""
    values, vectors = torch.linalg.eigh(m.double())
    return ((vectors / (values.clamp_min(0) + damping)) @ vectors.T).to(m.dtype)


def trained_shape(name: str, module: nn.Module, f: LayerFactors) -> tuple[int, int]:
    """(out', in') of the gradient ``module``'s factors ``f`` precondition (checked)."""
    check_layer(name, module, f)
    if isinstance(module, S2FTLinear):
        return tuple(module.delta.shape)
    weight = as_out_in(module, module.weight)
    if f.bias and module.bias is None:
        raise ValueError(f"factors[{name!r}] have a bias part, but {name!r} has no bias")
    return weight.shape[0], weight.shape[1] + f.bias


class KFACPreconditioner:
    """Replaces gradients by their damped K-FAC preconditioned form (module docstring).

    ``model``: the model being trained; ``factors``: ``collect``'s result for it (layers
    named as in ``model``), or None when ``collect_fn`` supplies them; ``damping``: γ > 0;
    ``collect_fn()``: returns fresh factors (e.g. ``lambda: collect(model, batches)``),
    called by ``step()`` on its first call when ``factors`` is None and then every
    ``update_every`` steps (without ``collect_fn``, ``refresh(factors)`` is the only
    refresh and ``update_every`` is unused). ``refreshes`` counts the refreshes.

        pre = KFACPreconditioner(model, collect(model, batches), damping=1e-3)
        loss.backward(); pre.step(); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model: nn.Module, factors: Mapping[str, LayerFactors] | None = None, *,
                 damping, update_every: int = 1, collect_fn: Callable | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.damping = check_number("damping", damping)
        if self.damping <= 0:
            raise ValueError(f"damping must be > 0, got {self.damping}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or \
                update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        if collect_fn is not None and not callable(collect_fn):
            raise TypeError(f"collect_fn must be callable or None, got {type(collect_fn).__name__}")
        if factors is None and collect_fn is None:
            raise ValueError("factors is None and there is no collect_fn to collect them")
        self.model, self.update_every, self.collect_fn = model, update_every, collect_fn
        self.inverses: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers: dict[str, tuple[nn.Module, bool]] = {}
        self.refreshes = 0
        self._since_refresh = 0
        if factors is not None:
            self.refresh(factors)

    def refresh(self, factors: Mapping[str, LayerFactors]) -> None:
        """Recompute every layer's (G + γI)⁻¹ and (A + γI)⁻¹ from ``factors`` (checked
        against the model's layers first; the previous inverses stay on an error)."""
        if not isinstance(factors, Mapping) or not factors:
            raise ValueError("factors must be a non-empty dict {layer name: LayerFactors}")
        modules = dict(self.model.named_modules())
        for name, f in factors.items():
            if not isinstance(f, LayerFactors):
                raise TypeError(f"factors[{name!r}] must be a LayerFactors, got {type(f).__name__}")
            if name not in modules:
                raise ValueError(f"factors[{name!r}]: the model has no module {name!r}")
            shape = trained_shape(name, modules[name], f)
            if shape != f.shape:
                raise ValueError(f"factors[{name!r}] are for a gradient of shape {f.shape} "
                                 f"(out', in'), {name!r} trains {shape}")
        self.inverses = {name: (damped_inverse(f.g, self.damping),
                                damped_inverse(f.a, self.damping))
                         for name, f in factors.items()}
        self.layers = {name: (modules[name], f.bias) for name, f in factors.items()}
        self.refreshes += 1
        self._since_refresh = 0

    @torch.no_grad()
    def step(self) -> None:
        """Refresh when due (``collect_fn``), then precondition every covered gradient."""
        if self.collect_fn is not None and (not self.refreshes or
                                            self._since_refresh >= self.update_every):
            self.refresh(self.collect_fn())
        for name, (inv_g, inv_a) in self.inverses.items():
            module, bias = self.layers[name]
            self._precondition(name, module, bias, inv_g, inv_a)
        self._since_refresh += 1

    @staticmethod
    def _precondition(name, module, bias, inv_g, inv_a) -> None:
        def solve(grad):
            d = grad.to(inv_g.device, inv_g.dtype)
            return (inv_g @ d @ inv_a).to(grad.device, grad.dtype)

        if isinstance(module, S2FTLinear):
            p = module.selected if isinstance(module, S2FTInPlaceLinear) else module.delta
            if p.grad is not None:
                p.grad.copy_(solve(p.grad))
            return
        if module.weight.grad is None:
            return
        grad = as_out_in(module, module.weight.grad)
        if not bias:
            grad.copy_(solve(grad))
            return
        if module.bias.grad is None:
            raise ValueError(f"{name!r}: its factors have a bias part, but its bias has no "
                             "gradient (layers with a frozen bias are not preconditioned)")
        solved = solve(torch.cat([grad, module.bias.grad[:, None]], 1))
        grad.copy_(solved[:, :-1])
        module.bias.grad.copy_(solved[:, -1])


__all__ = ["KFACPreconditioner", "damped_inverse"]
