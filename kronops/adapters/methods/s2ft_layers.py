"""S²FT layers on a model: building them for a plan (``wrap``), and their selections and values
in the original layout, which adapter files hold (a co-permuted model is saved unpermuted).

Per S²FT layer a file holds
  ``<module>.rows`` or ``<module>.cols``  the sorted int64 indices the plan trains
  ``<module>.delta``   adapter mode: Δ, (|R|, in) or (out, |C|)
  ``<module>.weight``  in-place mode: those rows/columns of the trained weight
Which rows or columns of a weight a layer trains is its ``Selection`` (``layer.chosen``).
"""
import torch
from torch import nn

from ...s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from ...s2ft.selection import Selection
from ..blocks import Block
from ..errors import AdapterFileError
from ..permutation import block_permutation, original_orders, permute_block
from ..selection import Plan
from ..sharded import whole
from ..targets import modules_of, set_module


def wrap(model: nn.Module, blocks: list[Block], plan: Plan, mode: str, permute: bool,
         delta_dtype: torch.dtype) -> dict:
    """Wrap the plan's parts of every block in S²FT layers of ``mode`` ("adapter": Δ of
    ``delta_dtype``; "inplace"), each in the training mode of the Linear it wraps,
    co-permuting each block first when ``permute``; returns the permutations (block name ->
    perm, ``AdapterState.permutations``)."""
    permutations = {}
    for b in blocks:
        entry = plan.blocks.get(b.name)
        if entry is None:
            continue
        heads, channels = entry["heads"], entry["channels"]
        if permute:
            perm = block_permutation(b, heads, channels)
            permute_block(model, b, perm)
            permutations[b.name] = perm
            chosen = set(heads)
            heads = [i for i, h in enumerate(perm["heads"]) if h in chosen]
            channels = list(range(len(channels)))
        for name, selection in b.selections(heads, channels).items():
            linear = model.get_submodule(name)
            selection = selection.as_range_if_contiguous().to(linear.weight.device)
            layer = S2FTLinear(linear, selection, delta_dtype=delta_dtype) \
                if mode == "adapter" else S2FTInPlaceLinear(linear, selection)
            set_module(model, name, layer.train(linear.training))
    return permutations


def _in_original_layout(layer: S2FTLinear, order) -> tuple[torch.Tensor, torch.Tensor]:
    """(the layer's indices in the original layout, sorted; position): the file's values are
    the layer's (Δ, or weight part) at ``position`` along the selected dim. ``order``: the
    layer's co-permutation (new index -> original index), or None."""
    indices = layer.indices().cpu()
    if order is None:
        return indices, torch.arange(indices.numel())
    return order[indices].sort()


def _layers(model: nn.Module) -> dict[str, tuple[S2FTLinear, torch.Tensor, torch.Tensor]]:
    """Per S²FT layer of the model: (layer, its indices and positions in the original
    layout, ``_in_original_layout``)."""
    orders = original_orders(model)
    return {name: (layer, *_in_original_layout(layer, orders.get(name)))
            for name, layer in modules_of(model, (S2FTLinear,)).items()}


def check_layers(model: nn.Module, selections: dict[str, Selection]) -> None:
    """The model's S²FT layers select exactly ``selections`` (original layout); else
    AdapterFileError."""
    layers = _layers(model)
    if set(layers) != set(selections):
        raise AdapterFileError("the model's S²FT layers differ from the file's plan")
    for name, sel in selections.items():
        layer, original, _ = layers[name]
        if layer.mode != sel.side or not torch.equal(original, sel.indices().cpu()):
            raise AdapterFileError(f"{name} selects other {sel.side} than the file")


def layer_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per S²FT layer its indices and Δ (adapter) or trained weight part (in place), in the
    original layout (see the module docstring)."""
    out = {}
    for name, (layer, indices, position) in _layers(model).items():
        if layer.merged:
            raise RuntimeError(f"{name} is merged: unmerge_adapters(model) before saving")
        if isinstance(layer, S2FTInPlaceLinear):
            key, values = "weight", layer.chosen.part(whole(layer.base_weight).detach())
        else:
            key, values = "delta", whole(layer.delta).detach()
        out[f"{name}.{layer.mode}"] = indices
        out[f"{name}.{key}"] = values.index_select(layer.chosen.dim, position.to(values.device))
    return out


@torch.no_grad()
def write_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put a file's Δ (adapter) or trained rows/columns (in place) into the S²FT layers."""
    for name, (layer, _, position) in _layers(model).items():
        if isinstance(layer, S2FTInPlaceLinear):
            w = layer.base_weight
            w.index_copy_(layer.chosen.dim, layer.indices()[position.to(w.device)],
                          tensors[f"{name}.weight"].to(w.device, w.dtype))
        else:
            delta = layer.delta
            delta.index_copy_(layer.chosen.dim, position.to(delta.device),
                              tensors[f"{name}.delta"].to(delta.device, delta.dtype))
