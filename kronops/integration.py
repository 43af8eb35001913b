"""One-call adapters for whole models: ``apply_adapters``, ``merge_adapters``, ``unmerge_adapters``.

``apply_adapters(model, method="krona", target_modules=None, **config)`` wraps the target
``nn.Linear`` modules of a model in place and freezes every other parameter:
  method="krona"  each target becomes a ``KronALinear`` (base(x) + s * x @ kron(A, B).T);
                  config: a_shape (None, a pair, or {module suffix: pair}), rank, alpha, dropout.
  method="s2ft"   LLaMA-style models: ``kronops.s2ft.select`` + ``kronops.s2ft.apply`` (adapter
                  mode); BERT-style encoders: random heads/channels per block, wrapped in
                  ``S2FTLinear`` (``encoder_blocks``). config: ratio (fraction of heads and
                  channels, in (0, 1]) or heads / channels (count per block or fraction),
                  strategy, seed; LLaMA-style also calibration, loss_fn, permute.
``target_modules`` (krona): a list of names, each matching a module whose name equals it or
ends with "." + it, or one string taken as a regular expression that must match a whole
module name (PEFT's convention); None takes the defaults for the model's architecture
(``DEFAULT_TARGETS``, by ``model.config.model_type``, else by the projection names found).
``train_modules``: names (same matching) of further modules left trainable, e.g. a
classifier head; ``save_adapters`` stores them with the adapters.

GPT-2-style ``transformers.pytorch_utils.Conv1D`` layers (weight stored (in, out)) are refused
with a clear message; wrap nn.Linear models, or convert Conv1D to nn.Linear first.
"""
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .factor_shapes import factor_shapes
from .kron_modules import KronALinear

METHODS = ("krona", "s2ft")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"]
# model_type -> default target modules (LLaMA-style decoders and BERT-style encoders).
DEFAULT_TARGETS = {
    **{t: LLAMA_TARGETS for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                                  "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "phi3")},
    **{t: BERT_TARGETS for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert",
                                 "mpnet")},
}
KRONA_KEYS = ("a_shape", "rank", "alpha", "dropout")
S2FT_KEYS = ("ratio", "heads", "channels", "strategy", "seed", "calibration", "loss_fn", "permute")
STATE = "_kronops"  # model attribute recording what apply_adapters did


@dataclass
class AdapterSummary:
    """What ``apply_adapters`` did: method, wrapped module names and parameter counts."""
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


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D (weight (in, out)), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's kronops adapter layers (KronA and S²FT) by module name."""
    from .sparse_modules import S2FTLinear
    return {n: m for n, m in model.named_modules() if isinstance(m, (KronALinear, S2FTLinear))}


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def _candidates(names: list[str]) -> str:
    leaves = sorted({n.rpartition(".")[2] for n in names})
    example = f" (e.g. {names[0]!r})" if names else ""
    return f"candidates: {', '.join(leaves) or 'none'}{example}"


def match_modules(names: list[str], targets, what: str = "target_modules") -> list[str]:
    """Names selected by ``targets``: a regex string (full match) or a list of names/suffixes.

    Every list entry must select at least one name; a regex must select one in all.
    """
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"{what} {targets!r} is not a valid regular expression: {e}") from e
        chosen = [n for n in names if pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(f"{what} regex {targets!r} matches no candidate module; "
                             f"{_candidates(names)}")
        return chosen
    if not isinstance(targets, (list, tuple, set)) or not targets or \
            not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"{what} must be a regex string or a non-empty list of module names, "
                        f"got {targets!r}")
    chosen = set()
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"{what} entry {t!r} matches no candidate module; "
                             f"{_candidates(names)}")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def default_targets(model: nn.Module) -> list[str]:
    """The default target names for ``model``'s architecture (see ``DEFAULT_TARGETS``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ("gpt2", "gpt_bigcode", "openai-gpt"):
        raise TypeError(f"model_type {model_type!r} stores its projections as transformers "
                        "Conv1D (weight (in, out)); kronops wraps nn.Linear only")
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    leaves = {n.rpartition(".")[2] for n in _linear_names(model)}
    if {"q_proj", "v_proj"} <= leaves:
        return [t for t in LLAMA_TARGETS if t in leaves]
    if {"query", "value"} <= leaves:
        return BERT_TARGETS
    raise ValueError(f"no default target modules for model_type {model_type!r}: pass "
                     f"target_modules; {_candidates(_linear_names(model))}")


def _check_config(method: str, config: dict) -> None:
    allowed = KRONA_KEYS if method == "krona" else S2FT_KEYS
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


def krona_layer_configs(model: nn.Module, names: list[str], *, a_shape=None, rank=None,
                        alpha=None, dropout=0.0) -> dict[str, dict]:
    """Per target name the KronALinear arguments, validated against the module's shape."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise TypeError(f"alpha must be a number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
            not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    modules = dict(model.named_modules())
    configs = {}
    for name in names:
        module = modules[name]
        if is_conv1d(module):
            raise TypeError(f"{name} is a transformers Conv1D (GPT-2 style, weight (in, out)); "
                            "kronops wraps nn.Linear only")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        shape = _a_shape_for(name, a_shape)
        try:
            (a1, a2), _ = factor_shapes(module.in_features, module.out_features, shape)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if rank is not None and rank > min(a1, a2):
            raise ValueError(f"{name}: rank {rank} exceeds min(a1, a2) = {min(a1, a2)} "
                             f"for a_shape ({a1}, {a2})")
        configs[name] = dict(a_shape=[a1, a2], rank=rank, alpha=alpha, dropout=float(dropout))
    return configs


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def wrap_krona(model: nn.Module, configs: dict[str, dict]) -> None:
    """Replace each named nn.Linear by a KronALinear built from its (validated) config."""
    modules = dict(model.named_modules())
    for name, cfg in configs.items():
        layer = KronALinear(modules[name], a_shape=tuple(cfg["a_shape"]), rank=cfg["rank"],
                            alpha=cfg["alpha"], dropout=cfg["dropout"])
        _set_module(model, name, layer)


def _fraction_or_count(name: str, value, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int (per block) or a float fraction, got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} as a fraction must lie in [0, 1], got {value}")
        return round(value * size)
    if not 0 <= value <= size:
        raise ValueError(f"{name} = {value} per block, but blocks have {size}")
    return value


def encoder_blocks(model: nn.Module) -> list[dict]:
    """BERT-style blocks: per layer the names of its q/k/v, attention output and FFN Linears.

    A layer ``L`` holds ``L.attention.self.{query,key,value}``, ``L.attention.output.dense``,
    ``L.intermediate.dense`` and ``L.output.dense``; heads from the attention module's
    ``num_attention_heads`` (or the model config).
    """
    modules = dict(model.named_modules())
    blocks = []
    for name, m in modules.items():
        if not all(isinstance(getattr(m, k, None), nn.Linear) for k in ("query", "key", "value")):
            continue
        attention = name.rpartition(".")[0]
        layer = attention.rpartition(".")[0]
        parts = {"attn_out": f"{attention}.output.dense", "ffn_in": f"{layer}.intermediate.dense",
                 "ffn_out": f"{layer}.output.dense"}
        if not all(isinstance(modules.get(n), nn.Linear) for n in parts.values()):
            continue
        heads = getattr(m, "num_attention_heads", None) or \
            getattr(getattr(model, "config", None), "num_attention_heads", None)
        if not isinstance(heads, int) or m.query.out_features % heads:
            raise ValueError(f"{name}: cannot tell the number of attention heads")
        blocks.append(dict(name=layer, q=f"{name}.query", k=f"{name}.key", v=f"{name}.value",
                           num_heads=heads, head_dim=m.query.out_features // heads,
                           channels=modules[parts["ffn_in"]].out_features, **parts))
    return blocks


def _apply_s2ft_encoder(model: nn.Module, heads, channels, strategy, seed) -> dict:
    """S²FT on BERT-style blocks with random selection: selected heads train their rows of
    query/key/value and columns of the attention output; selected channels their row of
    the intermediate Linear and column of the output Linear. Returns the plan."""
    from .s2ft.blocks import head_rows
    from .sparse_modules import S2FTLinear
    if strategy != "random":
        raise ValueError(f"S²FT on BERT-style encoders supports strategy='random' only, "
                         f"got {strategy!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    blocks = encoder_blocks(model)
    if not blocks:
        raise ValueError("no LLaMA-style or BERT-style blocks found for method='s2ft'")
    counts = [(_fraction_or_count("heads", heads or 0, b["num_heads"]),
               _fraction_or_count("channels", channels or 0, b["channels"])) for b in blocks]
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    plan, wraps = {}, {}
    for b, (nh, nc) in zip(blocks, counts):
        chosen_heads = sorted(torch.randperm(b["num_heads"], generator=generator)[:nh].tolist())
        chosen = sorted(torch.randperm(b["channels"], generator=generator)[:nc].tolist())
        plan[b["name"]] = dict(heads=chosen_heads, channels=chosen)
        rows = head_rows(chosen_heads, b["head_dim"]).tolist()
        for key, side, idx in (("q", "rows", rows), ("k", "rows", rows), ("v", "rows", rows),
                               ("attn_out", "cols", rows), ("ffn_in", "rows", chosen),
                               ("ffn_out", "cols", chosen)):
            if idx:
                wraps[b[key]] = (side, idx)
    for name, (side, idx) in wraps.items():
        base = modules[name]
        index = torch.tensor(idx, dtype=torch.int64, device=base.weight.device)
        _set_module(model, name, S2FTLinear(base, **{side: index}))
    return dict(strategy=strategy, seed=seed, blocks=plan)


def _apply_s2ft(model: nn.Module, ratio=None, heads=None, channels=None, strategy="random",
                seed=0, calibration=None, loss_fn=None, permute=False):
    """LLaMA-style models: kronops.s2ft.select + apply. BERT-style: ``_apply_s2ft_encoder``."""
    from . import s2ft
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or \
                not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be a fraction in (0, 1], got {ratio!r}")
        heads = float(ratio) if heads is None else heads
        channels = float(ratio) if channels is None else channels
    if heads is None and channels is None:
        raise ValueError("method='s2ft' needs ratio, heads or channels")
    try:
        s2ft.find_blocks(model)
    except ValueError:
        if encoder_blocks(model):
            if calibration is not None or loss_fn is not None or permute:
                raise ValueError("calibration, loss_fn and permute apply to LLaMA-style models "
                                 "only") from None
            return _apply_s2ft_encoder(model, heads, channels, strategy, seed)
        raise
    plan = s2ft.select(model, heads=heads or 0, channels=channels or 0, strategy=strategy,
                       calibration=calibration, seed=seed, loss_fn=loss_fn)
    s2ft.apply(model, plan, mode="adapter", permute=permute)
    return None


def freeze_except(model: nn.Module, train_modules: list[str]) -> None:
    """Freeze every parameter but the adapters' own and those of ``train_modules``."""
    from .sparse_modules import S2FTInPlaceLinear
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_modules(model).values():
        for n, p in layer.named_parameters():
            if not n.startswith("base.") and not isinstance(layer, S2FTInPlaceLinear):
                p.requires_grad_(True)
    for name in train_modules:
        for p in modules[name].parameters():
            p.requires_grad_(True)


def summarize(model: nn.Module) -> AdapterSummary:
    """The summary of a model that ``apply_adapters`` (or ``load_adapters``) set up."""
    state = getattr(model, STATE)
    params = {id(p): p for p in model.parameters()}.values()
    return AdapterSummary(state["method"], list(adapter_modules(model)),
                          sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params), list(state["train_modules"]))


def check_not_applied(model: nn.Module) -> None:
    if getattr(model, STATE, None) is not None or getattr(model, "_s2ft", None) is not None \
            or adapter_modules(model):
        raise RuntimeError("adapters are already applied to this model; apply_adapters works "
                           "once per model (unload with merge_adapters(model, unload=True), or "
                           "load a saved adapter into a fresh model)")


def apply_adapters(model: nn.Module, method: str = "krona", target_modules=None, *,
                   train_modules=None, verbose: bool = True, **config):
    """Wrap ``model``'s target modules in adapters in place; returns (model, AdapterSummary).

    Everything but the adapters (and ``train_modules``) is frozen. See the module docstring
    for methods, config and target matching. Nothing is changed when an argument is invalid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_not_applied(model)
    _check_config(method, config)
    names = _linear_names(model)
    all_names = [n for n, _ in model.named_modules() if n]
    train = [] if train_modules is None else \
        match_modules(all_names, train_modules, "train_modules")
    if method == "krona":
        targets = default_targets(model) if target_modules is None else target_modules
        chosen = match_modules(names, targets)
        overlap = [n for n in train if any(n == c or c.startswith(n + ".") or n.startswith(c + ".")
                                           for c in chosen)]
        if overlap:
            raise ValueError(f"train_modules overlap the adapter targets: {overlap}")
        configs = krona_layer_configs(model, chosen, **config)
        wrap_krona(model, configs)
        layers = configs
    else:
        if target_modules is not None:
            raise ValueError("method='s2ft' chooses its modules from the selection plan; "
                             "target_modules must be None")
        encoder_plan = _apply_s2ft(model, **config)
        layers = {}
    setattr(model, STATE, dict(method=method, layers=layers, train_modules=train))
    if method == "s2ft" and encoder_plan is not None:
        getattr(model, STATE)["encoder_plan"] = encoder_plan
    freeze_except(model, train)
    summary = summarize(model)
    if verbose:
        print(summary)
    return model, summary


def _toggle(model: nn.Module, merge: bool) -> list[str]:
    from .sparse_modules import S2FTInPlaceLinear
    layers = {n: m for n, m in adapter_modules(model).items()
              if not isinstance(m, S2FTInPlaceLinear)}
    if not layers:
        raise ValueError("model has no kronops adapter layers (apply_adapters first)")
    wrong = [n for n, m in layers.items() if m.merged == merge]
    if wrong:
        state = "already merged" if merge else "not merged"
        raise RuntimeError(f"{len(wrong)} adapter layer(s) are {state}, e.g. {wrong[0]}")
    for layer in layers.values():
        layer.merge() if merge else layer.unmerge()
    return list(layers)


def merge_adapters(model: nn.Module, *, unload: bool = False) -> nn.Module:
    """Add every adapter's update into its base weight; forward then runs the bases alone.

    ``unload=True`` also replaces each adapter layer by its (merged) base nn.Linear, giving a
    plain model (no kronops modules left) to save or serve; it cannot be unmerged after.
    A co-permuted S²FT model (``permute=True``) is unpermuted first: the plain model has
    the original weight layout.
    """
    s2ft_state = getattr(model, "_s2ft", None)
    if unload and s2ft_state is not None and s2ft_state.get("permutations"):
        from .s2ft import unpermute
        unpermute(model)  # the plain model gets its original weight layout back
    names = _toggle(model, merge=True)
    if unload:
        modules = dict(model.named_modules())
        for name in names:
            _set_module(model, name, modules[name].base)
        for attr in (STATE, "_s2ft"):
            if hasattr(model, attr):
                delattr(model, attr)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every merged adapter's update out of its base weight again."""
    _toggle(model, merge=False)
    return model


__all__ = ["apply_adapters", "merge_adapters", "unmerge_adapters", "AdapterSummary",
           "DEFAULT_TARGETS", "adapter_modules", "default_targets", "match_modules"]
