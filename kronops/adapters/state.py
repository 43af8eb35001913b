"""What kronops records on an adapted model: one ``AdapterState`` in ``model._kronops``.

``apply_adapters``, ``load_adapters`` and ``from_peft`` set it (each method's ``apply`` hook
makes it, ``methods``), ``merge_adapters(unload=True)`` removes it; saving, loading,
merging and ``unpermute`` read it, for every method.
"""
from dataclasses import dataclass, field

from torch import nn

from .selection import Plan

STATE = "_kronops"  # the model attribute holding the AdapterState


@dataclass
class AdapterState:
    """method: the method's name (``methods.METHODS``); train_modules: names of further
    modules left trainable (saved with the adapters).
    KronA: ``layers``, per adapter module name its settings (``lokr.layer_config``);
    KronA^B: the same, per sub-layer output module (``sublayer.sublayer_config``).
    S²FT: ``plan`` (the selection), ``mode`` ("adapter" or "inplace") and ``permutations``:
    per co-permuted block name {"heads", "kv_heads", "channels"}, position i holding the
    original head/channel perm[i] (empty when not permuted, or after ``unpermute``).
    ``base``: the base model's ``fingerprint`` over the adapted modules, taken when the
    adapters were applied (or loaded into a plain model), before any training, merging or
    permuting changed a weight; what ``save_adapters`` records (None: unknown)."""
    method: str
    train_modules: list[str]
    layers: dict[str, dict] = field(default_factory=dict)
    plan: Plan | None = None
    mode: str | None = None
    permutations: dict[str, dict] = field(default_factory=dict)
    base: dict[str, dict] | None = None


def adapter_state(model: nn.Module) -> AdapterState | None:
    """The model's AdapterState, or None for a model kronops has not adapted."""
    return getattr(model, STATE, None)
