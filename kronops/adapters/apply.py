"""Whole models, every method, one call each: ``apply_adapters``, ``merge_adapters``,
``unmerge_adapters``; ``trainable_parameters`` (what is trained) and ``disable_adapters``
(the base model's outputs, for a while).

``apply_adapters(model, method="krona", target_modules=None, **config)`` wraps Linears of
``model`` in place, freezes every other parameter, records what it did in ``model._kronops``
(an ``AdapterState``) and returns ``model`` (as PEFT's ``get_peft_model`` returns its model;
``trainable_parameters(model)`` gives the summary, ``verbose=True`` prints it). The method
(``methods.METHODS``) says which modules it adapts and what its config is:
  "krona"        ``methods.krona``: a KronA/LoKr adapter per target linear layer
                 (``targets``; None: the architecture's defaults)
  "krona_block"  ``methods.krona_block``: KronA^B(_res) per attention and FFN sub-layer;
                 cannot be merged
  "s2ft"         ``methods.s2ft``: the rows/columns of selected heads and FFN channels of
                 every block, as a Δ ("adapter" mode) or trained in place ("inplace")
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
from dataclasses import dataclass, field

from torch import nn

from .fingerprint import fingerprint
from .methods import adapter_modules, configure, method_named
from .permutation import unpermute
from .state import STATE, adapter_state
from .targets import match_modules, own_parameters, set_module


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


def check_overlap(train: list[str], adapted: list[str]) -> None:
    """No train module is, holds or lies inside a module the adapters use."""
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
        for p in own_parameters(layer).values():
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
    summary; ``verbose=True`` prints it. See the module docstring for methods, and each
    method's module for its config. Nothing is changed when an argument is invalid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    adapter = method_named(method)
    check_not_applied(model)
    settings = configure(adapter, config)
    all_names = [n for n, _ in model.named_modules() if n]
    train = [] if train_modules is None else \
        match_modules(all_names, train_modules, "train_modules")
    spec = adapter.spec(model, settings, target_modules)
    check_overlap(train, spec.touched)
    state = spec.apply(model, train, fingerprint(model, spec.modules))
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
        raise ValueError(f"{type(model).__name__} has no kronops adapters (no kronops adapter "
                         "layers set up by apply_adapters, load_adapters or from_peft)")
    return inner


def _layers(model: nn.Module):
    """(the adapted model inside ``model``, its method's module, its adapter layers)."""
    model = _adapted(model)
    return model, method_named(adapter_state(model).method), adapter_modules(model)


def trainable_parameters(model: nn.Module) -> AdapterSummary:
    """What trains in an adapted model (``apply_adapters``, ``load_adapters``, ``from_peft``):
    an ``AdapterSummary`` with the method, adapter module names, trainable and total
    parameter counts (``print`` it: "kronops krona: 14 adapter module(s); trainable params
    ...")."""
    return summarize(_adapted(model))


_NO_FORWARD = object()


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` forward gives the base model's outputs: every adapter
    layer runs its frozen base Linear alone. Nothing is unmerged or copied; the adapters
    come back on exit, also when the block raises. Modules in ``train_modules`` stay as
    trained (they are the model's own).

    Raises ValueError for a model without adapters, with merged adapters
    (``unmerge_adapters`` first: merged weights hold the update), or where the method has no
    separate update to switch off (in-place S²FT trains the weights themselves).
    Do not merge, unmerge or load adapters inside the block.
    """
    _, method, layers = _layers(model)
    method.check_disable(layers)
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


def _check_merged(layers: dict[str, nn.Module], merged: bool) -> None:
    wrong = [n for n, m in layers.items() if m.merged != merged]
    if wrong:
        state = "already merged" if not merged else "not merged"
        raise RuntimeError(f"{len(wrong)} adapter layer(s) are {state}, e.g. {wrong[0]}")


def merge_adapters(model: nn.Module, *, unload: bool = False) -> nn.Module:
    """Add every adapter's update into its base weight; forward then runs the bases alone.

    ``unload=True`` also replaces each adapter layer by its base nn.Linear and removes
    ``model._kronops``, giving a plain model (no kronops modules left) to save or serve; it
    cannot be unmerged after. A co-permuted S²FT model is unpermuted first: the plain model
    has the original weight layout. In-place S²FT has nothing to merge (training changed
    the weights themselves): ``unload=True`` just unwraps it; without unload it is an error.
    KronA^B adapters (``krona_block``) cannot be merged: a ValueError says so.
    """
    adapted, method, layers = _layers(model)
    mergeable = method.mergeable(layers, unload=unload)
    _check_merged(mergeable, merged=False)
    if unload and adapter_state(adapted).permutations:
        unpermute(adapted)  # the plain model gets its original weight layout back
    for layer in mergeable.values():
        layer.merge()
    if unload:
        for name, layer in layers.items():
            set_module(adapted, name, layer.base)
        delattr(adapted, STATE)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Take every merged adapter's update out of its base weight again."""
    _, method, layers = _layers(model)
    mergeable = method.mergeable(layers, unload=False)
    _check_merged(mergeable, merged=True)
    for layer in mergeable.values():
        layer.unmerge()
    return model
