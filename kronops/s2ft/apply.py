"""Applying an S²FT plan to a model: wrap the selected parts, freeze everything else.

A selected query head h trains rows h*d:(h+1)*d of q_proj and those columns of o_proj,
and rows of its K/V head g = h // group in k_proj and v_proj (grouped-query attention:
group = num_heads / num_kv_heads). A K/V head is trained when any query head of its group
is selected; since it is shared, its update is seen by every query head of the group,
selected or not (q and o of unselected heads stay frozen). A selected channel c trains
row c of gate_proj and up_proj and column c of down_proj.
mode="adapter" wraps each touched Linear in ``S2FTLinear`` (trainable Δ, merge/unmerge);
mode="inplace" in ``S2FTInPlaceLinear`` (train with ``InPlaceAdamW``/``InPlaceSGD``).
``permute=True`` first co-permutes each block (see ``kronops.s2ft.permute``) so
selections are contiguous; ``unpermute`` restores the original layout exactly.
"""
import torch

from ..sparse_functional import check_sorted_unique
from ..sparse_modules import S2FTInPlaceLinear, S2FTLinear
from .blocks import ATTENTION, MLP, Block, find_blocks, head_rows, kv_heads
from .permute import block_permutation, invert, permute_block
from .select import Plan

MODES = ("adapter", "inplace")


def _check_indices(where: str, values, limit: int) -> None:
    if not isinstance(values, list) or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{where} must be a list of ints, got {values!r}")
    check_sorted_unique(where, torch.tensor(values, dtype=torch.int64), limit)


def check_plan(plan: Plan, blocks: list[Block]) -> None:
    """The plan names only blocks of the model, with matching sizes and valid indices."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a kronops.s2ft.Plan, got {type(plan).__name__}")
    by_name = {b.name: b for b in blocks}
    for name, entry in plan.blocks.items():
        if name not in by_name:
            raise ValueError(f"plan names block {name!r}, which the model does not have "
                             f"(blocks: {', '.join(list(by_name)[:3])}, ...)")
        b = by_name[name]
        for key, actual in (("num_heads", b.num_heads), ("num_kv_heads", b.num_kv_heads),
                            ("head_dim", b.head_dim), ("num_channels", b.channels)):
            if entry.get(key) != actual:
                raise ValueError(f"plan does not fit block {name!r}: {key} is "
                                 f"{entry.get(key)} in the plan, {actual} in the model")
        _check_indices(f"plan block {name!r} heads", entry.get("heads"), b.num_heads)
        _check_indices(f"plan block {name!r} channels", entry.get("channels"), b.channels)


def _selection(indices: list[int], device):
    """A range when contiguous (no index loads), else a sorted int64 tensor."""
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return range(indices[0], indices[0] + len(indices))
    return torch.tensor(indices, dtype=torch.int64, device=device)


def apply(model, plan: Plan, *, mode: str = "adapter", permute: bool = False,
          delta_dtype: torch.dtype = torch.float32):
    """Wrap the plan's parts of ``model`` in place and return it; all else is frozen.

    The model records ``model._s2ft = {"plan", "mode", "permutations"}``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if getattr(model, "_s2ft", None) is not None:
        raise RuntimeError("an S²FT plan is already applied to this model")
    blocks = find_blocks(model)
    check_plan(plan, blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    permutations = {}
    for b in blocks:
        if b.name not in plan.blocks:
            continue
        attention, mlp = modules[b.attention], modules[b.mlp]
        heads, channels = plan.blocks[b.name]["heads"], plan.blocks[b.name]["channels"]
        kv = kv_heads(heads, b.num_heads, b.num_kv_heads)
        if permute:
            perm = block_permutation(b, heads, channels)
            permute_block(attention, mlp, b, perm)
            permutations[b.name] = perm
            heads = [i for i, h in enumerate(perm["heads"]) if h in set(heads)]
            kv = list(range(len(kv)))
            channels = list(range(len(channels)))
        q_rows = head_rows(heads, b.head_dim).tolist()
        kv_rows = head_rows(kv, b.head_dim).tolist()
        parts = {"q_proj": ("rows", q_rows), "k_proj": ("rows", kv_rows),
                 "v_proj": ("rows", kv_rows), "o_proj": ("cols", q_rows),
                 "gate_proj": ("rows", channels), "up_proj": ("rows", channels),
                 "down_proj": ("cols", channels)}
        for parent, names in ((attention, ATTENTION), (mlp, MLP)):
            for name in names:
                side, indices = parts[name]
                if not indices:
                    continue
                base = getattr(parent, name)
                sel = {side: _selection(indices, base.weight.device)}
                layer = S2FTLinear(base, **sel, delta_dtype=delta_dtype) if mode == "adapter" \
                    else S2FTInPlaceLinear(base, **sel)
                setattr(parent, name, layer)
    model._s2ft = dict(plan=plan, mode=mode, permutations=permutations)
    return model


def layer_orders(block: Block, perm: dict) -> dict[str, tuple[str, torch.Tensor]]:
    """Per projection: (side, order) with order[new index] = original index."""
    d = block.head_dim
    heads = head_rows(perm["heads"], d)
    kv = head_rows(perm["kv_heads"], d)
    channels = torch.tensor(perm["channels"])
    return {"q_proj": ("rows", heads), "k_proj": ("rows", kv), "v_proj": ("rows", kv),
            "o_proj": ("cols", heads), "gate_proj": ("rows", channels),
            "up_proj": ("rows", channels), "down_proj": ("cols", channels)}


@torch.no_grad()
def _reselect(layer: S2FTLinear, order: torch.Tensor) -> None:
    """Move a layer's selection (and Δ) from permuted to original coordinates."""
    original, position = order[layer.indices().cpu()].sort()
    if not isinstance(layer, S2FTInPlaceLinear):
        dim = 1 if layer.mode == "cols" else 0
        layer.delta.data = layer.delta.data.index_select(dim, position.to(layer.delta.device))
    layer.index = original.to(layer.delta.device)
    layer.start = 0


def unpermute(model) -> None:
    """Undo ``apply(..., permute=True)``'s permutation: weights return to their original
    layout bit for bit; S²FT layers keep working, with selections (and Δ rows/columns)
    moved to original coordinates. Optimizer state is not remapped: call after training.
    """
    state = getattr(model, "_s2ft", None)
    if state is None:
        raise RuntimeError("no S²FT plan is applied to this model")
    modules = dict(model.named_modules())
    for b in find_blocks(model):
        perm = state["permutations"].get(b.name)
        if perm is None:
            continue
        attention, mlp = modules[b.attention], modules[b.mlp]
        for name, (_, order) in layer_orders(b, perm).items():
            layer = getattr(attention if name in ATTENTION else mlp, name)
            if isinstance(layer, S2FTLinear):
                _reselect(layer, order)
        permute_block(attention, mlp, b, invert(perm))
    state["permutations"] = {}


def s2ft_layers(model) -> dict[str, S2FTLinear]:
    """The model's S²FT layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, S2FTLinear)}


__all__ = ["apply", "unpermute", "check_plan", "s2ft_layers"]
