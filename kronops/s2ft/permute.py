"""Co-permutation of a block's coupled weights so selected heads/channels come first.

Permuting whole heads or MLP channels consistently across the weights that share them
leaves the block's function unchanged:
  channels  rows of gate_proj and up_proj (and biases), columns of down_proj;
  heads     with grouped-query attention a query head must stay in its K/V head's group,
            so K/V heads are permuted as groups (rows of k_proj, v_proj) carrying their
            query heads along, and query heads are permuted only within their group
            (rows of q_proj, columns of o_proj). Per-head state (RoPE, q/k norms) is
            shared by all heads, so it is unaffected.
Selected K/V groups go first, selected query heads first within each group, selected
channels first. The selected query heads are one contiguous block whenever the selection
fills all but its last group; otherwise they stay as few runs as the groups allow (the
gathered kernels handle either). Permutations are exact: undoing restores every weight bit.
"""
import torch
from torch import nn

from ..sparse_modules import S2FTLinear
from .blocks import Block, head_rows


def base_linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear itself, or the frozen base of an S²FT layer."""
    return module.base if isinstance(module, S2FTLinear) else module


def block_permutation(block: Block, heads: list[int], channels: list[int]) -> dict:
    """{"heads": new order of query heads, "kv_heads": of K/V heads, "channels": of channels}."""
    group = block.num_heads // block.num_kv_heads
    chosen = set(heads)
    kv_selected = sorted({h // group for h in heads})
    kv_order = kv_selected + [g for g in range(block.num_kv_heads) if g not in set(kv_selected)]
    head_order = []
    for g in kv_order:
        members = range(g * group, (g + 1) * group)
        head_order += [h for h in members if h in chosen] + [h for h in members if h not in chosen]
    picked = set(channels)
    channel_order = sorted(picked) + [c for c in range(block.channels) if c not in picked]
    return dict(heads=head_order, kv_heads=kv_order, channels=channel_order)


def inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for new, old in enumerate(order):
        inv[old] = new
    return inv


@torch.no_grad()
def _take(module, rows=None, cols=None) -> None:
    linear = base_linear(module)
    w = linear.weight
    if rows is not None:
        rows = rows.to(w.device)
        w.copy_(w.index_select(0, rows))
        if linear.bias is not None:
            linear.bias.copy_(linear.bias.index_select(0, rows))
    if cols is not None:
        w.copy_(w.index_select(1, cols.to(w.device)))


def permute_block(attention, mlp, block: Block, perm: dict) -> None:
    """Reorder the block's weights in place: new position i holds old head/channel perm[i]."""
    d = block.head_dim
    q_rows = head_rows(perm["heads"], d)
    kv_rows = head_rows(perm["kv_heads"], d)
    _take(attention.q_proj, rows=q_rows)
    _take(attention.k_proj, rows=kv_rows)
    _take(attention.v_proj, rows=kv_rows)
    _take(attention.o_proj, cols=q_rows)
    channels = torch.tensor(perm["channels"], dtype=torch.int64)
    _take(mlp.gate_proj, rows=channels)
    _take(mlp.up_proj, rows=channels)
    _take(mlp.down_proj, cols=channels)


def invert(perm: dict) -> dict:
    """The permutation that undoes ``perm``."""
    return {k: inverse(v) for k, v in perm.items()}
