"""KronA / LoKr: each target linear layer becomes a ``KronALinear`` (or, from PEFT, a
``LoKrLinear``), base(x) + s * dropout(x) @ kron(A, B).T; mergeable into the base weight.

apply_adapters(model, "krona", target_modules=None, a_shape=None, rank=None, alpha=None,
dropout=0.0): ``target_modules`` as ``targets`` matches them (None: every projection of every
block). A file holds per layer its ``lokr.layer_config`` under "layers" and its factors.
"""
from dataclasses import dataclass

from torch import nn

from ...kron.modules import KronALinear
from ...wrapped_linear import features, is_linear
from ..errors import AdapterFileError
from ..json_checks import is_int, is_number
from ..lokr import KIND_KRONA, KIND_LOKR, build_layer, layer_config
from ..state import AdapterState
from ..targets import default_targets, linear_names, match_modules
from .kron_layers import (FactorConfig, KronLayers, check_factor_settings, expect_linear,
                          file_layers, layer_kind, meta_linear)

NAME = "krona"
LAYERS = (KronALinear,)  # LoKrLinear is one
FILE_KEYS = ("layers",)
LAYER_KEYS = ("kind", "in_features", "out_features", "a_shape", "rank", "alpha", "dropout")
KIND_KEYS = {KIND_KRONA: LAYER_KEYS, KIND_LOKR: LAYER_KEYS + ("rank_b",)}


@dataclass(frozen=True)
class Config(FactorConfig):
    """``FactorConfig``'s a_shape, rank and alpha, and ``dropout`` on the adapter's input,
    in [0, 1)."""
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or \
                not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")


class Spec(KronLayers):
    """Per adapted linear layer its ``lokr.layer_config``."""
    method = NAME
    layer_types = LAYERS

    def build(self, model: nn.Module, name: str, cfg: dict) -> nn.Module:
        return build_layer(model.get_submodule(name), cfg)

    def probe(self, cfg: dict) -> nn.Module:
        return build_layer(meta_linear(cfg["in_features"], cfg["out_features"]), cfg)

    def record(self, layer: nn.Module, cfg: dict) -> dict:
        return layer_config(layer)

    def check_model(self, modules: dict, name: str, cfg: dict) -> None:
        in_features, out_features = features(expect_linear(modules, name, "adapter module"))
        if (in_features, out_features) != (cfg["in_features"], cfg["out_features"]):
            raise AdapterFileError(
                f"{name} is {in_features}->{out_features} in the model, "
                f"{cfg['in_features']}->{cfg['out_features']} in the file")


def spec(model: nn.Module, config: Config, target_modules) -> Spec:
    """The KronA layers ``config`` puts on the target modules, checked against their sizes."""
    targets = default_targets(model) if target_modules is None else target_modules
    layers = {}
    for name in match_modules(linear_names(model), targets, modules=dict(model.named_modules())):
        module = model.get_submodule(name)
        if not is_linear(module):
            raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear "
                            "(or transformers Conv1D)")
        layers[name] = dict(kind=KIND_KRONA, **config.settings(name, *features(module)),
                            dropout=float(config.dropout))
    return Spec(layers)


def check_file(config: dict) -> None:
    """The file's "layers": KronA or LoKr layer configs, each well-formed."""
    for name, cfg in file_layers(config).items():
        where = f"layer {name!r}"
        kind = layer_kind(where, cfg, KIND_KEYS, NAME)
        if kind == KIND_LOKR and (not is_int(cfg["rank_b"]) or cfg["rank_b"] <= 0):
            raise AdapterFileError(f"{where}: rank_b must be a positive int, "
                                   f"got {cfg['rank_b']!r}")
        check_factor_settings(where, cfg)
        if not is_number(cfg["dropout"]) or not 0.0 <= cfg["dropout"] < 1.0:
            raise AdapterFileError(f"{where}: dropout must be a number in [0, 1), "
                                   f"got {cfg['dropout']!r}")


def read_spec(model: nn.Module, config: dict, tensors: dict, state: AdapterState | None) -> Spec:
    """The file's layers, checked against ``model`` (``KronLayers.checked``)."""
    return Spec(config["layers"]).checked(model, state)


def save(model: nn.Module, state: AdapterState) -> tuple[dict, dict]:
    """The model's layers for a file: ({"layers": configs}, factors)."""
    return Spec(state.layers).saved(model)


def mergeable(layers: dict[str, nn.Module], *, unload: bool) -> dict[str, nn.Module]:
    """Every KronA layer merges."""
    return layers


def check_disable(layers: dict[str, nn.Module]) -> None:
    """Every KronA layer can be switched off (its base runs alone)."""
