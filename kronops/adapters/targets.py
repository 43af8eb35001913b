"""Which modules to adapt: default targets per architecture, and matching module names.

``target_modules``/``train_modules``: a list of names, each matching every module whose
name equals it or ends with "." + it, or one string taken as a regular expression that
must match a whole module name (PEFT's convention). Defaults (``DEFAULT_TARGETS``) by
``model.config.model_type``, else by the projection names found.
"""
import re

from torch import nn

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


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D (weight (in, out)), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's nn.Linear (and Conv1D, to refuse them by name) modules."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def _candidates(names: list[str]) -> str:
    leaves = sorted({n.rpartition(".")[2] for n in names})
    example = f" (e.g. {names[0]!r})" if names else ""
    return f"candidates: {', '.join(leaves) or 'none'}{example}"


def _not_linear(what: str, entry: str, hits: list[str], modules: dict) -> TypeError:
    """The error for a target entry that names only modules that are not nn.Linear."""
    name = hits[0]
    inner = [n for n, m in modules[name].named_modules() if isinstance(m, nn.Linear)]
    hint = (f"name the nn.Linear modules inside it instead, e.g. "
            f"{name.rpartition('.')[2] + '.' + inner[0]!r}" if inner else
            "it holds no nn.Linear")
    more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
    return TypeError(f"{what} entry {entry!r} names {name!r}{more}, a "
                     f"{type(modules[name]).__name__}, not an nn.Linear: kronops wraps "
                     f"nn.Linear modules only; {hint}")


def match_modules(names: list[str], targets, what: str = "target_modules",
                  modules: dict | None = None) -> list[str]:
    """Names selected by ``targets``: a regex string (full match) or a list of names/suffixes.

    Every list entry must select at least one name; a regex must select one in all. With
    ``modules`` (all of the model's modules by name) an entry that selects none of ``names``
    but names other modules raises TypeError saying what they are (not an nn.Linear).
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
    """The default target names for ``model``'s architecture (see ``DEFAULT_TARGETS``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ("gpt2", "gpt_bigcode", "openai-gpt"):
        raise TypeError(f"model_type {model_type!r} stores its projections as transformers "
                        "Conv1D (weight (in, out)); kronops wraps nn.Linear only")
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    linears = linear_names(model)
    leaves = {n.rpartition(".")[2] for n in linears}
    if {"q_proj", "v_proj"} <= leaves:
        return [t for t in LLAMA_TARGETS if t in leaves]
    if {"query", "value"} <= leaves:
        return BERT_TARGETS
    config = getattr(model, "config", None)
    what = type(model).__name__ + (f" (model_type {model_type!r})" if model_type is not None
                                   else " (no model.config.model_type)" if config is not None
                                   else " (no model.config)")
    if not linears:
        raise ValueError(f"no default target modules for {what}: it has no nn.Linear modules "
                         "to adapt")
    example = sorted(leaves)[:2]
    raise ValueError(
        f"no default target modules for {what}: defaults exist for LLaMA-style "
        f"(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) and BERT-style "
        f"(query, key, value, ...) models; pass target_modules, a list of nn.Linear module "
        f"names or name suffixes (e.g. target_modules={example!r}) or one regex matching "
        f"whole names; {_candidates(linears)}")
