"""Whole models, every method, one call each: ``apply_adapters``, ``merge_adapters``,
``unmerge_adapters``; ``trainable_parameters`` (what is trained) and ``disable_adapters``
(the base model's outputs, for a while).

``apply_adapters(model, method="krona", target_modules=None, **config)`` wraps Linears of
``model`` in place, freezes every other parameter, records what it did in ``model._kronops``
(an ``AdapterState``) and returns ``model`` (as PEFT's ``get_peft_model`` returns its model;
``trainable_parameters(model)`` gives the summary, ``verbose=True`` prints it):
  method="krona"  each target module (``targets``; None: the architecture's defaults)
                  becomes a ``KronALinear``, base(x) + s * x @ kron(A, B).T.
                  config: a_shape (None, a pair, or {module suffix: pair}), rank, alpha, dropout.
                  alpha: a positive finite number, or None (the layer's default: rank, or 1
                  without one); a negative alpha (the update's sign flipped) or 0 (no update)
                  is almost surely a mistake and raises a ValueError.
  method="krona_block"  KronA^B (``residual=True``: KronA^B_res): a Kronecker adapter in
                  parallel with every attention and FFN sub-layer of every block
                  (``sublayer``; cross-attention included), wrapping the sub-layer's output
                  projection as a ``KronASublayer``. config: a_shape (pair, or {output
                  module suffix: pair}), rank, alpha (as for "krona"), residual. Cannot be
                  merged.
  method="s2ft"   every transformer block (``blocks``: every supported family) trains the
                  weight parts of its selected query heads and FFN channels (``Block.parts``).
                  config: plan (a ``Plan`` from ``select``) or the selection itself: ratio
                  (fraction of heads and of channels, in (0, 1]) or heads/channels (an int
                  per block, or a fraction of the model total; not both ratio and
                  heads/channels: a ValueError), strategy, seed, calibration,
                  loss_fn (see ``selection``; how a fraction is rounded is documented there).
                  With none of plan, ratio, heads, channels: ratio=DEFAULT_S2FT_RATIO (0.05,
                  5% of the model's query heads and of its FFN channels, chosen at random
                  across blocks, at least one of each), the fraction the S²FT paper trains.
                  Given heads but not channels (or the reverse), the other is 0. And:
                  mode     "adapter" (default): ``S2FTLinear``, a trainable Δ (dtype
                           ``delta_dtype``, fp32 default) over the frozen weight, mergeable;
                           "inplace": ``S2FTInPlaceLinear``, the selected rows/columns of the
                           weight trained in place (``kronops.s2ft.InPlaceAdamW``/``InPlaceSGD``;
                           a torch.optim optimizer given those parameters raises a ValueError
                           saying so at its first step, before it changes anything);
                  permute  co-permute each block first so selections are contiguous
                           (``permutation``; ``unpermute`` restores the original layout).
                  A K/V head is trained when any query head of its group is selected (it is
                  shared: its update is seen by the whole group).
``train_modules``: names (matched as ``target_modules``) of further modules left trainable,
e.g. a classifier head; ``save_adapters`` stores them with the adapters.
The base model's ``fingerprint`` over the adapted modules is taken before anything is
wrapped (``AdapterState.base``): adapter files record it (``files``).
New adapter layers take the training mode of the Linear they wrap: adapters added to (or
loaded into) a model in ``eval()`` mode are in eval mode too (no dropout at inference).

Linear layers are nn.Linear or GPT-2-style ``transformers.pytorch_utils.Conv1D`` (weight
stored (in, out)): adapters take its (out, in) view, no copy (``wrapped_linear``).
"""
import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checks import check_number
from ..kron.modules import check_rank, factor_shapes
from ..s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from ..wrapped_linear import features, is_linear
from .blocks import Block, find_blocks
from .fingerprint import fingerprint
from .lokr import KIND_KRONA, build_layer, layer_config
from .permutation import block_permutation, permute_block, unpermute
from .selection import Plan, check_plan, select
from .state import METHODS, MODES, STATE, AdapterState, adapter_modules, adapter_state
from .sublayer import (KIND_SUBLAYER, KronASublayer, build_sublayer, sublayer_config,
                       sublayer_pairs)
from .targets import default_targets, linear_names, match_modules

KRONA_KEYS = ("a_shape", "rank", "alpha", "dropout")
KRONA_BLOCK_KEYS = ("a_shape", "rank", "alpha", "residual")
SELECTION_KEYS = ("ratio", "heads", "channels", "strategy", "seed", "calibration", "loss_fn")
S2FT_OPTIONS = ("mode", "permute", "delta_dtype")
S2FT_KEYS = ("plan",) + SELECTION_KEYS + S2FT_OPTIONS
DEFAULT_S2FT_RATIO = 0.05  # apply_adapters(model, "s2ft") with no selection: 5% of heads/channels


@dataclass
class AdapterSummary:
    """A model's adapters (``trainable_parameters(model)``): method, adapter module names,
    trainable and total parameter counts, further trainable modules. ``print`` it."""
    method: str
    modules: list[str]
    trainable: int
    total: int
    train_modules: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        extra = f" + {len(self.train_modules)} trainable module(s)" if self.train_modules else ""
        return (f"kronops {self.method}: {len(self.modules)} adapter module(s){extra}; "
                f"trainable params {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)")


def _check_config(method: str, config: dict) -> None:
    allowed = {"krona": KRONA_KEYS, "krona_block": KRONA_BLOCK_KEYS, "s2ft": S2FT_KEYS}[method]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise TypeError(f"unknown config for method={method!r}: {', '.join(unknown)}; "
                        f"allowed: {', '.join(allowed)}")


def _a_shape_for(name: str, a_shape):
    """The a_shape for module ``name``: the value itself or the longest matching dict key."""
    if not isinstance(a_shape, dict):
        return a_shape
    keys = [k for k in a_shape if name == k or name.endswith("." + k)]
    return a_shape[max(keys, key=len)] if keys else None


def _check_factor_args(rank, alpha) -> None:
    """The layer's rules (``check_rank``, a finite alpha), and alpha > 0."""
    check_rank(rank)
    if alpha is None:
        return
    try:
        positive = check_number("alpha", alpha) > 0  # TypeError for a non-number
    except ValueError:  # not finite
        positive = False
    if not positive:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r} (a negative "
                         "alpha flips the update's sign, 0 switches it off; None: the default)")


def _factor_a_shape(name: str, in_features: int, out_features: int, a_shape, rank) -> list:
    """[a1, a2] for module ``name`` (``_a_shape_for``), checked against its size and rank."""
    try:
        (a1, a2), _ = factor_shapes(in_features, out_features, _a_shape_for(name, a_shape))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if rank is not None and rank > min(a1, a2):
        raise ValueError(f"{name}: rank {rank} exceeds min(a1, a2) = {min(a1, a2)} "
                         f"for a_shape ({a1}, {a2}) ({out_features}x{in_features} "
                         f"weight); {_rank_hint(out_features, in_features, rank, a1, a2)}")
    return [a1, a2]


def krona_layer_configs(model: nn.Module, names: list[str], *, a_shape=None, rank=None,
                        alpha=None, dropout=0.0) -> dict[str, dict]:
    """Per target name its KronALinear settings (``lokr.build_layer``'s), validated against
    the module's shape."""
    _check_factor_args(rank, alpha)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
            not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    configs = {}
    for name in names:
        module = model.get_submodule(name)
        if not is_linear(module):
            raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear "
                            "(or transformers Conv1D)")
        in_features, out_features = features(module)
        configs[name] = dict(kind=KIND_KRONA, in_features=in_features,
                             out_features=out_features,
                             a_shape=_factor_a_shape(name, in_features, out_features, a_shape,
                                                     rank),
                             rank=rank, alpha=alpha, dropout=float(dropout))
    return configs


def sublayer_configs(model: nn.Module, blocks: list[Block], *, a_shape=None, rank=None,
                     alpha=None, residual=False) -> dict[str, dict]:
    """Per sub-layer output module its KronASublayer settings (``sublayer.build_sublayer``'s),
    validated: one per attention and FFN sub-layer of every block."""
    _check_factor_args(rank, alpha)
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {residual!r}")
    configs = {}
    for name, source in sublayer_pairs(blocks).items():
        in_features = features(model.get_submodule(source))[0]
        out_features = features(model.get_submodule(name))[1]
        if residual and in_features != out_features:
            raise ValueError(f"{name}: residual=True needs the sub-layer's input and output "
                             f"sizes equal, got {in_features} and {out_features}")
        configs[name] = dict(kind=KIND_SUBLAYER, source=source, in_features=in_features,
                             out_features=out_features,
                             a_shape=_factor_a_shape(name, in_features, out_features, a_shape,
                                                     rank),
                             rank=rank, alpha=alpha, residual=residual)
    return configs


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _rank_hint(out_features: int, in_features: int, rank: int, a1: int, a2: int) -> str:
    """What would work instead of ``rank`` with a_shape (a1, a2): a smaller rank, or an
    a_shape (a1 | out_features, a2 | in_features) with both sides >= rank."""
    shapes = [(x, y) for x in _divisors(out_features) for y in _divisors(in_features)]
    fits = [s for s in shapes if min(s) >= rank]
    if not fits:
        return (f"use rank <= {min(a1, a2)} (no a_shape of this weight allows rank {rank}: "
                f"the largest possible is {max(min(s) for s in shapes)})")
    best = min(fits, key=lambda s: (abs(math.log(s[0] / math.sqrt(out_features))) +
                                    abs(math.log(s[1] / math.sqrt(in_features))), s))
    return (f"use rank <= {min(a1, a2)}, or an a_shape (a1, a2) with a1 dividing "
            f"{out_features}, a2 dividing {in_features} and both >= {rank}, e.g. "
            f"a_shape={best}")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the model's module ``name``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def wrap_krona(model: nn.Module, configs: dict[str, dict]) -> None:
    """Replace each named linear layer by the KronA, LoKr or KronA^B layer its (validated)
    config gives, in the layer's training mode."""
    for name, cfg in configs.items():
        base = model.get_submodule(name)
        layer = build_sublayer(base, model.get_submodule(cfg["source"]), cfg) \
            if cfg["kind"] == KIND_SUBLAYER else build_layer(base, cfg)
        set_module(model, name, layer.train(base.training))


def _s2ft_options(config: dict) -> tuple[str, bool, torch.dtype]:
    """(mode, permute, delta_dtype), taken out of ``config`` and checked."""
    mode = config.pop("mode", "adapter")
    permute = config.pop("permute", False)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(permute, bool):
        raise TypeError(f"permute must be a bool, got {permute!r}")
    if "delta_dtype" in config and mode == "inplace":
        raise ValueError("delta_dtype applies to mode='adapter' only (in-place S²FT trains the "
                         "weight in its own dtype)")
    delta_dtype = config.pop("delta_dtype", torch.float32)
    if not isinstance(delta_dtype, torch.dtype) or not delta_dtype.is_floating_point:
        raise TypeError(f"delta_dtype must be a floating-point torch.dtype, got {delta_dtype!r}")
    return mode, permute, delta_dtype


def _s2ft_plan(model: nn.Module, blocks: list[Block], plan=None, ratio=None, heads=None,
               channels=None, **selection) -> Plan:
    """A copy of the given plan, checked against the blocks, or ``select``'s plan."""
    if plan is not None:
        given = [k for k, v in dict(ratio=ratio, heads=heads, channels=channels,
                                    **selection).items() if v is not None]
        if given:
            raise ValueError(f"plan= is the selection: give it or {', '.join(SELECTION_KEYS)}, "
                             f"not both (got plan and {', '.join(given)})")
        check_plan(plan, blocks)
        return copy.deepcopy(plan)
    if ratio is not None:
        given = [k for k, v in dict(heads=heads, channels=channels).items() if v is not None]
        if given:
            raise ValueError("ratio is the fraction of heads and of channels: give ratio or "
                             f"heads/channels, not both (got ratio and {', '.join(given)})")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or \
                not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio!r}")
        heads = channels = float(ratio)
    if heads is None and channels is None:
        heads = channels = DEFAULT_S2FT_RATIO
    return select(model, heads=heads or 0, channels=channels or 0, **selection)


def _selection(indices: torch.Tensor):
    """A range when contiguous (no index loads), else the sorted int64 tensor."""
    start, count = int(indices[0]), indices.numel()
    if torch.equal(indices.cpu(), torch.arange(start, start + count)):
        return range(start, start + count)
    return indices


def wrap_s2ft(model: nn.Module, blocks: list[Block], plan: Plan, mode: str,
              permute: bool = False, delta_dtype: torch.dtype = torch.float32) -> dict:
    """Wrap the plan's parts of every block in S²FT layers of ``mode``, co-permuting each
    block first when ``permute``; returns the permutations (block name -> perm)."""
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
        for name, (side, indices) in b.parts(heads, channels).items():
            base = model.get_submodule(name)
            sel = {side: _selection(indices.to(base.weight.device))}
            layer = S2FTLinear(base, **sel, delta_dtype=delta_dtype) if mode == "adapter" \
                else S2FTInPlaceLinear(base, **sel)
            set_module(model, name, layer.train(base.training))
    return permutations


def plan_parts(blocks: list[Block], plan: Plan) -> dict[str, tuple[str, torch.Tensor]]:
    """{module name: (side, indices)} that ``plan`` trains, in the original layout."""
    by_name = {b.name: b for b in blocks}
    return {name: part for block, entry in plan.blocks.items()
            for name, part in by_name[block].parts(entry["heads"], entry["channels"]).items()}


def _check_overlap(train: list[str], adapted: list[str]) -> None:
    overlap = [n for n in train if any(n == c or c.startswith(n + ".") or n.startswith(c + ".")
                                       for c in adapted)]
    if overlap:
        raise ValueError(f"train_modules overlap the adapter targets: {overlap}")


def freeze_except(model: nn.Module, train_modules: list[str]) -> None:
    """Freeze every parameter but the adapters' own (Δ, factors, in-place ``selected``) and
    those of ``train_modules``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_modules(model).values():
        for n, p in layer.named_parameters():
            if not n.startswith("base."):
                p.requires_grad_(True)
    for name in train_modules:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def summarize(model: nn.Module) -> AdapterSummary:
    """The summary of a model that ``apply_adapters`` (or ``load_adapters``) set up."""
    state = adapter_state(model)
    params = {id(p): p for p in model.parameters()}.values()
    return AdapterSummary(state.method, list(adapter_modules(model)),
                          sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params), list(state.train_modules))


def check_not_applied(model: nn.Module) -> None:
    if adapter_state(model) is not None or adapter_modules(model):
        raise RuntimeError("adapters are already applied to this model; apply_adapters works "
                           "once per model (unload with merge_adapters(model, unload=True), or "
                           "load a saved adapter into a fresh model)")


def apply_adapters(model: nn.Module, method: str = "krona", target_modules=None, *,
                   train_modules=None, verbose: bool = False, **config) -> nn.Module:
    """Wrap ``model``'s target modules in adapters in place and return ``model``.

    Everything but the adapters (and ``train_modules``) is frozen; the new layers take the
    mode (train/eval) of the Linears they wrap. ``trainable_parameters(model)`` gives the
    summary; ``verbose=True`` prints it. See the module docstring for methods, config and
    target matching. Nothing is changed when an argument is invalid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_not_applied(model)
    _check_config(method, config)
    all_names = [n for n, _ in model.named_modules() if n]
    train = [] if train_modules is None else \
        match_modules(all_names, train_modules, "train_modules")
    if method == "krona":
        targets = default_targets(model) if target_modules is None else target_modules
        chosen = match_modules(linear_names(model), targets,
                               modules=dict(model.named_modules()))
        _check_overlap(train, chosen)
        configs = krona_layer_configs(model, chosen, **config)
        base = fingerprint(model, configs)
        wrap_krona(model, configs)
        state = AdapterState(method, train, base=base, layers={
            n: layer_config(model.get_submodule(n)) for n in configs})
    elif method == "krona_block":
        if target_modules is not None:
            raise ValueError("method='krona_block' adapts every attention and FFN sub-layer of "
                             "the model's blocks; target_modules must be None")
        configs = sublayer_configs(model, find_blocks(model), **config)
        _check_overlap(train, list(configs) + [c["source"] for c in configs.values()])
        base = fingerprint(model, configs)
        wrap_krona(model, configs)
        state = AdapterState(method, train, base=base, layers={
            n: sublayer_config(model.get_submodule(n), c["source"]) for n, c in configs.items()})
    else:
        if target_modules is not None:
            raise ValueError("method='s2ft' chooses its modules from the selection plan; "
                             "target_modules must be None")
        mode, permute, delta_dtype = _s2ft_options(config)
        blocks = find_blocks(model)
        plan = _s2ft_plan(model, blocks, **config)
        parts = plan_parts(blocks, plan)
        _check_overlap(train, list(parts))
        base = fingerprint(model, parts)
        permutations = wrap_s2ft(model, blocks, plan, mode, permute, delta_dtype)
        state = AdapterState(method, train, base=base, plan=plan, mode=mode,
                             permutations=permutations)
    setattr(model, STATE, state)
    freeze_except(model, train)
    if verbose:
        print(summarize(model))
    return model


def _adapted(model: nn.Module) -> nn.Module:
    """``model``, or the module inside it (e.g. under DDP) that kronops adapted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if adapter_state(model) is not None:
        return model
    inner = next((m for m in model.modules() if adapter_state(m) is not None), None)
    if inner is None:
        raise ValueError(f"{type(model).__name__} has no kronops adapters: apply_adapters, "
                         "load_adapters or from_peft first")
    return inner


def trainable_parameters(model: nn.Module) -> AdapterSummary:
    """What trains in an adapted model (``apply_adapters``, ``load_adapters``, ``from_peft``):
    an ``AdapterSummary`` with the method, adapter module names, trainable and total
    parameter counts (``print`` it: "kronops krona: 14 adapter module(s); trainable params
    ...")."""
    return summarize(_adapted(model))


_NO_FORWARD = object()


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` forward gives the base model's outputs: every KronA
    and S²FT adapter layer runs its frozen base Linear alone. Nothing is unmerged or
    copied; the adapters come back on exit, also when the block raises. Modules in
    ``train_modules`` stay as trained (they are the model's own).

    Raises ValueError for a model without adapter layers, with merged adapters
    (``unmerge_adapters`` first: merged weights hold the update), or with in-place S²FT
    layers (they train the weights themselves: there is no separate update to switch off).
    Do not merge, unmerge or load adapters inside the block.
    """
    layers = adapter_modules(model) if isinstance(model, nn.Module) else None
    if not layers:
        raise ValueError("model has no kronops adapter layers to disable (apply_adapters first)")
    inplace = [n for n, m in layers.items() if isinstance(m, S2FTInPlaceLinear)]
    if inplace:
        raise ValueError(f"in-place S²FT layers (e.g. {inplace[0]}) train the weights "
                         "themselves: there is no adapter to disable (keep a copy of the base "
                         "model, or use mode='adapter')")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"{len(merged)} adapter layer(s) are merged into their base weights "
                         f"(e.g. {merged[0]}): unmerge_adapters(model) before "
                         "disable_adapters (it does not unmerge)")
    saved = {}
    try:
        for name, layer in layers.items():
            saved[name] = layer.__dict__.get("forward", _NO_FORWARD)
            layer.forward = layer.base.__call__  # an instance attribute: the base alone
        yield model
    finally:
        for name, previous in saved.items():
            layer = layers[name]
            if previous is _NO_FORWARD:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous


def _mergeable(model: nn.Module, merged: bool) -> list[nn.Module]:
    """The model's mergeable adapter layers, all checked to be ``merged`` (or not) now."""
    layers = adapter_modules(model)
    if not layers:
        raise ValueError("model has no kronops adapter layers (apply_adapters first)")
    parallel = [n for n, m in layers.items() if isinstance(m, KronASublayer)]
    if parallel:
        raise ValueError(f"KronA^B adapters (e.g. {parallel[0]}) run in parallel with a "
                         "non-linear sub-layer (attention or FFN): their update is not a weight "
                         "change and cannot be merged; keep them as they are (save_adapters / "
                         "load_adapters), or use method='krona' for mergeable adapters")
    mergeable = {n: m for n, m in layers.items() if not isinstance(m, S2FTInPlaceLinear)}
    if not mergeable:
        raise ValueError("model has no S²FT adapter layers to merge: in-place S²FT trains the "
                         "weights themselves (nothing to merge or unmerge); "
                         "merge_adapters(model, unload=True) unwraps them")
    wrong = [n for n, m in mergeable.items() if m.merged != merged]
    if wrong:
        state = "already merged" if not merged else "not merged"
        raise RuntimeError(f"{len(wrong)} adapter layer(s) are {state}, e.g. {wrong[0]}")
    return list(mergeable.values())


def merge_adapters(model: nn.Module, *, unload: bool = False) -> nn.Module:
    """Add every adapter's update into its base weight; forward then runs the bases alone.

    ``unload=True`` also replaces each adapter layer by its base nn.Linear and removes
    ``model._kronops``, giving a plain model (no kronops modules left) to save or serve; it
    cannot be unmerged after. A co-permuted S²FT model is unpermuted first: the plain model
    has the original weight layout. In-place S²FT has nothing to merge (training changed
    the weights themselves): ``unload=True`` just unwraps it; without unload it is an error.
    KronA^B adapters (``krona_block``) cannot be merged: a ValueError says so.
    """
    layers = adapter_modules(model)
    inplace = bool(layers) and all(isinstance(m, S2FTInPlaceLinear) for m in layers.values())
    mergeable = [] if unload and inplace else _mergeable(model, merged=False)
    state = adapter_state(model)
    if unload and state is not None and state.permutations:
        unpermute(model)  # the plain model gets its original weight layout back
    for layer in mergeable:
        layer.merge()
    if unload:
        for name, layer in layers.items():
            set_module(model, name, layer.base)
        if state is not None:
            delattr(model, STATE)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every merged adapter's update out of its base weight again."""
    for layer in _mergeable(model, merged=True):
        layer.unmerge()
    return model
