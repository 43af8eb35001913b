"""Adapter files for every method: ``save_adapters(model, path)`` / ``load_adapters(model, path)``.

One safetensors file: the tensors, and in the header metadata under "kronops" a JSON config:
format, format_version, kronops_version, method, train_modules, tensors ({name: shape,
dtype}), sha256 of the tensor bytes, and per method
  krona  layers: per adapter module its settings (``lokr.layer_config``)
  s2ft   plan (the ``Plan``, JSON) and mode ("adapter" | "inplace")
Tensors, by module name in the model:
  krona  ``<module>.a`` (or ``.a_u``, ``.a_v``), ``<module>.b`` (or ``.b_u``, ``.b_v``)
  s2ft   ``<module>.rows`` or ``<module>.cols``: the sorted int64 indices the plan trains
         ``<module>.delta``   adapter mode: Δ, (|R|, in) or (out, |C|)
         ``<module>.weight``  in-place mode: those rows/columns of the trained weight
         all in the original layout (a co-permuted model is saved unpermuted)
  train modules: ``<module>.<parameter>``

Saving is atomic: the file is written to a temporary name in the same directory, flushed
to disk and moved over ``path`` with ``os.replace``, so a crash mid-save leaves any
previous file intact. Loading checks everything (file integrity, checksum, module names,
shapes, config, plan) before it changes the model: on any error it raises
``AdapterFileError`` (a ValueError) naming the problem, and the model is untouched. A
plain model gets the saved adapters applied (S²FT: the plan in the saved mode, not
permuted); a model with adapters must hold exactly the saved ones (S²FT: the same plan and
mode, co-permuted or not).
"""
import hashlib
import json
import os
import struct
import tempfile

import torch
from torch import nn

from ..kron.modules import KronALinear
from ..s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from ..version import __version__
from .apply import freeze_except, plan_parts, summarize, wrap_krona, wrap_s2ft
from .blocks import find_blocks
from .lokr import build_layer, layer_config
from .permutation import original_orders
from .selection import Plan, check_plan
from .state import MODES, STATE, AdapterState, adapter_modules, adapter_state

FORMAT = "kronops-adapters"
FORMAT_VERSION = 2  # 2: one layout for every method (S²FT plan + mode, in-place weights)


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded into this model (the model is left untouched)."""


def _expect_linear(path: str, name: str, module, cfg: dict) -> None:
    """The model's module ``name`` is an nn.Linear of the size the file's ``cfg`` gives."""
    if not isinstance(module, nn.Linear):
        what = "missing" if module is None else f"a {type(module).__name__}"
        raise AdapterFileError(f"{path!r}: adapter module {name!r} is {what} in the model, "
                               "expected an nn.Linear")
    if (module.in_features, module.out_features) != (cfg["in_features"], cfg["out_features"]):
        raise AdapterFileError(
            f"{path!r}: {name} is {module.in_features}->{module.out_features} in the model, "
            f"{cfg['in_features']}->{cfg['out_features']} in the file")


def _adapter_params(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A KronA layer's own parameters (factors), by name within the layer."""
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted tensor names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded FSDP2 parameter (DTensor) gathered whole (a collective), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _s2ft_layers(model: nn.Module) -> dict[str, S2FTLinear]:
    """The model's S²FT layers (both modes) by module name."""
    return {n: m for n, m in adapter_modules(model).items() if isinstance(m, S2FTLinear)}


def _to_original(layer: S2FTLinear, order) -> tuple[torch.Tensor, torch.Tensor]:
    """(the layer's indices in the original layout, sorted; position): the file's values are
    the layer's (Δ, or weight part) at ``position`` along the selected dim. ``order``: the
    layer's co-permutation (new index -> original index), or None."""
    indices = layer.indices().cpu()
    if order is None:
        return indices, torch.arange(indices.numel())
    return order[indices].sort()


def _s2ft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per S²FT layer its indices and Δ (adapter) or trained weight part (in place), in the
    original layout (see the module docstring)."""
    orders = original_orders(model)
    out = {}
    for name, layer in _s2ft_layers(model).items():
        if layer.merged:
            raise RuntimeError(f"{name} is merged: unmerge_adapters(model) before saving")
        dim = 1 if layer.mode == "cols" else 0
        indices, position = _to_original(layer, orders.get(name))
        if isinstance(layer, S2FTInPlaceLinear):
            key, values = "weight", _full(layer.base.weight).detach().index_select(
                dim, layer.indices())
        else:
            key, values = "delta", _full(layer.delta).detach()
        out[f"{name}.{layer.mode}"] = indices
        out[f"{name}.{key}"] = values.index_select(dim, position.to(values.device))
    return out


def _collect(model: nn.Module) -> tuple[dict, dict]:
    """(tensors, config) describing the model's adapters."""
    state = adapter_state(model)
    if state is None:
        raise ValueError("model has no kronops adapters (no KronA or S²FT layers): "
                         "apply_adapters (or from_peft) first")
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, kronops_version=__version__,
                  method=state.method, train_modules=list(state.train_modules))
    tensors = {}
    if state.method == "krona":
        layers = {n: m for n, m in adapter_modules(model).items() if isinstance(m, KronALinear)}
        config["layers"] = {n: layer_config(m) for n, m in layers.items()}
        for name, layer in layers.items():
            for pname, p in _adapter_params(layer).items():
                tensors[f"{name}.{pname}"] = p
    else:
        config.update(plan=json.loads(state.plan.to_json()), mode=state.mode)
        tensors.update(_s2ft_tensors(model))
    for name in state.train_modules:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{name}.{pname}"] = p
    tensors = {k: _full(t).detach().to("cpu").contiguous() for k, t in tensors.items()}
    config["tensors"] = {k: dict(shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""))
                         for k, t in tensors.items()}
    config["sha256"] = _digest(tensors)
    return tensors, config


def save_adapters(model: nn.Module, path) -> None:
    """Write the model's adapters to ``path`` (one safetensors file), atomically.

    Under torch.distributed every rank must call it (FSDP2 shards are gathered, a
    collective); only rank 0 writes.
    """
    from safetensors.torch import save
    tensors, config = _collect(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_rank() != 0:
        return
    data = save(tensors, metadata={"kronops": json.dumps(config, sort_keys=True)})
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read_adapters(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) from an adapter file, checked for integrity; AdapterFileError if not."""
    from safetensors.torch import load
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AdapterFileError(f"cannot read adapter file {path!r}: {e}") from e
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        tensors = load(data)
    except Exception as e:  # struct.error, JSON errors, SafetensorError
        raise AdapterFileError(f"{path!r} is not a valid adapter file (truncated or corrupt): "
                               f"{type(e).__name__}: {e}") from None
    try:
        config = json.loads(header["__metadata__"]["kronops"])
    except Exception:
        raise AdapterFileError(f"{path!r} is a safetensors file without a kronops adapter "
                               "config") from None
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path!r}: unsupported format {config.get('format')!r} version "
                               f"{config.get('format_version')!r} (this kronops reads "
                               f"{FORMAT!r} version {FORMAT_VERSION})")
    if _digest(tensors) != config.get("sha256"):
        raise AdapterFileError(f"{path!r}: tensor data does not match its checksum (corrupt)")
    return tensors, config


def _check_tensors(model: nn.Module, tensors: dict, expected: dict[str, torch.Size],
                   path: str) -> None:
    """The file holds exactly the ``expected`` tensors, of those shapes."""
    modules = dict(model.named_modules())
    for key in sorted(set(tensors) - set(expected)):
        layer = key.rpartition(".")[0]
        if layer not in modules:
            raise AdapterFileError(f"{path!r}: {key!r} does not fit the model: layer {layer!r} "
                                   "is not a module of the model")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{path!r} does not fit the model: tensors missing from the file "
                               f"{missing[:4]}{'...' if len(missing) > 4 else ''}, not in the "
                               f"model {extra[:4]}{'...' if len(extra) > 4 else ''}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise AdapterFileError(f"{path!r}: {key} has values of shape "
                                   f"{tuple(tensors[key].shape)} in the file, {tuple(shape)} in "
                                   "the model")


def _check_krona(model: nn.Module, config: dict, path: str):
    """Validate a KronA file against ``model``: (layers to wrap or None, expected shapes)."""
    modules = dict(model.named_modules())
    layers, existing = config.get("layers"), adapter_modules(model)
    if not isinstance(layers, dict):
        raise AdapterFileError(f"{path!r}: a KronA file needs a layers config")
    expected = {}
    if existing:
        if set(existing) != set(layers):
            raise AdapterFileError(f"{path!r}: the model's adapters {sorted(existing)[:3]}... "
                                   f"differ from the file's {sorted(layers)[:3]}...")
        for name, cfg in layers.items():
            layer = existing[name]
            if not isinstance(layer, KronALinear):
                raise AdapterFileError(f"{path!r}: {name} is a {type(layer).__name__}, the file "
                                       f"holds a KronA layer")
            have = layer_config(layer)
            for key in ("kind", "in_features", "out_features", "a_shape", "rank", "alpha"):
                if have[key] != cfg.get(key):
                    raise AdapterFileError(f"{path!r}: {name} has {key} {have[key]!r} in the "
                                           f"model, {cfg.get(key)!r} in the file")
            expected.update({f"{name}.{n}": p.shape for n, p in _adapter_params(layer).items()})
        return None, expected
    for name, cfg in layers.items():
        module = modules.get(name)
        _expect_linear(path, name, module, cfg)
        try:  # the exact parameter shapes, from a layer over a weightless stand-in
            probe = build_layer(nn.Linear(module.in_features, module.out_features, bias=False,
                                          device="meta"), cfg)
        except (TypeError, ValueError, KeyError) as e:
            raise AdapterFileError(f"{path!r}: bad config for {name}: {e}") from None
        expected.update({f"{name}.{n}": p.shape for n, p in _adapter_params(probe).items()})
    return layers, expected


def _check_s2ft(model: nn.Module, config: dict, path: str):
    """Validate an S²FT file against ``model``: (plan, mode, expected shapes, index tensors)."""
    try:
        plan = Plan(config["plan"]["strategy"], config["plan"]["seed"], config["plan"]["blocks"])
        mode = config["mode"]
    except (KeyError, TypeError) as e:
        raise AdapterFileError(f"{path!r}: an S²FT file needs a plan and a mode ({e!r})") \
            from None
    if mode not in MODES:
        raise AdapterFileError(f"{path!r}: mode {mode!r}, expected one of {MODES}")
    try:
        blocks = find_blocks(model)
        check_plan(plan, blocks)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path!r}: the selection plan does not fit the model: {e}") \
            from None
    parts = plan_parts(blocks, plan)
    state = adapter_state(model)
    if state is not None:  # the same plan and mode, maybe co-permuted
        if state.mode != mode:
            raise AdapterFileError(f"{path!r} holds S²FT in {mode!r} mode, the model's S²FT "
                                   f"layers are in {state.mode!r} mode")
        layers = _s2ft_layers(model)
        if set(layers) != set(parts):
            raise AdapterFileError(f"{path!r}: the model's S²FT layers differ from the file's "
                                   "plan")
        orders = original_orders(model)
        for name, (side, indices) in parts.items():
            original, _ = _to_original(layers[name], orders.get(name))
            if layers[name].mode != side or not torch.equal(original, indices):
                raise AdapterFileError(f"{path!r}: {name} selects other {side} than the file")
    expected, index_tensors = {}, {}
    value = "delta" if mode == "adapter" else "weight"
    for name, (side, indices) in parts.items():
        out_features, in_features = model.get_submodule(name).out_features, \
            model.get_submodule(name).in_features
        expected[f"{name}.{side}"] = torch.Size([indices.numel()])
        expected[f"{name}.{value}"] = torch.Size(
            [indices.numel(), in_features] if side == "rows" else [out_features, indices.numel()])
        index_tensors[f"{name}.{side}"] = indices
    return plan, mode, expected, index_tensors


@torch.no_grad()
def _write_s2ft(model: nn.Module, tensors: dict) -> None:
    """Put the file's Δ (adapter) or trained rows/columns (in place) into the S²FT layers."""
    orders = original_orders(model)
    for name, layer in _s2ft_layers(model).items():
        _, position = _to_original(layer, orders.get(name))
        dim = 1 if layer.mode == "cols" else 0
        if isinstance(layer, S2FTInPlaceLinear):
            w = layer.base.weight
            w.index_copy_(dim, layer.indices()[position.to(w.device)],
                          tensors[f"{name}.weight"].to(w.device, w.dtype))
        else:
            delta = layer.delta
            delta.index_copy_(dim, position.to(delta.device),
                              tensors[f"{name}.delta"].to(delta.device, delta.dtype))


def load_adapters(model: nn.Module, path, *, verbose: bool = False) -> nn.Module:
    """Load adapters saved by ``save_adapters`` into ``model`` (in place) and return it.

    A plain model gets the saved adapters applied (same module names and shapes needed;
    S²FT: the saved plan, in the saved mode, in the original layout); a model with adapters
    must hold exactly the saved ones. Any mismatch, a corrupt or truncated file:
    ``AdapterFileError`` (a ValueError) and the model is untouched.
    """
    path = os.fspath(path)
    tensors, config = read_adapters(path)
    method = config.get("method")
    state = adapter_state(model)
    if state is not None and state.method != method:
        raise AdapterFileError(f"{path!r} holds {method!r} adapters, the model has "
                               f"{state.method!r} adapters")
    if state is None and adapter_modules(model):
        raise AdapterFileError("the model has adapter layers not set up by kronops.apply_adapters")
    merged = [n for n, m in adapter_modules(model).items() if m.merged]
    if merged:
        raise AdapterFileError(f"the model's adapters are merged (e.g. {merged[0]}): "
                               "unmerge_adapters(model) before loading")
    index_tensors, s2ft_keys = {}, set()
    if method == "krona":
        new_layers, expected = _check_krona(model, config, path)
    elif method == "s2ft":
        plan, mode, expected, index_tensors = _check_s2ft(model, config, path)
        s2ft_keys = set(expected)
    else:
        raise AdapterFileError(f"{path!r}: unknown method {method!r}")
    modules = dict(model.named_modules())
    train = config.get("train_modules", [])
    if state is not None and list(state.train_modules) != list(train):
        raise AdapterFileError(f"{path!r}: train_modules {train} in the file, "
                               f"{state.train_modules} in the model")
    for name in train:
        if name not in modules:
            raise AdapterFileError(f"{path!r}: train module {name!r} is not in the model")
        expected.update({f"{name}.{n}": p.shape for n, p in modules[name].named_parameters()})
    _check_tensors(model, tensors, expected, path)
    for key, indices in index_tensors.items():
        if tensors[key].dtype != torch.int64 or not torch.equal(tensors[key], indices):
            raise AdapterFileError(f"{path!r}: {key} differs from the selection plan")
    for key, t in tensors.items():
        if key not in index_tensors and not t.is_floating_point():
            raise AdapterFileError(f"{path!r}: {key} has dtype {t.dtype}, expected floating point")

    # Everything checked: now change the model.
    if state is None and method == "krona":
        wrap_krona(model, new_layers)
        setattr(model, STATE, AdapterState(method, list(train), layers={
            n: layer_config(m) for n, m in adapter_modules(model).items()}))
    elif state is None:
        deltas = [tensors[k].dtype for k in s2ft_keys if k.endswith(".delta")]
        wrap_s2ft(model, find_blocks(model), plan, mode,
                  delta_dtype=deltas[0] if deltas else torch.float32)
        setattr(model, STATE, AdapterState(method, list(train), plan=plan, mode=mode))
    params = {}
    for name, m in model.named_modules():
        params.update({f"{name}.{n}": p for n, p in m.named_parameters(recurse=False)})
    with torch.no_grad():
        for key, t in tensors.items():
            if key not in s2ft_keys:
                params[key].copy_(t)
    if method == "s2ft":
        _write_s2ft(model, tensors)
    freeze_except(model, list(train))
    if verbose:
        print(summarize(model))
    return model


__all__ = ["save_adapters", "load_adapters", "read_adapters", "AdapterFileError"]
