"""PEFT LoKr <-> kronops: convert, export, or patch PEFT's LoKr Linear layers to the fused op.

PEFT's LoKr Linear layer (``peft.tuners.lokr.layer.Linear``, adapter ``name``) computes
  base(x) + x @ (s * kron(w1, w2)).T,   s = alpha / r,
with w1 = ``lokr_w1`` (a1, a2) or ``lokr_w1_a`` (a1, r) @ ``lokr_w1_b`` (r, a2), and
w2 = ``lokr_w2`` (b1, b2) or ``lokr_w2_a`` (b1, r) @ ``lokr_w2_b`` (r, b2); it materialises
kron(w1, w2) on every forward. kronops computes the same without forming it.

``from_peft(peft_model)``      replaces every LoKr Linear by a ``KronALinear`` (or ``LoKrLinear``
                               when w2 is rank-decomposed) with identical outputs; returns the
                               underlying model, ready for ``save_adapters``/``merge_adapters``.
``to_peft_state_dict(model)``  the model's KronA adapters in PEFT's LoKr state-dict layout,
                               with the ``LoKrConfig`` arguments that rebuild that layout.
``patch_peft_lokr(peft_model)`` swaps the delta computation of PEFT's LoKr Linear layers for
                               ``kron_linear`` in place (PEFT stays in charge of everything else);
                               ``unpatch_peft_lokr`` undoes it. LoKr Conv1d/Conv2d layers are left
                               as PEFT's own (they are convolutions, not Kronecker matmuls).
PEFT's rank_dropout and module_dropout are training-time regularisers with no KronALinear
counterpart: the patch keeps them exactly; ``from_peft`` drops them (a warning says so).
Nothing here imports peft at module load.
"""
import types
import warnings

import torch
from torch import nn

from ..kron.modules import KronALinear, factor_shapes
from ..kron.ops import kron_linear
from .apply import freeze_except
from .fingerprint import fingerprint
from .lokr import LoKrLinear, layer_config
from .methods import krona
from .state import STATE, AdapterState
from .targets import set_module

PEFT_PREFIX = "base_model.model."


def _lokr_linear_cls():
    try:
        from peft.tuners.lokr.layer import Linear
    except ImportError as e:
        raise ImportError("PEFT interop needs the peft package: pip install peft") from e
    return Linear


def _lokr_layers(model: nn.Module, adapter: str) -> tuple[dict[str, nn.Module], list[str]]:
    """(PEFT LoKr Linear layers holding ``adapter`` by module name, names of LoKr Conv layers)."""
    linear = _lokr_linear_cls()
    from peft.tuners.lokr.layer import LoKrLayer
    layers, convs = {}, []
    for name, m in model.named_modules():
        if isinstance(m, linear) and adapter in m._available_adapters:
            layers[name] = m
        elif isinstance(m, LoKrLayer) and adapter in m._available_adapters:
            convs.append(name)
    return layers, convs


def _factors(layer, adapter: str):
    """(w1 spec, w2 spec): each ("full", W) or ("low", U, V)."""
    def spec(full, a, b):
        if adapter in full:
            return ("full", full[adapter])
        return ("low", a[adapter], b[adapter])
    if adapter in layer.lokr_t2:
        raise ValueError("a CP-decomposed (lokr_t2) factor belongs to a Conv LoKr layer")
    return (spec(layer.lokr_w1, layer.lokr_w1_a, layer.lokr_w1_b),
            spec(layer.lokr_w2, layer.lokr_w2_a, layer.lokr_w2_b))


@torch.no_grad()
def kron_layer(base: nn.Module, w1: tuple, w2: tuple, r: int, alpha: float) -> KronALinear:
    """The kronops layer over ``base`` (in, out) computing PEFT LoKr's s * kron(w1, w2), s =
    alpha / r: a KronALinear, or a LoKrLinear when w2 is decomposed. ``w1``, ``w2``: each
    ("full", W) or ("low", U, V) as PEFT holds them; the layer gets copies of those tensors,
    in their dtype and on their device."""
    (kind1, *t1), (kind2, *t2) = w1, w2
    a1, a2 = t1[0].shape[0], t1[-1].shape[1]
    # s = alpha / r: KronALinear's scale is alpha/rank with a rank, alpha without one.
    rank, kalpha = (r, float(alpha)) if kind1 == "low" else (None, alpha / r)
    kw = dict(a_shape=(a1, a2), rank=rank, alpha=kalpha)
    new = LoKrLinear(base, rank_b=r, **kw) if kind2 == "low" else KronALinear(base, **kw)
    names = (("a",) if kind1 == "full" else ("a_u", "a_v")) + \
        (("b",) if kind2 == "full" else ("b_u", "b_v"))
    for pname, w in zip(names, (*t1, *t2)):
        setattr(new, pname, nn.Parameter(w.detach().clone()))
    return new


def lokr_to_kronops(layer, adapter: str = "default") -> KronALinear:
    """One PEFT LoKr Linear layer as a KronALinear/LoKrLinear over the same base Linear."""
    if layer.merged:
        raise RuntimeError("the PEFT layer is merged; unmerge it before converting")
    new = kron_layer(layer.get_base_layer(), *_factors(layer, adapter), layer.r[adapter],
                     layer.alpha[adapter])
    return new.train(layer.training)  # the PEFT layer's mode (eval stays eval)


def from_peft(peft_model: nn.Module, adapter: str = "default") -> nn.Module:
    """Replace every PEFT LoKr Linear layer of ``adapter`` by its kronops equivalent, in place.

    Returns the underlying (non-PEFT) model with KronALinear/LoKrLinear layers, each in the
    training mode of the PEFT layer it replaces; adapter factors stay trainable, everything
    else frozen. Raises when the model holds LoKr Conv
    layers (not convertible), or no LoKr Linear layer for ``adapter``.
    """
    layers, convs = _lokr_layers(peft_model, adapter)
    if convs:
        raise ValueError(f"LoKr Conv layers cannot become kronops layers: {convs[:3]}; "
                         "use patch_peft_lokr to speed up the Linear layers and keep PEFT")
    if not layers:
        raise ValueError(f"no PEFT LoKr Linear layers with adapter {adapter!r} in the model")
    dropped = [n for n, m in layers.items() if m.rank_dropout[adapter] or m.module_dropout[adapter]]
    if dropped:
        warnings.warn(f"from_peft drops PEFT's rank_dropout/module_dropout (training-only) on "
                      f"{len(dropped)} layer(s), e.g. {dropped[0]}", stacklevel=2)
    converted = {n: lokr_to_kronops(m, adapter) for n, m in layers.items()}
    for name, new in converted.items():
        set_module(peft_model, name, new)
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    prefix = next((n for n, m in peft_model.named_modules() if m is inner), "")
    strip = len(prefix) + 1 if prefix else 0
    layers = {n[strip:]: layer_config(m) for n, m in converted.items()}
    setattr(inner, STATE, AdapterState(krona.NAME, [], layers=layers,
                                       base=fingerprint(inner, layers)))
    freeze_except(inner, [])
    return inner


def _peft_layout(layer: KronALinear):
    """(state-dict entries without prefix, r, alpha, decomposed A?) for one KronALinear."""
    if isinstance(layer, LoKrLinear):
        raise ValueError("LoKrLinear (rank-decomposed B) layers come from PEFT; export them "
                         "with PEFT itself (patch_peft_lokr keeps PEFT's layout)")
    (a1, a2), (b1, b2) = layer.factor_a().shape, layer.b.shape
    entries = {"lokr_w2": layer.b}
    if layer.rank is None:
        # PEFT keeps w1 and w2 full when r >= max(b1, b2) / 2 (w1 full unless decompose_both).
        r = max(b1, b2)
        entries["lokr_w1"] = layer.a
        return entries, r, layer.scale * r, False
    r = layer.rank
    if 2 * r < max(b1, b2):
        raise ValueError(f"rank {r} with B of shape ({b1}, {b2}): PEFT would decompose w2 "
                         f"(it keeps w2 full only for r >= max(b1, b2) / 2)")
    if not 2 * r < max(a1, a2):
        raise ValueError(f"rank {r} with A of shape ({a1}, {a2}): PEFT would keep w1 full "
                         f"(it decomposes w1 only for r < max(a1, a2) / 2)")
    entries["lokr_w1_a"], entries["lokr_w1_b"] = layer.a_u, layer.a_v
    return entries, r, layer.alpha, True


def to_peft_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's KronALinear adapters as PEFT LoKr tensors, and LoKrConfig arguments.

    Keys are ``base_model.model.<module>.lokr_w1`` (or ``lokr_w1_a``/``lokr_w1_b``) and
    ``.lokr_w2``, as ``peft.get_peft_model_state_dict`` writes them; load them with
    ``peft.set_peft_model_state_dict`` into ``get_peft_model(base, LoKrConfig(**config))``.
    The factor shapes must be PEFT's own choice (factors near the square roots, or one
    ``decompose_factor`` f for all layers giving A of shape (f, f)); otherwise ValueError.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, KronALinear)}
    if not layers:
        raise ValueError("model has no KronALinear adapters to export")
    tensors, ranks, alphas, decomposed, factors = {}, {}, {}, set(), set()
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"{name} is merged: unmerge_adapters(model) before export")
        entries, r, alpha, low = _peft_layout(layer)
        a_shape = tuple(layer.factor_a().shape)
        if a_shape == factor_shapes(layer.in_features, layer.out_features)[0]:
            factors.add(-1)
        elif a_shape[0] == a_shape[1]:
            factors.add(a_shape[0])
        else:
            raise ValueError(f"{name}: A of shape {a_shape} is not a factorisation PEFT makes")
        for key, t in entries.items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = t.detach().contiguous()
        ranks[name], alphas[name] = r, alpha
        decomposed.add(low)
    if len(factors) > 1 or len(decomposed) > 1:
        raise ValueError("PEFT's LoKrConfig takes one decompose_factor and one decompose_both "
                         "for all layers; these adapters mix them")
    r0, a0 = next(iter(ranks.values())), next(iter(alphas.values()))
    config = dict(target_modules=list(layers), r=r0, alpha=a0,
                  rank_pattern={n: r for n, r in ranks.items() if r != r0},
                  alpha_pattern={n: a for n, a in alphas.items() if a != a0},
                  decompose_both=decomposed.pop(), decompose_factor=factors.pop())
    return tensors, config


def _fused_delta(self, adapter_name: str, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT LoKr Linear delta, s * x @ kron(w1, w2).T, through kron_linear (no kron formed)."""
    w1 = self.lokr_w1[adapter_name] if adapter_name in self.lokr_w1 else \
        self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]
    w2 = self.lokr_w2[adapter_name] if adapter_name in self.lokr_w2 else \
        self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]
    dtype = torch.promote_types(w1.dtype, w2.dtype)
    x = self._cast_input_dtype(input, dtype)
    y = kron_linear(x, w1.to(x.dtype), w2.to(x.dtype), scale=float(self.scaling[adapter_name]))
    if self.training and self.rank_dropout[adapter_name]:  # PEFT drops rows of the weight
        drop = (torch.rand(y.shape[-1]) > self.rank_dropout[adapter_name]).to(y.dtype)
        if self.rank_dropout_scale[adapter_name]:
            drop /= drop.mean()
        y = y * drop.to(y.device)
    return y


def patch_peft_lokr(peft_model: nn.Module) -> list[str]:
    """Make every PEFT LoKr Linear layer compute its delta with ``kron_linear``, in place.

    Per layer only the delta computation (``_get_delta_activations``) is replaced; merging,
    saving, adapter switching and LoKr Conv layers remain PEFT's. Returns the patched names.
    """
    linear = _lokr_linear_cls()
    patched = []
    for name, m in peft_model.named_modules():
        if isinstance(m, linear) and "_get_delta_activations" not in m.__dict__:
            m._get_delta_activations = types.MethodType(_fused_delta, m)
            patched.append(name)
    return patched


def unpatch_peft_lokr(peft_model: nn.Module) -> list[str]:
    """Undo ``patch_peft_lokr``: PEFT's own delta computation again. Returns the names."""
    linear = _lokr_linear_cls()
    names = []
    for name, m in peft_model.named_modules():
        if isinstance(m, linear) and "_get_delta_activations" in m.__dict__:
            del m._get_delta_activations
            names.append(name)
    return names


__all__ = ["LoKrLinear", "from_peft", "kron_layer", "lokr_to_kronops", "to_peft_state_dict",
           "patch_peft_lokr", "unpatch_peft_lokr"]
