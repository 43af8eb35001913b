"""S²FT adapters as small tensors, and merging them into (or out of) a model's weights.

``export(model)`` gives a flat {name: tensor} dict (contiguous CPU tensors, ready for
safetensors), per S²FT layer ``<module>`` (its name in the model):
  ``<module>.rows`` or ``<module>.cols``  int64 indices in the model's original layout
  ``<module>.delta``   adapter mode: Δ, added to those rows/columns
  ``<module>.weight``  inplace mode: the trained rows/columns themselves (replace)
``restore(model, tensors)`` applies such a dict to a model (plain or wrapped, same
architecture, original layout), turning the small adapter back into a trained model.
``merge``/``unmerge`` fold every adapter layer's Δ into its base weight and back.
"""
import torch

from ..sparse_modules import S2FTInPlaceLinear, S2FTLinear
from .apply import layer_orders, s2ft_layers
from .blocks import ATTENTION, find_blocks
from .permute import base_linear


def _original_orders(model) -> dict[str, torch.Tensor]:
    """Layer name -> order (new index -> original index) for permuted layers."""
    perms = getattr(model, "_s2ft", {}).get("permutations", {})
    orders = {}
    for b in find_blocks(model):
        if b.name in perms:
            for name, (_, order) in layer_orders(b, perms[b.name]).items():
                parent = b.attention if name in ATTENTION else b.mlp
                orders[f"{parent}.{name}"] = order
    return orders


@torch.no_grad()
def export(model) -> dict[str, torch.Tensor]:
    """The model's S²FT layers as indices and values (see the module docstring)."""
    layers = s2ft_layers(model)
    if not layers:
        raise ValueError("model has no S²FT layers: apply a plan first")
    orders = _original_orders(model)
    out = {}
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"{name} is merged: unmerge() before export")
        dim = 1 if layer.mode == "cols" else 0
        indices = layer.indices().cpu()
        if isinstance(layer, S2FTInPlaceLinear):
            values, key = layer.weight_part(), "weight"
        else:
            values, key = layer.delta.detach(), "delta"
        if name in orders:  # permuted: report original coordinates, sorted
            indices, position = orders[name][indices].sort()
            values = values.index_select(dim, position.to(values.device))
        out[f"{name}.{layer.mode}"] = indices.contiguous()
        out[f"{name}.{key}"] = values.cpu().contiguous()
    return out


@torch.no_grad()
def restore(model, tensors: dict[str, torch.Tensor]) -> None:
    """Apply exported S²FT tensors to ``model``'s weights in place (original layout).

    Everything is checked before any weight changes: on an error the model is untouched.
    """
    modules = dict(model.named_modules())
    names = {key.rpartition(".")[0] for key in tensors}
    updates = []
    for name in sorted(names):
        if name not in modules:
            raise ValueError(f"exported layer {name!r} is not a module of the model")
        linear = base_linear(modules[name])
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        sides = [s for s in ("rows", "cols") if f"{name}.{s}" in tensors]
        kinds = [k for k in ("delta", "weight") if f"{name}.{k}" in tensors]
        if len(sides) != 1 or len(kinds) != 1:
            got = sorted(k for k in tensors if k.startswith(name + "."))
            raise ValueError(f"{name} needs exactly one of .rows/.cols and one of "
                             f".delta/.weight, got {got}")
        dim = 1 if sides[0] == "cols" else 0
        w = linear.weight
        index = tensors[f"{name}.{sides[0]}"].to(w.device)
        values = tensors[f"{name}.{kinds[0]}"].to(w.device)
        expected = list(w.shape)
        expected[dim] = index.numel()
        if index.dtype != torch.int64 or list(values.shape) != expected or \
                (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < w.shape[dim]):
            raise ValueError(f"{name}: indices must be int64 in [0, {w.shape[dim]}) and values "
                             f"of shape {tuple(expected)}, got {index.dtype} and "
                             f"{tuple(values.shape)}")
        if index.unique().numel() != index.numel():
            raise ValueError(f"{name}: {sides[0]} must not repeat an index (a repeated one "
                             f"would be updated twice), got {index.tolist()}")
        updates.append((w, dim, index, values.to(w.dtype), kinds[0]))
    for w, dim, index, values, kind in updates:
        if kind == "delta":
            w.index_add_(dim, index, values)
        else:
            w.index_copy_(dim, index, values)


def _adapters(model) -> list[S2FTLinear]:
    layers = [m for m in s2ft_layers(model).values() if not isinstance(m, S2FTInPlaceLinear)]
    if not layers:
        raise ValueError("model has no S²FT adapter layers (mode='adapter') to merge")
    return layers


def merge(model) -> None:
    """Merge every S2FTLinear's Δ into its base weight (forward then runs the bases)."""
    for layer in _adapters(model):
        layer.merge()


def unmerge(model) -> None:
    """Take every merged S2FTLinear's Δ out of its base weight again."""
    for layer in _adapters(model):
        layer.unmerge()


__all__ = ["export", "restore", "merge", "unmerge"]
