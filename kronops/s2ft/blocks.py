"""Finding LLaMA-style transformer blocks: attention (q/k/v/o_proj) and MLP (gate/up/down_proj)."""
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Block:
    """One block: module names of its attention and MLP, and their sizes.

    Query head h owns rows h*head_dim:(h+1)*head_dim of q_proj and those columns of
    o_proj; it reads K/V head h // (num_heads // num_kv_heads) (grouped-query attention).
    MLP channel c owns row c of gate_proj and up_proj and column c of down_proj.
    """
    name: str
    attention: str
    mlp: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    channels: int


def head_rows(heads, head_dim: int) -> torch.Tensor:
    """The rows (int64) of heads ``heads`` (in that order) in a weight with ``head_dim`` rows
    per head: h*head_dim ... (h+1)*head_dim - 1 for each h."""
    heads = torch.as_tensor(heads, dtype=torch.int64)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def kv_heads(heads, num_heads: int, num_kv_heads: int) -> list[int]:
    """The K/V heads (sorted) that query heads ``heads`` use under grouped-query attention."""
    group = num_heads // num_kv_heads
    return sorted({h // group for h in heads})


def _is_linear(module) -> bool:
    """An nn.Linear, or an S²FT layer wrapping one (its ``base``)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base", None), nn.Linear)


def _has(module: nn.Module, names) -> bool:
    return all(_is_linear(getattr(module, n, None)) for n in names)


def _head_dim(model: nn.Module, attention: nn.Module) -> int:
    head_dim = getattr(attention, "head_dim", None)
    config = getattr(model, "config", None)
    if head_dim is None and config is not None:
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError("cannot tell the attention head size: give the attention modules a "
                         "head_dim attribute or the model a config with head_dim")
    return head_dim


def find_blocks(model: nn.Module) -> list[Block]:
    """Every block whose parent module holds an attention and an MLP child, in model order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    attentions = [n for n, m in modules.items() if _has(m, ATTENTION)]
    mlps = {n.rpartition(".")[0]: n for n, m in modules.items() if _has(m, MLP)}
    blocks = []
    for attn_name in attentions:
        parent = attn_name.rpartition(".")[0]
        if parent not in mlps:
            continue
        attn, mlp = modules[attn_name], modules[mlps[parent]]
        head_dim = _head_dim(model, attn)
        q, k = attn.q_proj.out_features, attn.k_proj.out_features
        if q % head_dim or k % head_dim or (q // head_dim) % (k // head_dim):
            raise ValueError(f"{attn_name}: q_proj ({q}) and k_proj ({k}) outputs are not whole "
                             f"groups of heads of size {head_dim}")
        blocks.append(Block(parent, attn_name, mlps[parent], q // head_dim, k // head_dim,
                            head_dim, mlp.gate_proj.out_features))
    if not blocks:
        raise ValueError("no LLaMA-style blocks found: expected modules with q_proj, k_proj, "
                         "v_proj, o_proj and a sibling with gate_proj, up_proj, down_proj")
    return blocks
