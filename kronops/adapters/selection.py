"""S²FT selection: which attention heads and FFN channels of each block to train.

``select(model, heads=..., channels=..., strategy=...)`` returns a ``Plan``: per block
(``blocks``: every supported family; a cross-attention block has heads and no channels),
sorted query-head and channel indices, with
the strategy and seed, serialisable to JSON. Strategies score every head and channel and
keep the highest scores:
  random      uniform random scores from ``seed``
  weight      squared norm of the weights the selection trains (query rows + attention
              output columns of a head; ffn_in rows + ffn_out column of a channel)
  activation  squared inputs of the attention output (per head) and of ffn_out (per
              channel), summed over the calibration batches
  gradient    Fisher-style: squared gradients of the weights "weight" scores, summed over
              the calibration batches (needs a loss: ``loss_fn(output, batch)`` or output.loss)
``heads``/``channels``: an int is a count per block (blocks without channels get none); a float in [0, 1] a fraction of the
model's total (heads: query heads of every block together; channels: FFN channels), chosen
across all blocks by score. The count a fraction f of a total n gives is f·n rounded to the
nearest whole number, halves rounded up, with f taken as written in decimal (0.05, not the
binary float just below it), and at least 1 when f > 0:
  0.05 of 24 heads (2 blocks of 12) -> 1.2 -> 1;  0.05 of 36 -> 1.8 -> 2;
  0.125 of 36 -> 4.5 -> 5;  0.01 of 12 -> 0.12 -> 1 (f > 0);  0.0 -> 0.
"""
import json
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch
from torch import nn

from ..s2ft.selection import Selection, check_sorted_unique
from ..wrapped_linear import as_out_in, is_linear, out_in_weight
from .blocks import Block, Slot, find_blocks
from .errors import AdapterFileError
from .json_checks import expect_keys, is_int

STRATEGIES = ("random", "weight", "activation", "gradient")


@dataclass
class Plan:
    """Per block name: {"heads": [...], "channels": [...]} (sorted query heads and FFN
    channels to train) plus the block's sizes (num_heads, num_kv_heads, head_dim,
    num_channels), which ``check_plan`` compares with the model's."""
    strategy: str
    seed: int
    blocks: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text) -> "Plan":
        """The plan ``to_json`` wrote; a malformed one raises ``AdapterFileError`` (a
        ValueError) naming the problem (``from_dict``)."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise TypeError(f"text must be a JSON str, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise AdapterFileError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data) -> "Plan":
        """A plan from its JSON form ({"strategy", "seed", "blocks"}), checked for structure:
        every key present and of its type, indices sorted, unique and within the block's
        sizes. Anything else raises ``AdapterFileError`` (a ValueError) naming it. (Whether
        the plan fits a model is ``check_plan``'s question.)"""
        expect_keys("plan", data, PLAN_KEYS)
        strategy, seed, blocks = data["strategy"], data["seed"], data["blocks"]
        if not isinstance(strategy, str) or not strategy:
            raise AdapterFileError(f"plan strategy must be a non-empty str, got {strategy!r}")
        if not is_int(seed):
            raise AdapterFileError(f"plan seed must be an int, got {seed!r}")
        if not isinstance(blocks, dict):
            raise AdapterFileError(f"plan blocks must be a dict, got {type(blocks).__name__}")
        checked = {}
        for name, entry in blocks.items():
            where = f"plan block {name!r}"
            if not name:
                raise AdapterFileError("plan names a block with an empty name")
            expect_keys(where, entry, BLOCK_KEYS)
            for key in ("num_heads", "num_kv_heads", "head_dim", "num_channels"):
                least = 0 if key == "num_channels" else 1  # cross-attention: no channels
                if not is_int(entry[key]) or entry[key] < least:
                    raise AdapterFileError(f"{where} {key} must be an int >= {least}, "
                                           f"got {entry[key]!r}")
            if entry["num_heads"] % entry["num_kv_heads"]:
                raise AdapterFileError(f"{where}: num_heads {entry['num_heads']} is not a "
                                       f"multiple of num_kv_heads {entry['num_kv_heads']}")
            for key, limit in (("heads", entry["num_heads"]),
                               ("channels", entry["num_channels"])):
                values = entry[key]
                if not isinstance(values, list) or not all(is_int(v) for v in values):
                    raise AdapterFileError(f"{where} {key} must be a list of ints, "
                                           f"got {values!r}")
                if any(b <= a for a, b in zip(values, values[1:])) or \
                        any(not 0 <= v < limit for v in values):
                    raise AdapterFileError(f"{where} {key} must be sorted, unique and in "
                                           f"[0, {limit}), got {values}")
            checked[name] = {k: (list(v) if isinstance(v, list) else v) for k, v in entry.items()}
        return cls(strategy, seed, checked)


PLAN_KEYS = ("blocks", "seed", "strategy")
BLOCK_KEYS = ("channels", "head_dim", "heads", "num_channels", "num_heads", "num_kv_heads")


def _count(name: str, value, per_block: list[int]):
    """(per-block count or None, model-total count or None) from an int or a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int (per block) or a float fraction, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (a count per block), got {value}")
        smallest = min([n for n in per_block if n] or [0])
        if value > smallest:
            raise ValueError(f"{name} = {value} per block, but blocks have {smallest}")
        return value, None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} as a fraction must lie in [0, 1], got {value}")
    return None, fraction_count(value, sum(per_block))


def fraction_count(fraction: float, total: int) -> int:
    """How many of ``total`` a fraction selects (see the module docstring): fraction·total
    to the nearest whole number, halves up, the fraction read as its decimal repr, and at
    least 1 when the fraction is positive."""
    exact = Fraction(repr(float(fraction))) * total
    count = math.floor(exact + Fraction(1, 2))
    return min(total, max(count, 1 if fraction > 0 and total > 0 else 0))


def _run(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _loss(output, batch, loss_fn):
    if loss_fn is not None:
        return loss_fn(output, batch)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    if loss is None:
        raise ValueError("strategy='gradient' needs a loss: pass loss_fn(output, batch) or "
                         "batches for which the model returns .loss")
    return loss


def _scored_slots(block: Block) -> tuple[list, list]:
    """(head slots, channel slots) that the weight and gradient strategies score: query
    rows + attention output columns of a head (K/V heads are shared under grouped-query
    attention); every ffn_in row + the ffn_out column of a channel."""
    ffn = list(block.ffn_in) + ([block.ffn_out] if block.ffn_out is not None else [])
    return [block.query, block.attention_output], ffn


def _line_sums(slot: Slot, t: torch.Tensor) -> torch.Tensor:
    """Squared sums of the (out, in) tensor ``t`` along the slot's side: per row or column."""
    return t.detach().float().square().sum(1 if slot.side == "rows" else 0)


def _unit_scores(slots: list[Slot], sums: list[torch.Tensor], count: int) -> torch.Tensor:
    """Per unit (head or channel) the sum over ``slots`` of the per-row/column ``sums`` of
    the lines it owns, fp64 on CPU; (count,) zeros when there are no slots."""
    total = torch.zeros(count, dtype=torch.float64)
    for slot, line in zip(slots, sums):
        total += line.double().cpu()[slot.units].sum(1)
    return total


def _scores(model, blocks, strategy, calibration, loss_fn, generator):
    """Per block: (head scores (num_heads,), channel scores (channels,)) in fp64 on CPU."""
    modules = dict(model.named_modules())
    if strategy == "random":
        return [(torch.rand(b.num_heads, generator=generator, dtype=torch.float64),
                 torch.rand(b.channels, generator=generator, dtype=torch.float64))
                for b in blocks]
    scored = [_scored_slots(b) for b in blocks]

    def per_unit(b, heads, head_sums, channels, channel_sums):
        return (_unit_scores(heads, head_sums, b.num_heads),
                _unit_scores(channels, channel_sums, b.channels))

    if strategy == "weight":
        def norms(slots):
            return [_line_sums(s, out_in_weight(modules[s.module])) for s in slots]
        return [per_unit(b, h, norms(h), c, norms(c)) for b, (h, c) in zip(blocks, scored)]
    if calibration is None:
        raise ValueError(f"strategy={strategy!r} needs calibration batches")
    if strategy == "activation":
        sums = {}

        def hook(key):
            def fn(module, args):
                sums[key] = sums.get(key, 0) + args[0].detach().float().square() \
                    .reshape(-1, args[0].shape[-1]).sum(0)
            return fn
        outputs = [[b.attention_output] + ([b.ffn_out] if b.ffn_out is not None else [])
                   for b in blocks]
        handles = [modules[s.module].register_forward_pre_hook(hook(s.module))
                   for slots in outputs for s in slots]
        try:
            with torch.no_grad():
                for batch in calibration:
                    _run(model, batch)
        finally:
            for h in handles:
                h.remove()
        if not sums:
            raise ValueError("calibration is empty")
        return [per_unit(b, slots[:1], [sums[slots[0].module]],
                         slots[1:], [sums[s.module] for s in slots[1:]])
                for b, slots in zip(blocks, outputs)]
    # gradient: squared weight gradients, reduced to rows/columns after every batch
    weights = [[(modules[s.module], s) for s in h + c] for h, c in scored]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    grads = {id(p): p.grad for p in model.parameters()}  # the caller's, put back after
    sums = [[0] * len(w) for w in weights]
    batches = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for block in weights:
            for layer, _ in block:
                layer.weight.requires_grad_(True)
        for batch in calibration:
            _loss(_run(model, batch), batch, loss_fn).backward()
            for i, block in enumerate(weights):
                for j, (layer, slot) in enumerate(block):
                    sums[i][j] = sums[i][j] + _line_sums(slot, as_out_in(layer, layer.weight.grad))
            for block in weights:
                for layer, _ in block:
                    layer.weight.grad = None
            batches += 1
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = grads[id(p)]
    if not batches:
        raise ValueError("calibration is empty")
    return [per_unit(b, h, s[:len(h)], c, s[len(h):])
            for b, s, (h, c) in zip(blocks, sums, scored)]


def _check_unwrapped(model, blocks, strategy: str) -> None:
    """The weight and gradient strategies read projection weights: S²FT layers have none."""
    modules = dict(model.named_modules())
    for b in blocks:
        heads, channels = _scored_slots(b)
        for name in dict.fromkeys(s.module for s in heads + channels):
            if not is_linear(modules[name]):
                raise ValueError(f"strategy={strategy!r} scores plain nn.Linear weights, but "
                                 f"{name} is already wrapped in a "
                                 f"{type(modules[name]).__name__}: select before "
                                 f"apply_adapters, or use strategy='random' or 'activation'")


def _top(scores: list[torch.Tensor], per_block, total) -> list[list[int]]:
    """Indices of the highest scores: ``per_block`` in each block, or ``total`` overall."""
    if per_block is not None:  # blocks without channels (cross-attention) get none
        return [sorted(s.topk(min(per_block, len(s))).indices.tolist()) for s in scores]
    flat = torch.cat(scores)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.topk(total).indices] = True
    return [sorted(c.nonzero().flatten().tolist()) for c in chosen.split([len(s) for s in scores])]


def _check_indices(where: str, values, limit: int) -> None:
    if not isinstance(values, list) or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{where} must be a list of ints, got {values!r}")
    check_sorted_unique(where, torch.tensor(values, dtype=torch.int64), limit)


def check_plan(plan: Plan, blocks: list[Block]) -> None:
    """The plan names only blocks of the model, with matching sizes and valid indices."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a kronops.adapters.Plan, got {type(plan).__name__}")
    by_name = {b.name: b for b in blocks}
    for name, entry in plan.blocks.items():
        if name not in by_name:
            raise ValueError(f"plan names block {name!r}, which the model does not have "
                             f"(blocks: {', '.join(list(by_name)[:3])}, ...)")
        b = by_name[name]
        if not isinstance(entry, dict):
            raise TypeError(f"plan block {name!r} must be a dict, got {entry!r}")
        for key, actual in (("num_heads", b.num_heads), ("num_kv_heads", b.num_kv_heads),
                            ("head_dim", b.head_dim), ("num_channels", b.channels)):
            if entry.get(key) != actual:
                raise ValueError(f"plan does not fit block {name!r}: {key} is "
                                 f"{entry.get(key)} in the plan, {actual} in the model")
        _check_indices(f"plan block {name!r} heads", entry.get("heads"), b.num_heads)
        _check_indices(f"plan block {name!r} channels", entry.get("channels"), b.channels)


def plan_selections(blocks: list[Block], plan: Plan) -> dict[str, Selection]:
    """{module name: the rows or columns of its weight} that ``plan`` trains, in the
    original layout (``Block.selections``)."""
    by_name = {b.name: b for b in blocks}
    return {name: sel for block, entry in plan.blocks.items()
            for name, sel in by_name[block].selections(entry["heads"], entry["channels"]).items()}


def select(model, *, heads=0, channels=0, strategy: str = "random", calibration=None,
           seed: int = 0, loss_fn=None) -> Plan:
    """A selection plan for every block of ``model`` (see the module docstring).

    Heads are query heads; ``apply_adapters`` maps them to K/V heads under grouped-query
    attention. Nothing in the model changes (gradient: flags and .grad are put back).
    calibration: an iterable of batches (dict: model(**batch), tuple: model(*batch), else
    model(batch)), needed by "activation" and "gradient".
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    blocks = find_blocks(model)
    if strategy in ("weight", "gradient"):
        _check_unwrapped(model, blocks, strategy)
    head_k, head_total = _count("heads", heads, [b.num_heads for b in blocks])
    chan_k, chan_total = _count("channels", channels, [b.channels for b in blocks])
    generator = torch.Generator().manual_seed(seed)
    scores = _scores(model, blocks, strategy, calibration, loss_fn, generator)
    chosen_heads = _top([s[0] for s in scores], head_k, head_total)
    chosen_channels = _top([s[1] for s in scores], chan_k, chan_total)
    plan = Plan(strategy, seed)
    for b, h, c in zip(blocks, chosen_heads, chosen_channels):
        plan.blocks[b.name] = dict(heads=h, channels=c, num_heads=b.num_heads,
                                   num_kv_heads=b.num_kv_heads, head_dim=b.head_dim,
                                   num_channels=b.channels)
    return plan
