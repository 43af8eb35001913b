"""What kronops records on an adapted model: one ``AdapterState`` in ``model._kronops``.

``apply_adapters``, ``load_adapters`` and ``from_peft`` set it, ``merge_adapters(unload=True)``
removes it; saving, loading, merging and ``unpermute`` read it, for every method.
"""
from dataclasses import dataclass, field

from torch import nn

from ..kron.modules import KronALinear
from ..s2ft.modules import S2FTLinear
from .selection import Plan
from .sublayer import KronASublayer

STATE = "_kronops"  # the model attribute holding the AdapterState
METHODS = ("krona", "krona_block", "s2ft")
MODES = ("adapter", "inplace")  # S²FT: a trainable Δ per layer, or the weights trained in place


@dataclass
class AdapterState:
    """method: "krona", "krona_block" or "s2ft"; train_modules: names of further modules left
    trainable (saved with the adapters).
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


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's kronops adapter layers (KronA/LoKr, KronA^B, S²FT of both modes) by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (KronALinear, KronASublayer, S2FTLinear))}
