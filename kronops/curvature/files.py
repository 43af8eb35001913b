"""Factor files: ``save_factors(factors, path)``, ``load_factors(path)``.

The adapter files' container (``kronops.adapters.fileformat``: safetensors, a JSON config
in its header, a SHA-256 over the config and every tensor's name, dtype, shape and bytes)
under its own format, "kronops-curvature-factors" version 1, written atomically
(``kronops.adapters.atomic``: a failed save leaves the previous file intact). Tensors, per
layer ``name``: ``name.a``, ``name.g``, ``name.diag`` (when collected) and ``name.index``
(an S²FT selection by index). Config ``layers``: {name: {tokens, bias, selection}}, the
selection null or {side, size, range}: range [start, stop) or null for an index. A file
that is corrupt or malformed in any way raises ``AdapterFileError`` naming the file and
what is wrong.
"""
import os
from collections.abc import Mapping

import torch

from ..adapters.atomic import write_atomic
from ..adapters.errors import AdapterFileError
from ..adapters.fileformat import FileKind, check_listed, encode, read_file
from ..adapters.json_checks import expect_keys
from ..s2ft.selection import Selection
from .factors import LayerFactors

FACTORS = FileKind("kronops-curvature-factors", 1, (1,), "curvature factors", "save_factors")
KEYS = ("format", "format_version", "kronops_version", "layers", "tensors", "sha256")
LAYER_KEYS = ("tokens", "bias", "selection")
SELECTION_KEYS = ("side", "size", "range")


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy (safetensors refuses tensors sharing memory)."""
    return t.detach().to("cpu", copy=True).contiguous()


def save_factors(factors: Mapping[str, LayerFactors], path) -> None:
    """Write ``factors`` ({layer name: LayerFactors}, as ``collect`` returns) to ``path``
    atomically, in their dtypes, bit for bit."""
    if not isinstance(factors, Mapping) or not factors:
        raise ValueError("factors must be a non-empty dict {layer name: LayerFactors}")
    tensors, layers = {}, {}
    for name, f in factors.items():
        if not isinstance(name, str) or not isinstance(f, LayerFactors):
            raise TypeError(f"factors must map layer names to LayerFactors, got "
                            f"{name!r}: {type(f).__name__}")
        tensors[f"{name}.a"], tensors[f"{name}.g"] = _cpu(f.a), _cpu(f.g)
        if f.diag is not None:
            tensors[f"{name}.diag"] = _cpu(f.diag)
        s = f.selection
        selection = None
        if s is not None:
            selection = dict(side=s.side, size=s.size,
                             range=[s.start, s.start + s.count] if s.is_range else None)
            if not s.is_range:
                tensors[f"{name}.index"] = _cpu(s.index)
        layers[name] = dict(tokens=f.tokens, bias=f.bias, selection=selection)
    write_atomic(path, encode(dict(layers=layers), tensors, FACTORS), what="factors")


def _selection(name: str, entry, tensors: dict) -> Selection | None:
    if entry is None:
        return None
    expect_keys(f"layers[{name!r}].selection", entry, SELECTION_KEYS)
    chosen = entry["range"]
    if chosen is None:
        chosen = tensors.get(f"{name}.index")
    elif isinstance(chosen, list) and len(chosen) == 2:
        chosen = range(*chosen)
    return Selection(entry["side"], chosen, size=entry["size"])


def _check(config: dict, tensors: dict) -> None:
    """The config's keys, tensor list and layers: every tensor belongs to one layer and the
    layer's values make a LayerFactors; else AdapterFileError naming the layer."""
    expect_keys("config", config, KEYS)
    check_listed(config, tensors)
    layers = config["layers"]
    if not isinstance(layers, dict) or not layers:
        raise AdapterFileError("layers must be a non-empty dict")
    owned = set()
    for name, entry in layers.items():
        expect_keys(f"layers[{name!r}]", entry, LAYER_KEYS)
        kinds = ["a", "g"] + ["diag"] * (f"{name}.diag" in tensors) + \
            ["index"] * (isinstance(entry["selection"], dict) and
                         entry["selection"].get("range") is None)
        missing = [k for k in kinds if f"{name}.{k}" not in tensors]
        if missing:
            raise AdapterFileError(f"layers[{name!r}]: missing tensor(s) {missing}")
        owned.update(f"{name}.{k}" for k in kinds)
    stray = sorted(set(tensors) - owned)
    if stray:
        raise AdapterFileError(f"tensor(s) {stray} belong to no layer")


def _layer(name: str, entry: dict, tensors: dict) -> LayerFactors:
    try:
        return LayerFactors(tensors[f"{name}.a"], tensors[f"{name}.g"], entry["tokens"],
                            entry["bias"], _selection(name, entry["selection"], tensors),
                            tensors.get(f"{name}.diag"))
    except AdapterFileError:
        raise
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"layers[{name!r}]: {e}") from None


def load_factors(path) -> dict[str, LayerFactors]:
    """The factors saved in ``path`` (on the CPU, in their saved dtypes), checked for
    integrity and structure: ``AdapterFileError`` naming the file and what is wrong."""
    path = os.fspath(path)
    out = {}

    def check(config, tensors):
        _check(config, tensors)
        for name, entry in config["layers"].items():
            out[name] = _layer(name, entry, tensors)

    read_file(path, FACTORS, check)
    return out


__all__ = ["save_factors", "load_factors", "FACTORS"]
