"""Transformer blocks, LLaMA-style and BERT-style, and the weight parts a head or channel owns.

One ``Block`` describes either kind by the roles of its Linears:
  role              LLaMA-style (decoder)      BERT-style (encoder layer L)
  query/key/value   self_attn.{q,k,v}_proj     L.attention.self.{query,key,value}
  attention_output  self_attn.o_proj           L.attention.output.dense
  ffn_in            mlp.gate_proj, mlp.up_proj L.intermediate.dense
  ffn_out           mlp.down_proj              L.output.dense
Query head h owns rows h*head_dim:(h+1)*head_dim of query and those columns of
attention_output; it reads K/V head h // (num_heads // num_kv_heads) (grouped-query
attention; BERT has num_kv_heads == num_heads). FFN channel c owns row c of every ffn_in
Linear and column c of ffn_out. ``Block.parts`` turns heads and channels into those rows
and columns; apply, co-permutation and adapter files all use it.
"""
from dataclasses import dataclass

import torch
from torch import nn

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
BERT_SELF_ATTENTION = ("query", "key", "value")


def head_rows(heads, head_dim: int) -> torch.Tensor:
    """The rows (int64, 1-D) of ``heads`` (in that order) of a weight with ``head_dim`` rows
    per head: h*head_dim ... (h+1)*head_dim - 1 for each h."""
    heads = torch.as_tensor(heads, dtype=torch.int64)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@dataclass(frozen=True)
class Block:
    """One transformer block: module names (full, in the model) of its Linears by role, and
    its sizes: query heads, K/V heads, rows per head, FFN channels."""
    name: str
    query: str
    key: str
    value: str
    attention_output: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    channels: int

    def kv_heads(self, heads) -> list[int]:
        """The K/V heads (sorted) that query heads ``heads`` read."""
        group = self.num_heads // self.num_kv_heads
        return sorted({h // group for h in heads})

    def parts(self, heads, channels, kv_heads=None) -> dict[str, tuple[str, torch.Tensor]]:
        """{module name: ("rows" | "cols", int64 indices)} that query ``heads`` and FFN
        ``channels`` own, in the order given; K/V rows are those of ``kv_heads`` (default:
        the K/V heads the query heads read). Modules given no index are left out."""
        q = head_rows(heads, self.head_dim)
        kv = head_rows(self.kv_heads(heads) if kv_heads is None else kv_heads, self.head_dim)
        ch = torch.as_tensor(channels, dtype=torch.int64).reshape(-1)
        parts = {self.query: ("rows", q), self.key: ("rows", kv), self.value: ("rows", kv),
                 self.attention_output: ("cols", q), **{n: ("rows", ch) for n in self.ffn_in},
                 self.ffn_out: ("cols", ch)}
        return {n: (side, idx) for n, (side, idx) in parts.items() if idx.numel()}


def _linear(module) -> nn.Linear | None:
    """The nn.Linear itself, or the one a kronops adapter layer wraps (its ``base``)."""
    if isinstance(module, nn.Linear):
        return module
    base = getattr(module, "base", None)
    return base if isinstance(base, nn.Linear) else None


def _linears(modules: dict, names) -> list[nn.Linear] | None:
    """The Linears of modules ``names`` (see ``_linear``), or None if one is not there."""
    found = [_linear(modules.get(n)) for n in names]
    return None if any(f is None for f in found) else found


def _config(model: nn.Module, key: str):
    """``model.config.<key>``, or None."""
    return getattr(getattr(model, "config", None), key, None)


def _llama(model, modules, name, attention) -> Block | None:
    """The LLaMA-style block whose attention module is ``name``, if its sibling is an MLP."""
    parent = name.rpartition(".")[0]
    prefix = f"{parent}." if parent else ""
    mlp = next((f"{prefix}{c}" for c, _ in modules[parent].named_children()
                if _linears(modules, [f"{prefix}{c}.{p}" for p in LLAMA_MLP])), None)
    if mlp is None:
        return None
    q, k, _, _ = _linears(modules, [f"{name}.{p}" for p in LLAMA_ATTENTION])
    head_dim = getattr(attention, "head_dim", None) or _config(model, "head_dim")
    if head_dim is None and _config(model, "num_attention_heads"):
        head_dim = _config(model, "hidden_size") // _config(model, "num_attention_heads")
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"{name}: cannot tell the attention head size: give the attention "
                         "module a head_dim attribute or the model a config with head_dim")
    if q.out_features % head_dim or k.out_features % head_dim or \
            (q.out_features // head_dim) % (k.out_features // head_dim):
        raise ValueError(f"{name}: q_proj ({q.out_features}) and k_proj ({k.out_features}) "
                         f"outputs are not whole groups of heads of size {head_dim}")
    gate = modules[f"{mlp}.gate_proj"]
    return Block(parent, *(f"{name}.{p}" for p in LLAMA_ATTENTION),
                 (f"{mlp}.gate_proj", f"{mlp}.up_proj"), f"{mlp}.down_proj",
                 q.out_features // head_dim, k.out_features // head_dim, head_dim,
                 gate.out_features)


def _bert(model, modules, name, self_attention) -> Block | None:
    """The BERT-style block whose self-attention module (query/key/value) is ``name``."""
    attention = name.rpartition(".")[0]
    layer = attention.rpartition(".")[0]
    if not attention or not layer:
        return None
    out, ffn_in, ffn_out = (f"{attention}.output.dense", f"{layer}.intermediate.dense",
                            f"{layer}.output.dense")
    if _linears(modules, [out, ffn_in, ffn_out]) is None:
        return None
    q, k, v = _linears(modules, [f"{name}.{p}" for p in BERT_SELF_ATTENTION])
    heads = getattr(self_attention, "num_attention_heads", None) or \
        _config(model, "num_attention_heads")
    if not isinstance(heads, int) or heads <= 0 or q.out_features % heads or \
            k.out_features != q.out_features or v.out_features != q.out_features:
        raise ValueError(f"{name}: cannot tell the number of attention heads (give the module "
                         f"num_attention_heads or the model a config with it), or query "
                         f"({q.out_features}), key ({k.out_features}) and value "
                         f"({v.out_features}) are not {heads} whole heads")
    return Block(layer, *(f"{name}.{p}" for p in BERT_SELF_ATTENTION), out, (ffn_in,), ffn_out,
                 heads, heads, q.out_features // heads, modules[ffn_in].out_features)


def find_blocks(model: nn.Module) -> list[Block]:
    """Every LLaMA-style and BERT-style block of ``model``, in model order.

    LLaMA-style: a module with q_proj, k_proj, v_proj, o_proj whose parent also holds a
    module with gate_proj, up_proj, down_proj (head size from the attention module's
    ``head_dim`` or the model config). BERT-style: a module with query, key, value inside
    ``L.attention`` with ``L.attention.output.dense``, ``L.intermediate.dense`` and
    ``L.output.dense`` (heads from its ``num_attention_heads`` or the model config).
    Linears may already be wrapped in kronops adapter layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    blocks = []
    for name, m in modules.items():
        if not name:
            continue
        if _linears(modules, [f"{name}.{p}" for p in LLAMA_ATTENTION]):
            block = _llama(model, modules, name, m)
        elif _linears(modules, [f"{name}.{p}" for p in BERT_SELF_ATTENTION]):
            block = _bert(model, modules, name, m)
        else:
            continue
        if block is not None:
            blocks.append(block)
    if not blocks:
        raise ValueError("no LLaMA-style blocks (q/k/v/o_proj beside gate/up/down_proj) and no "
                         "BERT-style blocks (attention.self.query/key/value, "
                         "attention.output.dense, intermediate.dense, output.dense) found")
    return blocks
