"""Which modules to adapt: default targets from the model's blocks, and matching module names.

``target_modules``/``train_modules``: a list of names, each matching every module whose
name equals it or ends with "." + it, or one string taken as a regular expression that
must match a whole module name (PEFT's convention). The default (``default_targets``) is
every projection of every transformer block ``blocks.find_blocks`` finds: attention q, k,
v (or the fused q/k/v projection) and output, FFN in and out; for every family in the
layout table there (LLaMA-style, BERT-style, T5, BART, OPT, GPT-2, GPT-J, GPT-NeoX, Falcon,
Phi, Phi-3, ...), encoder and decoder, self- and cross-attention alike.
``modules_of`` finds a model's modules of given types by name, ``set_module`` replaces one,
``own_parameters`` gives an adapter layer's parameters apart from its base layer's.
"""
import re

from torch import nn

from ..wrapped_linear import is_linear
from .blocks import find_blocks


def modules_of(model: nn.Module, types: tuple[type, ...]) -> dict[str, nn.Module]:
    """The model's modules that are instances of ``types``, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the model's module ``name``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def own_parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    """An adapter layer's own parameters (factors, Δ, in-place ``selected``), by name within
    the layer: every parameter but those of the layer it wraps (``base``)."""
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers (nn.Linear and transformers Conv1D)."""
    return [n for n, m in model.named_modules() if is_linear(m)]


def _candidates(names: list[str]) -> str:
    leaves = sorted({n.rpartition(".")[2] for n in names})
    example = f" (e.g. {names[0]!r})" if names else ""
    return f"candidates: {', '.join(leaves) or 'none'}{example}"


def _not_linear(what: str, entry: str, hits: list[str], modules: dict) -> TypeError:
    """The error for a target entry that names only modules that are not linear layers."""
    name = hits[0]
    inner = [n for n, m in modules[name].named_modules() if is_linear(m)]
    hint = (f"name the linear layers inside it instead, e.g. "
            f"{name.rpartition('.')[2] + '.' + inner[0]!r}" if inner else
            "it holds no linear layer")
    more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
    return TypeError(f"{what} entry {entry!r} names {name!r}{more}, a "
                     f"{type(modules[name]).__name__}, not an nn.Linear: kronops wraps "
                     f"nn.Linear (and transformers Conv1D) modules only; {hint}")


def match_modules(names: list[str], targets, what: str = "target_modules",
                  modules: dict | None = None) -> list[str]:
    """Names selected by ``targets``: a regex string (full match) or a list of names/suffixes.

    Every list entry must select at least one name; a regex must select one in all. With
    ``modules`` (all of the model's modules by name) an entry that selects none of ``names``
    but names other modules raises TypeError saying what they are (not a linear layer).
    """
    known = set(names)
    others = {n: m for n, m in (modules or {}).items() if n and n not in known}
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"{what} {targets!r} is not a valid regular expression: {e}") from e
        chosen = [n for n in names if pattern.fullmatch(n)]
        if not chosen:
            hits = [n for n in others if pattern.fullmatch(n)]
            if hits:
                raise _not_linear(what, targets, hits, others)
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
            wrong = [n for n in others if n == t or n.endswith("." + t)]
            if wrong:
                raise _not_linear(what, t, wrong, others)
            raise ValueError(f"{what} entry {t!r} matches no candidate module; "
                             f"{_candidates(names)}")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def default_targets(model: nn.Module) -> list[str]:
    """Every projection of every block of ``model`` (see the module docstring), full names
    in model order; a ValueError naming the candidates when no block is found."""
    try:
        blocks = find_blocks(model)
    except ValueError as e:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        what = type(model).__name__ + (f" (model_type {model_type!r})" if model_type is not None
                                       else " (no model.config.model_type)" if config is not None
                                       else " (no model.config)")
        linears = linear_names(model)
        if not linears:
            raise ValueError(f"no default target modules for {what}: it has no nn.Linear "
                             "modules to adapt") from None
        example = sorted({n.rpartition(".")[2] for n in linears})[:2]
        raise ValueError(f"no default target modules for {what}: {e}; pass target_modules, "
                         f"a list of nn.Linear module names or name suffixes (e.g. "
                         f"target_modules={example!r}) or one regex matching whole names; "
                         f"{_candidates(linears)}") from None
    return list(dict.fromkeys(n for b in blocks for n in b.modules))
