"""Transformer blocks of every supported family, and the weight parts a head or channel owns.

One table (``ATTENTION_LAYOUTS``, ``FFN_LAYOUTS``) describes the projections by their
module names, whatever the family; ``find_blocks`` finds them by structure:
  attention  children q, k, v, out of one module, as
               q_proj k_proj v_proj o_proj    LLaMA, Mistral, Qwen, Gemma, ...
               q_proj k_proj v_proj out_proj  OPT, BART, mBART, GPT-J, ...
               q_proj k_proj v_proj dense     Phi
               q k v o                        T5, mT5 (self- and cross-attention)
             or fused into one projection (its rows: ``FUSED_QKV``):
               qkv_proj o_proj                Phi-3 ([all q; all k; all v])
               c_attn c_proj                  GPT-2 (Conv1D, [q; k; v])
               query_key_value dense          GPT-NeoX, Falcon (per K/V group
                                              [its q heads; k; v], any group size)
             or BERT-style: S.query, S.key, S.value with S's parent's output.dense
  FFN        gate_proj up_proj -> down_proj (LLaMA), gate_up_proj -> down_proj (Phi-3,
             fused [gate; up]), fc1 -> fc2, fc_in -> fc_out, dense_h_to_4h -> dense_4h_to_h,
             c_fc -> c_proj, wi (or wi_0, wi_1) -> wo (T5), and BERT-style
             intermediate.dense -> output.dense.
A block is the smallest module holding one FFN and an attention (a ModuleList in between is
skipped, so T5's block is ``encoder.block.0``): its first attention is the block's self-
attention. Any further attention in it (a decoder's cross-attention: T5's EncDecAttention,
BART's encoder_attn) is a block of its own, named by its module, with heads and no channels.

Query head h owns ``query.units[h]`` (rows of the query projection) and the same columns
of the attention output; it reads K/V head h // (num_heads // num_kv_heads), whose rows
are ``key.units[g]`` and ``value.units[g]``. FFN channel c owns row ``units[c]`` of every
ffn_in slot and column c of ffn_out. ``Block.parts`` turns heads and channels into rows
and columns of each layer, ``Block.orders`` turns a co-permutation into one order per
layer; apply, selection, co-permutation and adapter files all use them. Linear layers may be
nn.Linear or transformers Conv1D (rows and columns of its (out, in) view), or already
wrapped in kronops adapter layers.
"""
from dataclasses import dataclass

import torch
from torch import nn

from ..s2ft.selection import Selection
from ..wrapped_linear import features, is_linear

# (q, k, v, out) children of one attention module.
SEPARATE_QKV = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
                ("q_proj", "k_proj", "v_proj", "dense"), ("q", "k", "v", "o"))
# (fused qkv, out) children, and how the fused rows are laid out.
FUSED_QKV = {("qkv_proj", "o_proj"): "concat", ("c_attn", "c_proj"): "concat",
             ("query_key_value", "dense"): "grouped"}
BERT_QKV = ("query", "key", "value")
# (ffn_in paths, ffn_out path) relative to one module; gate_up_proj is fused [gate; up].
FFN_LAYOUTS = ((("gate_proj", "up_proj"), "down_proj"), (("gate_up_proj",), "down_proj"),
               (("fc1",), "fc2"), (("fc_in",), "fc_out"), (("dense_h_to_4h",), "dense_4h_to_h"),
               (("c_fc",), "c_proj"), (("wi_0", "wi_1"), "wo"), (("wi",), "wo"),
               (("intermediate.dense",), "output.dense"))
FUSED_FFN_IN = ("gate_up_proj",)
HEAD_DIM_ATTRS = ("head_dim", "head_size", "key_value_proj_dim", "attention_head_size")
NUM_HEADS_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "n_head")


@dataclass(frozen=True, eq=False)
class Slot:
    """Where one role's units (heads or channels) sit in a linear layer: rows (``side``
    "rows") or columns ("cols") ``units[u]`` of the (out, in) weight of module ``module``
    belong to unit u. units: int64 (count, size); ``extent``: the layer's rows (or
    columns) in all."""
    module: str
    side: str
    units: torch.Tensor
    extent: int


@dataclass(frozen=True, eq=False)
class Block:
    """One transformer block: the slots of its projections by role, and its sizes. A
    cross-attention block has no FFN (``ffn_in`` empty, ``ffn_out`` None, 0 channels).
    ``permutable_heads`` is False where heads carry per-head state that co-permutation
    cannot move (T5's relative position bias, shared by all layers; ALiBi slopes)."""
    name: str
    query: Slot
    key: Slot
    value: Slot
    attention_output: Slot
    ffn_in: tuple[Slot, ...]
    ffn_out: Slot | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    channels: int
    permutable_heads: bool = True

    def kv_heads(self, heads) -> list[int]:
        """The K/V heads (sorted) that query heads ``heads`` read."""
        group = self.num_heads // self.num_kv_heads
        return sorted({h // group for h in heads})

    def _slots(self):
        """(slot, unit kind: "heads" | "kv_heads" | "channels") of every role."""
        out = [(self.query, "heads"), (self.key, "kv_heads"), (self.value, "kv_heads"),
               (self.attention_output, "heads")]
        out += [(s, "channels") for s in self.ffn_in]
        return out + ([(self.ffn_out, "channels")] if self.ffn_out is not None else [])

    @property
    def modules(self) -> list[str]:
        """The block's linear layers, each once, in role order."""
        return list(dict.fromkeys(s.module for s, _ in self._slots()))

    def parts(self, heads, channels) -> dict[str, tuple[str, torch.Tensor]]:
        """{module name: ("rows" | "cols", sorted int64 indices)}: what query ``heads``, the
        K/V heads they read and FFN ``channels`` own. Modules given no index are left out."""
        chosen = {"heads": heads, "kv_heads": self.kv_heads(heads), "channels": channels}
        found: dict[str, tuple[str, list]] = {}
        for slot, kind in self._slots():
            units = torch.as_tensor(chosen[kind], dtype=torch.int64).reshape(-1)
            found.setdefault(slot.module, (slot.side, []))[1].append(slot.units[units].flatten())
        parts = {n: (side, torch.cat(idx).sort().values) for n, (side, idx) in found.items()}
        return {n: part for n, part in parts.items() if part[1].numel()}

    def selections(self, heads, channels) -> dict[str, Selection]:
        """``parts`` as the ``Selection`` of each module's (out, in) weight."""
        extents = {slot.module: slot.extent for slot, _ in self._slots()}
        return {n: Selection(side, index, size=extents[n], name=f"{n} {side}")
                for n, (side, index) in self.parts(heads, channels).items()}

    def orders(self, perm: dict) -> dict[str, tuple[str, torch.Tensor]]:
        """{module name: (side, order)} for a co-permutation ``perm`` ({"heads", "kv_heads",
        "channels"}: position i holds the original unit perm[kind][i]): the new row (column)
        j of the module holds the original row order[j]."""
        orders = {}
        for slot, kind in self._slots():
            side, order = orders.setdefault(slot.module, (slot.side, torch.arange(slot.extent)))
            order[slot.units.flatten()] = slot.units[torch.as_tensor(perm[kind])].flatten()
        return orders


def _linear(module) -> nn.Module | None:
    """The linear layer itself, or the one a kronops adapter layer wraps (its ``base``)."""
    if is_linear(module):
        return module
    base = getattr(module, "base", None)
    return base if is_linear(base) else None


def _linears(modules: dict, names) -> list[nn.Module] | None:
    """The linear layers of modules ``names`` (see ``_linear``), or None if one is missing."""
    found = [_linear(modules.get(n)) for n in names]
    return None if any(f is None for f in found) else found


def _int_attr(objects, names) -> int | None:
    """The first positive int attribute ``names[i]`` of the first of ``objects`` having one."""
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _units(count: int, size: int, start: int = 0) -> torch.Tensor:
    """(count, size) table: unit u owns start + u*size ... start + (u+1)*size - 1."""
    return start + torch.arange(count * size).view(count, size)


def _slot(module: str, side: str, units: torch.Tensor, layer) -> Slot:
    in_f, out_f = features(layer)
    return Slot(module, side, units, out_f if side == "rows" else in_f)


@dataclass
class _Attention:
    """An attention found in the model: its module name and its q/k/v/out slots and sizes."""
    name: str
    query: Slot
    key: Slot
    value: Slot
    output: Slot
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _head_sizes(model, name, module, out_layer) -> tuple[int, int]:
    """(num_heads, head_dim) of the attention ``name``: from its attributes (head_dim,
    num_heads, ...), else the model config; the output projection's inputs are heads·dim."""
    width = features(out_layer)[0]
    config = getattr(model, "config", None)
    head_dim = _int_attr([module], HEAD_DIM_ATTRS)
    heads = _int_attr([module], NUM_HEADS_ATTRS)
    if head_dim is None and heads is None:
        head_dim = _int_attr([config], ("head_dim",))
        heads = None if head_dim else _int_attr([config], ("num_attention_heads",))
    head_dim = head_dim or (width // heads if heads else None)
    if not head_dim or width % head_dim:
        raise ValueError(f"{name}: cannot tell the attention head size (give the attention "
                         f"module a head_dim attribute or the model a config with head_dim or "
                         f"num_attention_heads), or the output projection's {width} inputs "
                         f"are not whole heads of {head_dim}")
    return width // head_dim, head_dim


def _fused_qkv(layout: str, heads: int, kv: int, head_dim: int):
    """(q, k, v) unit tables of a fused projection: "concat" [all q; all k; all v], or
    "grouped" per K/V head g [its heads // kv query heads; k_g; v_g]."""
    if layout == "concat":
        return (_units(heads, head_dim), _units(kv, head_dim, heads * head_dim),
                _units(kv, head_dim, (heads + kv) * head_dim))
    group = heads // kv
    rows = torch.arange((heads + 2 * kv) * head_dim).view(kv, group + 2, head_dim)
    return rows[:, :group].reshape(heads, head_dim), rows[:, group], rows[:, group + 1]


def _projections(modules, name):
    """({"q", "k", "v", "o"} or, fused, {"q", "o"}: module names; the fused layout or None)
    of the attention at module ``name``, if one of the layouts matches."""
    prefix = f"{name}."
    layouts = [(dict(zip("qkvo", (prefix + n for n in names))), None) for names in SEPARATE_QKV]
    parent = name.rpartition(".")[0]
    if parent:
        layouts.append((dict(zip("qkvo", [prefix + n for n in BERT_QKV] +
                                 [f"{parent}.output.dense"])), None))
    layouts += [(dict(zip("qo", (prefix + n for n in names))), fused)
                for names, fused in FUSED_QKV.items()]
    return next(((names, fused) for names, fused in layouts
                 if _linears(modules, names.values())), (None, None))


def _attention(model, modules, name, module) -> _Attention | None:
    """The attention whose module is ``name``, if its projections match a layout."""
    names, fused = _projections(modules, name)
    if names is None:
        return None
    if fused and getattr(module, "is_cross_attention", False):
        raise ValueError(f"{name}: a GPT-2-style cross-attention (keys and values from c_attn, "
                         "queries from q_attn) is not supported")
    layers = {role: _linear(modules[n]) for role, n in names.items()}
    heads, head_dim = _head_sizes(model, name, module, layers["o"])
    q_rows = features(layers["q"])[1]
    if fused:  # q_rows = (heads + 2 kv) head_dim
        kv = (q_rows - heads * head_dim) // (2 * head_dim)
        whole = q_rows == (heads + 2 * kv) * head_dim
    else:
        kv = features(layers["k"])[1] // head_dim
        whole = q_rows == heads * head_dim and \
            features(layers["k"])[1] == features(layers["v"])[1] == kv * head_dim
    if not whole or kv <= 0 or heads % kv:
        raise ValueError(f"{name}: the projections are not whole heads: {heads} query heads of "
                         f"size {head_dim} and {q_rows} {'fused q/k/v' if fused else 'query'} "
                         f"rows do not give a whole number of K/V heads dividing {heads}")
    tables = _fused_qkv(fused, heads, kv, head_dim) if fused else \
        (_units(heads, head_dim), _units(kv, head_dim), _units(kv, head_dim))
    q, k, v = (_slot(names[role if not fused else "q"], "rows", t,
                     layers[role if not fused else "q"]) for role, t in zip("qkv", tables))
    out = _slot(names["o"], "cols", _units(heads, head_dim), layers["o"])
    return _Attention(name, q, k, v, out, heads, kv, head_dim)


def _ffn(modules, name) -> tuple[tuple[Slot, ...], Slot, int] | None:
    """(ffn_in slots, ffn_out slot, channels) of the FFN whose projections hang off
    module ``name``, if they match a layout."""
    prefix = f"{name}." if name else ""
    for ins, out in FFN_LAYOUTS:
        found = _linears(modules, [prefix + n for n in ins + (out,)])
        if not found:
            continue
        channels = features(found[-1])[0]
        slots = []
        for n, layer in zip(ins, found):
            rows = features(layer)[1]
            parts = rows // channels if rows % channels == 0 else 0
            if parts != (2 if n in FUSED_FFN_IN else 1):
                raise ValueError(f"{prefix}{n}: {rows} outputs, expected "
                                 f"{'2 x ' * (n in FUSED_FFN_IN)}{channels} (the inputs of "
                                 f"{prefix}{out})")
            slots += [_slot(prefix + n, "rows", _units(channels, 1, i * channels), layer)
                      for i in range(parts)]
        return tuple(slots), _slot(prefix + out, "cols", _units(channels, 1), found[-1]), channels
    return None


def _within(name: str, ancestor: str) -> bool:
    """Whether module ``name`` is ``ancestor`` or inside it ("" is the model)."""
    return not ancestor or name == ancestor or name.startswith(ancestor + ".")


ALIBI_MODEL_TYPES = ("bloom",)  # always ALiBi; others say so in config.alibi


def _heads_permutable(model: nn.Module) -> bool:
    """False when heads carry per-head state: a relative position bias (T5) or ALiBi."""
    config = getattr(model, "config", None)
    alibi = getattr(config, "alibi", False) or \
        getattr(getattr(config, "attn_config", None), "alibi", False) or \
        getattr(config, "model_type", None) in ALIBI_MODEL_TYPES
    if alibi:
        return False
    return not any(isinstance(getattr(m, "relative_attention_bias", None), nn.Embedding)
                   for m in model.modules())


def _block(name, attention: _Attention, ffn, permutable: bool) -> Block:
    ffn_in, ffn_out, channels = ffn if ffn is not None else ((), None, 0)
    a = attention
    return Block(name, a.query, a.key, a.value, a.output, ffn_in, ffn_out, a.num_heads,
                 a.num_kv_heads, a.head_dim, channels, permutable)


def find_blocks(model: nn.Module) -> list[Block]:
    """Every transformer block of ``model``, in model order (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules())
    attentions, ffns = [], {}
    for name, m in modules.items():
        if name and not is_linear(_linear(m)):
            found = _attention(model, modules, name, m)
            if found is not None:
                attentions.append(found)
        if not is_linear(_linear(m)):
            found = _ffn(modules, name)
            if found is not None:
                ffns[name] = found
    permutable = _heads_permutable(model)
    blocks, paired = {}, set()
    for ffn_name, ffn in ffns.items():
        layer = ffn_name
        while True:
            inside = [a for a in attentions if _within(a.name, layer)]
            if inside or not layer:
                break
            layer = layer.rpartition(".")[0]
        while layer and isinstance(modules[layer], nn.ModuleList):
            layer = layer.rpartition(".")[0]
        inside = [a for a in attentions if _within(a.name, layer)]
        if not inside or sum(_within(f, layer) for f in ffns) != 1:
            continue  # an FFN without an attention of its own
        blocks[inside[0].name] = _block(layer, inside[0], ffn, permutable)
        paired.add(inside[0].name)
    for a in attentions:  # cross-attention, and attention without an FFN: heads only
        if a.name not in paired:
            blocks[a.name] = _block(a.name, a, None, permutable)
    if not blocks:
        raise ValueError("no transformer blocks found: kronops knows attention projections "
                         "named q_proj/k_proj/v_proj/(o_proj|out_proj|dense), q/k/v/o, "
                         "qkv_proj+o_proj, c_attn+c_proj, query_key_value+dense and BERT's "
                         "attention.self.query/key/value, and FFNs named gate_proj/up_proj/"
                         "down_proj, gate_up_proj/down_proj, fc1/fc2, fc_in/fc_out, "
                         "dense_h_to_4h/dense_4h_to_h, c_fc/c_proj, wi(_0, _1)/wo and "
                         "intermediate.dense/output.dense")
    order = {a.name: i for i, a in enumerate(attentions)}
    return [blocks[n] for n in sorted(blocks, key=order.get)]
