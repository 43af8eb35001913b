"""KronA^B (``residual=True``: KronA^B_res): a Kronecker adapter in parallel with every
attention and FFN sub-layer of every block (cross-attention included), wrapping the
sub-layer's output projection as a ``KronASublayer`` (``sublayer``). Not mergeable: the
sub-layer is not linear.

apply_adapters(model, "krona_block", a_shape=None, rank=None, alpha=None, residual=False);
target_modules must be None. A file holds per output projection its
``sublayer.sublayer_config`` (with the source module whose input the adapter takes) under
"layers", and its factors (and ``residual_scale``).
"""
from dataclasses import dataclass

from torch import nn

from ...wrapped_linear import features
from ..blocks import find_blocks
from ..errors import AdapterFileError
from ..state import AdapterState
from ..sublayer import (KIND_SUBLAYER, SUBLAYER_KEYS, KronASublayer, build_sublayer,
                        sublayer_config, sublayer_pairs)
from .kron_layers import (FactorConfig, KronLayers, check_factor_settings, expect_linear,
                          file_layers, layer_kind, meta_linear)

NAME = "krona_block"
LAYERS = (KronASublayer,)
FILE_KEYS = ("layers",)


@dataclass(frozen=True)
class Config(FactorConfig):
    """``FactorConfig``'s a_shape (a pair, or {output module suffix: pair}), rank and alpha,
    and ``residual``: add a learnable s_res * x, starting at 0 (KronA^B_res)."""
    residual: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be a bool, got {self.residual!r}")


class Spec(KronLayers):
    """Per sub-layer output projection its ``sublayer.sublayer_config``."""
    method = NAME
    layer_types = LAYERS

    def build(self, model: nn.Module, name: str, cfg: dict) -> nn.Module:
        return build_sublayer(model.get_submodule(name), model.get_submodule(cfg["source"]), cfg)

    def probe(self, cfg: dict) -> nn.Module:
        return build_sublayer(meta_linear(1, cfg["out_features"]),
                              meta_linear(cfg["in_features"], 1), cfg)

    def record(self, layer: nn.Module, cfg: dict) -> dict:
        return sublayer_config(layer, cfg["source"])

    def check_model(self, modules: dict, name: str, cfg: dict) -> None:
        for role, module, key, side in (("output", name, "out_features", 1),
                                        ("source", cfg["source"], "in_features", 0)):
            size = features(expect_linear(modules, module, f"sub-layer {role} module"))[side]
            if size != cfg[key]:
                raise AdapterFileError(f"{module} has {key.replace('_', ' ')} {size} in the "
                                       f"model, {cfg[key]} in the file")


def spec(model: nn.Module, config: Config, target_modules) -> Spec:
    """One adapter per attention and FFN sub-layer of every block, checked against sizes."""
    if target_modules is not None:
        raise ValueError("method='krona_block' adapts every attention and FFN sub-layer of "
                         "the model's blocks; target_modules must be None")
    layers = {}
    for name, source in sublayer_pairs(find_blocks(model)).items():
        in_features = features(model.get_submodule(source))[0]
        out_features = features(model.get_submodule(name))[1]
        if config.residual and in_features != out_features:
            raise ValueError(f"{name}: residual=True needs the sub-layer's input and output "
                             f"sizes equal, got {in_features} and {out_features}")
        layers[name] = dict(kind=KIND_SUBLAYER, source=source,
                            **config.settings(name, in_features, out_features),
                            residual=config.residual)
    return Spec(layers)


def check_file(config: dict) -> None:
    """The file's "layers": KronA^B layer configs, each well-formed."""
    for name, cfg in file_layers(config).items():
        where = f"layer {name!r}"
        layer_kind(where, cfg, {KIND_SUBLAYER: SUBLAYER_KEYS}, NAME)
        if not isinstance(cfg["source"], str) or not cfg["source"]:
            raise AdapterFileError(f"{where}: source must be a module name, "
                                   f"got {cfg['source']!r}")
        if not isinstance(cfg["residual"], bool):
            raise AdapterFileError(f"{where}: residual must be true or false, "
                                   f"got {cfg['residual']!r}")
        check_factor_settings(where, cfg)


def read_spec(model: nn.Module, config: dict, tensors: dict, state: AdapterState | None) -> Spec:
    """The file's layers, checked against ``model`` (``KronLayers.checked``)."""
    return Spec(config["layers"]).checked(model, state)


def save(model: nn.Module, state: AdapterState) -> tuple[dict, dict]:
    """The model's layers for a file: ({"layers": configs}, factors and s_res)."""
    return Spec(state.layers).saved(model)


def mergeable(layers: dict[str, nn.Module], *, unload: bool) -> dict[str, nn.Module]:
    """None: a KronA^B update is not a weight change, so merging raises."""
    raise ValueError(f"KronA^B adapters (e.g. {next(iter(layers))}) run in parallel with a "
                     "non-linear sub-layer (attention or FFN): their update is not a weight "
                     "change and cannot be merged; keep them as they are (save_adapters / "
                     "load_adapters), or use method='krona' for mergeable adapters")


def check_disable(layers: dict[str, nn.Module]) -> None:
    """Every KronA^B layer can be switched off (its output projection runs alone)."""
