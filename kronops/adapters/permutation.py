"""Co-permutation of a block's coupled weights so selected heads/channels come first.

Permuting whole heads or FFN channels consistently across the weights that share them
leaves the block's function unchanged:
  channels  rows of every ffn_in Linear (and their biases), columns of ffn_out;
  heads     with grouped-query attention a query head must stay in its K/V head's group,
            so K/V heads are permuted as groups (rows and biases of key, value) carrying
            their query heads along, and query heads are permuted only within their group
            (rows and biases of query, columns of attention_output), in whatever layout
            the block's projections have (fused q/k/v, fused gate/up: ``Block.orders``).
            RoPE, q/k norms and BERT's relative positions are shared by all heads, so
            unaffected; where heads carry state of their own (T5's relative position
            bias, computed once and shared by every layer; ALiBi slopes) heads are not
            permuted (``Block.permutable_heads`` False): only FFN channels are.
Selected K/V groups go first, selected query heads first within each group, selected
channels first. The selected query heads are one contiguous block whenever the selection
fills all but its last group; otherwise they stay as few runs as the groups allow (the
gathered kernels handle either). Permutations are exact: ``unpermute`` restores every
weight bit for bit.
"""
import torch
from torch import nn

from ..s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from ..s2ft.selection import Selection
from ..wrapped_linear import out_in_weight
from .blocks import Block, find_blocks
from .state import adapter_state


def block_permutation(block: Block, heads: list[int], channels: list[int]) -> dict:
    """{"heads": new order of query heads, "kv_heads": of K/V heads, "channels": of channels}:
    position i holds the original head (K/V head, channel) perm[key][i]."""
    picked = set(channels)
    channel_order = sorted(picked) + [c for c in range(block.channels) if c not in picked]
    if not block.permutable_heads:
        return dict(heads=list(range(block.num_heads)),
                    kv_heads=list(range(block.num_kv_heads)), channels=channel_order)
    group = block.num_heads // block.num_kv_heads
    chosen = set(heads)
    kv_selected = block.kv_heads(heads)
    kv_order = kv_selected + [g for g in range(block.num_kv_heads) if g not in set(kv_selected)]
    head_order = []
    for g in kv_order:
        members = range(g * group, (g + 1) * group)
        head_order += [h for h in members if h in chosen] + [h for h in members if h not in chosen]
    return dict(heads=head_order, kv_heads=kv_order, channels=channel_order)


def _linear(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, S2FTLinear) else module


@torch.no_grad()
def permute_block(model: nn.Module, block: Block, perm: dict) -> None:
    """Reorder the block's weights (and row biases) in place: new position i holds the old
    head/channel perm[key][i]."""
    for name, (side, order) in block.orders(perm).items():
        linear = _linear(model.get_submodule(name))
        w = out_in_weight(linear)
        order = order.to(w.device)
        w.copy_(w.index_select(1 if side == "cols" else 0, order))
        if side == "rows" and linear.bias is not None:
            linear.bias.copy_(linear.bias.index_select(0, order))


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for new, old in enumerate(order):
        inv[old] = new
    return inv


def original_orders(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> order (new index -> original index) of every co-permuted Linear."""
    state = adapter_state(model)
    perms = state.permutations if state is not None else {}
    if not perms:
        return {}
    return {name: order for b in find_blocks(model) if b.name in perms
            for name, (_, order) in b.orders(perms[b.name]).items()}


@torch.no_grad()
def _reselect(layer: S2FTLinear, order: torch.Tensor) -> None:
    """Move a layer's selection (and Δ) from permuted to original coordinates."""
    original, position = order[layer.indices().cpu()].sort()
    if not isinstance(layer, S2FTInPlaceLinear):
        layer.delta.data = layer.delta.data.index_select(layer.chosen.dim,
                                                         position.to(layer.delta.device))
    layer.chosen = Selection(layer.mode, original.to(layer.base_weight.device),
                             size=layer.chosen.size)


def unpermute(model: nn.Module) -> None:
    """Undo ``apply_adapters(..., permute=True)``'s co-permutation: weights return to their
    original layout bit for bit; S²FT layers keep working, their selections (and Δ rows or
    columns) moved to original coordinates. Optimizer state is not remapped: call it after
    training. ``merge_adapters(model, unload=True)`` calls it itself.
    """
    state = adapter_state(model)
    if state is None or state.plan is None:
        raise RuntimeError("no S²FT adapters are applied to this model")
    orders = original_orders(model)
    for name, order in orders.items():
        layer = model.get_submodule(name)
        if isinstance(layer, S2FTLinear):
            _reselect(layer, order)
    for b in find_blocks(model):
        perm = state.permutations.get(b.name)
        if perm is not None:
            permute_block(model, b, {k: _inverse(v) for k, v in perm.items()})
    state.permutations = {}
