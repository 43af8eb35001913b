"""What the KronA-family methods (``krona``, ``krona_block``) share: one Kronecker adapter
layer per adapted module, each described by its settings as JSON (its "layer config":
``lokr.layer_config``, ``sublayer.sublayer_config``). ``model._kronops.layers`` and adapter
files (under "layers") record them; a file's tensors are each layer's own parameters,
``<module>.<name>`` (``a`` or ``a_u``/``a_v``, ``b`` or ``b_u``/``b_v``, ``residual_scale``).

``FactorConfig``: the factor arguments both methods take (a_shape, rank, alpha), checked.
``KronLayers``: the spec (which layer configs go where) with everything done the same way for
both methods; a method subclasses it with how its layers are built, probed, recorded and
found in a model.
"""
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...checks import check_number
from ...kron.modules import check_rank, factor_shapes
from ...wrapped_linear import is_linear, out_in_weight
from ..errors import AdapterFileError
from ..json_checks import expect_keys, is_int, is_number
from ..state import AdapterState
from ..targets import modules_of, own_parameters, set_module
from .updates import KronUpdate


@dataclass(frozen=True)
class FactorConfig:
    """The factor arguments of a Kronecker adapter: ``a_shape`` (None: near the square roots,
    a pair, or {module suffix: pair}), ``rank`` (None: a full A), ``alpha`` (a positive
    finite number, or None: the layer's default, rank or 1). A negative alpha flips the
    update's sign and 0 switches it off: almost surely mistakes, so both raise."""
    a_shape: tuple | list | dict | None = None
    rank: int | None = None
    alpha: float | None = None

    def __post_init__(self):
        check_rank(self.rank)
        if self.alpha is None:
            return
        try:
            positive = check_number("alpha", self.alpha) > 0  # TypeError for a non-number
        except ValueError:  # not finite
            positive = False
        if not positive:
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r} (a "
                             "negative alpha flips the update's sign, 0 switches it off; None: "
                             "the default)")

    def a_shape_of(self, name: str, in_features: int, out_features: int) -> list:
        """[a1, a2] for module ``name`` (the a_shape itself, or the longest matching suffix
        of a dict), checked against its size and the rank."""
        a_shape = self.a_shape
        if isinstance(a_shape, dict):
            keys = [k for k in a_shape if name == k or name.endswith("." + k)]
            a_shape = a_shape[max(keys, key=len)] if keys else None
        try:
            (a1, a2), _ = factor_shapes(in_features, out_features, a_shape)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if self.rank is not None and self.rank > min(a1, a2):
            raise ValueError(f"{name}: rank {self.rank} exceeds min(a1, a2) = {min(a1, a2)} "
                             f"for a_shape ({a1}, {a2}) ({out_features}x{in_features} "
                             f"weight); {_rank_hint(out_features, in_features, self.rank, a1, a2)}")
        return [a1, a2]

    def settings(self, name: str, in_features: int, out_features: int) -> dict:
        """The layer config entries these arguments give module ``name``: in_features,
        out_features, a_shape, rank, alpha."""
        return dict(in_features=in_features, out_features=out_features,
                    a_shape=self.a_shape_of(name, in_features, out_features), rank=self.rank,
                    alpha=self.alpha)


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


def meta_linear(in_features: int, out_features: int) -> nn.Linear:
    """A weightless stand-in of a linear layer: what a probe layer wraps."""
    return nn.Linear(in_features, out_features, bias=False, device="meta")


def expect_linear(modules: dict, name: str, role: str) -> nn.Module:
    """The model's module ``name`` (``role``: what the file uses it as), a linear layer;
    else AdapterFileError."""
    module = modules.get(name)
    if not is_linear(module):
        what = "missing" if module is None else f"a {type(module).__name__}"
        raise AdapterFileError(f"{role} {name!r} is {what} in the model, expected a linear "
                               "layer (nn.Linear or transformers Conv1D)")
    return module


def file_layers(config: dict) -> dict:
    """A file config's "layers": a non-empty dict by module name; else AdapterFileError."""
    layers = config["layers"]
    if not isinstance(layers, dict) or not layers:
        raise AdapterFileError(f"layers must be a non-empty dict, got {layers!r}")
    if "" in layers:
        raise AdapterFileError("layers names a module with an empty name")
    return layers


def layer_kind(where: str, cfg, keys: dict[str, tuple], method: str) -> str:
    """A layer config's kind, one of ``keys``, and its keys exactly keys[kind]; else
    AdapterFileError naming what is wrong."""
    if not isinstance(cfg, dict) or "kind" not in cfg:
        expect_keys(where, cfg, next(iter(keys.values())))  # names what is missing
    kind = cfg["kind"]
    if not isinstance(kind, str) or kind not in keys:
        raise AdapterFileError(f"{where}: kind must be one of {tuple(keys)} for method "
                               f"{method!r}, got {kind!r}")
    expect_keys(where, cfg, keys[kind])
    return kind


def check_factor_settings(where: str, cfg: dict) -> None:
    """The entries of a layer config that ``FactorConfig.settings`` gives, as JSON: positive
    sizes, an a_shape dividing them, a rank (or null), a finite alpha."""
    for key in ("in_features", "out_features"):
        if not is_int(cfg[key]) or cfg[key] <= 0:
            raise AdapterFileError(f"{where}: {key} must be a positive int, got {cfg[key]!r}")
    a_shape = cfg["a_shape"]
    if not isinstance(a_shape, list) or len(a_shape) != 2 or \
            not all(is_int(d) and d > 0 for d in a_shape) or \
            cfg["out_features"] % a_shape[0] or cfg["in_features"] % a_shape[1]:
        raise AdapterFileError(f"{where}: a_shape must be [a1, a2] dividing (out_features, "
                               f"in_features) = ({cfg['out_features']}, {cfg['in_features']}), "
                               f"got {a_shape!r}")
    rank = cfg["rank"]
    if rank is not None and (not is_int(rank) or rank <= 0):
        raise AdapterFileError(f"{where}: rank must be null or a positive int, got {rank!r}")
    if not is_number(cfg["alpha"]):
        raise AdapterFileError(f"{where}: alpha must be a finite number, got {cfg['alpha']!r}")


@dataclass(frozen=True)
class KronLayers(ABC):
    """Which Kronecker adapters go where: ``layers``, per adapted module (the linear layer the
    adapter wraps, or whose output it adds to) its layer config, checked against a model.

    A method subclasses it with ``method`` (its name), ``layer_types`` (the classes it puts
    in a model) and how its layers are built on a model (``build``), over weightless
    stand-ins (``probe``), recorded (``record``) and found in a model (``check_model``).
    """
    layers: dict[str, dict]
    method: ClassVar[str]
    layer_types: ClassVar[tuple[type, ...]]

    @abstractmethod
    def build(self, model: nn.Module, name: str, cfg: dict) -> nn.Module:
        """The adapter layer ``cfg`` describes over the model's module ``name``."""

    @abstractmethod
    def probe(self, cfg: dict) -> nn.Module:
        """The layer ``cfg`` describes over weightless stand-ins: its parameter shapes."""

    @abstractmethod
    def record(self, layer: nn.Module, cfg: dict) -> dict:
        """A built layer's config, as state and files record it."""

    @abstractmethod
    def check_model(self, modules: dict, name: str, cfg: dict) -> None:
        """The model (``modules`` by name) has the linear layers ``cfg`` adapts at ``name``,
        of its sizes; else AdapterFileError."""

    @property
    def modules(self) -> list[str]:
        """The adapted modules (what the base fingerprint covers)."""
        return list(self.layers)

    @property
    def touched(self) -> list[str]:
        """Every module the adapters use (train_modules must not overlap them): the adapted
        ones and the sources whose inputs they take."""
        return self.modules + [cfg["source"] for cfg in self.layers.values() if "source" in cfg]

    @property
    def fixed(self) -> dict[str, torch.Tensor]:
        """File tensors with values fixed by the spec: none (every tensor is trained)."""
        return {}

    def apply(self, model: nn.Module, train_modules: list[str], base) -> AdapterState:
        """Replace each adapted module by its layer, in that module's training mode; the
        state the model records."""
        for name, cfg in self.layers.items():
            module = model.get_submodule(name)
            set_module(model, name, self.build(model, name, cfg).train(module.training))
        return AdapterState(self.method, list(train_modules), base=base,
                            layers={n: self.record(model.get_submodule(n), cfg)
                                    for n, cfg in self.layers.items()})

    def saved(self, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """({"layers": the built layers' configs}, their parameters) for a file."""
        built = {n: model.get_submodule(n) for n in self.layers}
        tensors = {f"{n}.{p}": t for n, layer in built.items()
                   for p, t in own_parameters(layer).items()}
        return dict(layers={n: self.record(built[n], cfg) for n, cfg in self.layers.items()}), \
            tensors

    def checked(self, model: nn.Module, state: AdapterState | None) -> "KronLayers":
        """This spec (read from a file) checked against ``model``: a plain model has the
        linear layers it adapts; a model with adapters has exactly these (every setting but
        dropout equal). AdapterFileError naming the first difference."""
        if state is None:
            modules = dict(model.named_modules())
            for name, cfg in self.layers.items():
                self.check_model(modules, name, cfg)
            return self
        existing = modules_of(model, self.layer_types)
        if set(existing) != set(self.layers):
            raise AdapterFileError(f"the model's adapters {sorted(existing)[:3]}... differ from "
                                   f"the file's {sorted(self.layers)[:3]}...")
        for name, cfg in self.layers.items():
            have = self.record(existing[name], state.layers[name])
            for key in [k for k in have if k != "dropout"]:
                if have[key] != cfg.get(key):
                    raise AdapterFileError(f"{name} has {key} {have[key]!r} in the model, "
                                           f"{cfg.get(key)!r} in the file")
        return self

    def _probe(self, name: str, cfg: dict) -> nn.Module:
        try:
            return self.probe(cfg)
        except (TypeError, ValueError, KeyError) as e:
            raise AdapterFileError(f"bad config for {name}: {e}") from None

    def expected(self, model: nn.Module) -> dict[str, torch.Size]:
        """The file tensors these layers need, with their exact shapes."""
        return {f"{name}.{p}": t.shape for name, cfg in self.layers.items()
                for p, t in own_parameters(self._probe(name, cfg)).items()}

    @torch.no_grad()
    def load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the file's values into the built layers."""
        for name in self.layers:
            for p, t in own_parameters(model.get_submodule(name)).items():
                t.copy_(tensors[f"{name}.{p}"])

    @torch.no_grad()
    def serve(self, model: nn.Module, tensors: dict) -> dict[str, KronUpdate]:
        """Per adapted module its ``KronUpdate``: A and s B in the module's weight dtype;
        KronA^B: the source module and s_res."""
        updates = {}
        for name, cfg in self.layers.items():
            w = out_in_weight(model.get_submodule(name))
            layer = self.probe(cfg)
            layer.load_state_dict({p: tensors[f"{name}.{p}"] for p in own_parameters(layer)},
                                  strict=False, assign=True)
            residual = getattr(layer, "residual_scale", None)
            updates[name] = KronUpdate(a=layer.factor_a().to(w),
                                       b=(layer.scale * layer.factor_b()).to(w),
                                       source=cfg.get("source"),
                                       residual=None if residual is None else residual.to(w))
        return updates

