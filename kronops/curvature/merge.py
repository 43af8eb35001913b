"""Curvature-weighted merging: ``merge_models(models, factors, kind=..., damping=γ)`` -> the
state_dict of one model whose covered layers sit where the models' losses agree best.

Per layer covered by the factors, with W_i (out', in') model i's weight (the bias as a last
column when the factors have a bias) and F_i its Fisher approximation, the merged W solves

    min_W  Σ_i ½ vec(W − W_i)ᵀ F_i vec(W − W_i)  +  ½ γ ‖W − W̄‖²,     W̄ = mean_i W_i

(the damping pulls W to the plain mean where no model's curvature decides it), that is
(Σ_i F_i + γI) vec(W) = Σ_i F_i vec(W_i) + γ vec(W̄), by ``kind``:

``"kron"``   F_i = A_i ⊗ G_i (vec stacks columns):  Σ_i G_i W A_i + γW = Σ_i G_i W_i A_i + γW̄,
             a generalized Sylvester equation. Solved by conjugate gradient on the operator
             W ↦ Σ_i G_i W A_i + γW (symmetric positive definite for γ > 0), two GEMMs per
             model per iteration, never forming the (out'·in')² system: it takes any number
             of models (the exact eigendecomposition route diagonalises two Kronecker terms
             at most), in fp64, from W̄, until the residual ‖b − L(W)‖_F ≤ 1e-10·‖b‖_F; it
             raises if that takes more than 2·out'·in' iterations (a larger damping
             conditions the system better). The error in W is at most the system's condition
             number times that residual.
``"input"``  F_i = A_i ⊗ I (input covariances only):  W (Σ_i A_i + γI) = Σ_i W_i A_i + γW̄,
             one linear solve of size in'.
``"diag"``   F_i = diag(vec(diag Fisher_i)) (``collect(..., diagonal=True)``):
             W = (Σ_i F_i ⊙ W_i + γW̄) / (Σ_i F_i + γ) elementwise (γ keeps it finite).
``"mean"``   W̄ (factors and damping not used).

Layers no factors cover, and every other floating-point entry, get the plain mean; entries
that are not floating point (integer buffers, S²FT indices) are taken from the first model
and must be equal in all. Each merged entry keeps the first model's dtype.

S²FT adapters over one base (``S2FTLinear`` layers whose factors have a ``selection``): their
``delta`` (the trained part, (out', in') = the selection's part shape) is merged with the
restricted factors; every model's factors must have the same selection. ``S2FTInPlaceLinear``
layers (their trained part lives in base.weight) are not merged.
"""
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..checks import check_number
from ..wrapped_linear import as_out_in
from .factors import LayerFactors, check_layer

KINDS = ("kron", "input", "diag", "mean")
CG_TOLERANCE = 1e-10  # relative residual of kind="kron"'s conjugate gradient, in fp64


def _states(models) -> tuple[list[Mapping], nn.Module | None]:
    """The models' state_dicts and the first model given as a module (None if none is)."""
    if isinstance(models, (Mapping, nn.Module)) or not isinstance(models, Sequence) or \
            len(models) < 2:
        raise ValueError("models must be a list of at least two models or state_dicts")
    states, template = [], None
    for i, m in enumerate(models):
        if isinstance(m, nn.Module):
            template = m if template is None else template
            m = m.state_dict()
        if not isinstance(m, Mapping):
            raise TypeError(f"models[{i}] must be an nn.Module or a state_dict, "
                            f"got {type(m).__name__}")
        if states and set(m) != set(states[0]):
            raise ValueError(f"models[{i}] has other entries than models[0]: "
                             f"{sorted(set(m) ^ set(states[0]))}")
        states.append(m)
    return states, template


def _check_factors(factors, count: int, kind: str) -> list[Mapping[str, LayerFactors]]:
    if isinstance(factors, Mapping) or not isinstance(factors, Sequence) or \
            len(factors) != count:
        raise ValueError(f"factors must be a list of {count} collect() results, one per model")
    for i, fs in enumerate(factors):
        if not isinstance(fs, Mapping) or not fs:
            raise ValueError(f"factors[{i}] must be a non-empty dict {{layer name: LayerFactors}}")
        if set(fs) != set(factors[0]):
            raise ValueError(f"factors[{i}] covers other layers than factors[0]: "
                             f"{sorted(set(fs) ^ set(factors[0]))}")
        for name, f in fs.items():
            if not isinstance(f, LayerFactors):
                raise TypeError(f"factors[{i}][{name!r}] must be a LayerFactors, "
                                f"got {type(f).__name__}")
            first = factors[0][name]
            if f.shape != first.shape or f.bias != first.bias or f.selection != first.selection:
                raise ValueError(f"factors[{i}][{name!r}] are for another weight (shape, bias "
                                 f"or S²FT selection) than factors[0][{name!r}]")
            if kind == "diag" and f.diag is None:
                raise ValueError(f"kind='diag' needs the diagonal Fisher: factors[{i}][{name!r}]"
                                 " has none (collect(..., diagonal=True))")
    return list(factors)


def _layer_keys(name: str, f: LayerFactors, state: Mapping,
                modules: dict[str, nn.Module]) -> tuple[str, str | None]:
    """The state_dict keys of a covered layer's trained tensor and bias (None without);
    ``modules``: the named modules of a model given as a module, else empty (not checked)."""
    if modules:
        if name not in modules:
            raise ValueError(f"factors: the models have no module {name!r}")
        check_layer(name, modules[name], f)
    key = f"{name}.delta" if f.selection is not None else f"{name}.weight"
    bias = f"{name}.bias" if f.bias else None
    for k in (key, bias):
        if k is not None and k not in state:
            raise ValueError(f"factors[{name!r}]: the models have no {k!r}"
                             + (" (S2FTInPlaceLinear layers are not merged)"
                                if k.endswith(".delta") else ""))
    return key, bias


def _conjugate_gradient(apply, b: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """x with ‖b − apply(x)‖ ≤ CG_TOLERANCE·‖b‖, from the start ``x`` (apply SPD)."""
    r = b - apply(x)
    p, rr = r.clone(), (r * r).sum()
    bound = (CG_TOLERANCE * b.norm()) ** 2
    for _ in range(2 * b.numel()):
        if rr <= bound:
            return x
        q = apply(p)
        alpha = rr / (p * q).sum()
        x, r = x + alpha * p, r - alpha * q
        rr, previous = (r * r).sum(), rr
        p = r + (rr / previous) * p
    if rr <= bound:
        return x
    raise RuntimeError(f"kind='kron': conjugate gradient did not reach a relative residual "
                       f"of {CG_TOLERANCE} for {name!r} in {2 * b.numel()} iterations "
                       "(a larger damping conditions the system better)")


def _merge_layer(ws: list[torch.Tensor], fs: list[LayerFactors], kind: str, damping: float,
                 name: str) -> torch.Tensor:
    """The merged (out', in') of one layer, in fp64 (see the module docstring)."""
    mean = torch.stack(ws).mean(0)
    if kind == "mean":
        return mean
    if kind == "diag":
        diags = [f.diag.to(mean.device, torch.float64) for f in fs]
        return (sum(d * w for d, w in zip(diags, ws)) + damping * mean) / (sum(diags) + damping)
    a = [f.a.to(mean.device, torch.float64) for f in fs]
    if kind == "input":
        rhs = sum(w @ ai for w, ai in zip(ws, a)) + damping * mean
        total = sum(a) + damping * torch.eye(mean.shape[1], dtype=mean.dtype, device=mean.device)
        return torch.linalg.solve(total, rhs.T).T  # total is symmetric
    g = [f.g.to(mean.device, torch.float64) for f in fs]

    def apply(w):
        return sum(gi @ w @ ai for gi, ai in zip(g, a)) + damping * w
    rhs = sum(gi @ w @ ai for gi, w, ai in zip(g, ws, a)) + damping * mean
    return _conjugate_gradient(apply, rhs, mean, name)


def merge_models(models, factors=None, *, kind: str = "kron", damping=None) -> dict:
    """A state_dict merging ``models`` (see the module docstring for the math).

    ``models``: two or more nn.Modules of one architecture, or their state_dicts (a
    state_dict's weights are read as (out, in): pass Conv1D models as modules — one
    module among them is enough — to have their (in, out) weights viewed as (out, in));
    ``factors``: one ``collect()`` result per model, covering the same layers (not used by
    ``kind="mean"``); ``kind``: "kron", "input", "diag" or "mean"; ``damping``: γ > 0 for
    every kind but "mean". Returns {key: tensor} with the models' keys: new floating-point
    tensors on the first model's devices and dtypes, the first model's own non-floating
    entries; ``model.load_state_dict`` takes it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    states, template = _states(models)
    layout = dict(template.named_modules()) if template is not None else {}
    covered = {}
    if kind != "mean":
        if damping is None:
            raise ValueError(f"kind={kind!r} needs damping > 0")
        damping = check_number("damping", damping)
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        factors = _check_factors(factors, len(states), kind)
        for name in factors[0]:
            fs = [per_model[name] for per_model in factors]
            covered[name] = fs, *_layer_keys(name, fs[0], states[0], layout)
    merged = {}
    for name, (fs, key, bias) in covered.items():
        ws = []
        for i, state in enumerate(states):
            w = state[key]
            if fs[0].selection is None and name in layout:
                w = as_out_in(layout[name], w)
            if bias is not None:
                w = torch.cat([w, state[bias][:, None].to(w)], 1)
            if tuple(w.shape) != fs[0].shape:
                raise ValueError(f"factors[{i}][{name!r}] are for a weight of shape "
                                 f"{fs[0].shape} (out', in'), models[{i}] has {tuple(w.shape)}")
            ws.append(w.to(states[0][key].device, torch.float64))
        w = _merge_layer(ws, fs, kind, damping, name)
        if bias is not None:
            merged[bias] = w[:, -1].to(states[0][bias].dtype)
            w = w[:, :-1]
        if fs[0].selection is None and name in layout:
            w = as_out_in(layout[name], w)
        merged[key] = w.to(states[0][key].dtype).contiguous()
    for key, value in states[0].items():
        if key in merged:
            continue
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            stacked = torch.stack([s[key].to(value.device, torch.float64) for s in states])
            merged[key] = stacked.mean(0).to(value.dtype)
        elif all(_equal(value, s[key]) for s in states[1:]):
            merged[key] = value
        else:
            raise ValueError(f"models differ in {key!r}, which is not floating point "
                             "(integer buffers and S²FT selections must be equal)")
    return merged


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))
    return a == b


__all__ = ["merge_models", "KINDS", "CG_TOLERANCE"]
